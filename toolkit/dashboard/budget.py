"""The visual-token budget, shared by the Fine-tune, Visual tokens and Memory tabs: given as a prune ratio or as a
number of kept tokens, and checked against the preset's vision tower by the pruner's own checks (budget range,
grid factoring, [CLS] needed, ...) before anything runs."""
from __future__ import annotations

import gradio as gr

from toolkit.dashboard.common import HELP, AppSettings, InputError, ui_choice, ui_fraction, ui_integer
from toolkit.dashboard.model import geometry_bundle
from toolkit.tokens import STRATEGIES, make_pruner

AUTO_STRATEGY = "auto"  # the fine-tune's default: dual-priv for Dual-Priv, every token for the baselines
BUDGET_RATIO = "prune ratio"
BUDGET_KEEP = "kept tokens"
BUDGET_MODES = (BUDGET_RATIO, BUDGET_KEEP)
TOKEN_RATIO_MEANING = "the fraction of visual tokens removed"


def token_budget(settings: AppSettings, strategy: str, budget_mode: str, token_prune_ratio, keep_tokens,
                 preset: str | None = None) -> dict:
    """Validate a token strategy and budget against the tower of ``preset`` (default: the app's); returns
    ``make_pruner``'s budget keywords (``keep``, ``token_prune_ratio``), or raises :class:`InputError`."""
    ui_choice("token strategy", strategy, sorted(STRATEGIES))
    if strategy == "none":
        return dict(keep=None, token_prune_ratio=None)
    ui_choice("token budget", budget_mode, BUDGET_MODES)
    if budget_mode == BUDGET_KEEP:
        budget = dict(keep=ui_integer("kept tokens", keep_tokens), token_prune_ratio=None)
    else:
        ratio = ui_fraction("token prune ratio", token_prune_ratio, hint=TOKEN_RATIO_MEANING)
        budget = dict(keep=None, token_prune_ratio=ratio)
    try:  # the pruner's own checks, on the preset's geometry
        make_pruner(strategy, geometry_bundle(preset or settings.preset), **budget)
    except ValueError as err:
        raise InputError(str(err)) from None
    return budget


def budget_controls(elem_ids: tuple[str, str, str], mode_label: str = "Token budget given as",
                    keep_info: str = HELP["keep_tokens"],
                    values: tuple[str, float, int] = (BUDGET_RATIO, 0.75, 16)) -> tuple[gr.Radio, gr.Number, gr.Number]:
    """The budget's three controls (mode, ratio, kept tokens) with these ``elem_ids`` and initial ``values``; the
    field the chosen mode does not use is greyed out."""
    mode_id, ratio_id, keep_id = elem_ids
    mode_value, ratio_value, keep_value = values
    mode = gr.Radio(list(BUDGET_MODES), value=mode_value, label=mode_label, info=HELP["budget_mode"],
                    elem_id=mode_id)
    with gr.Row():
        ratio = gr.Number(ratio_value, label="Token prune ratio", info=HELP["token_prune_ratio"], elem_id=ratio_id,
                          interactive=mode_value == BUDGET_RATIO)
        keep = gr.Number(keep_value, precision=0, label="Kept visual tokens", info=keep_info,
                         interactive=mode_value == BUDGET_KEEP, elem_id=keep_id)

    def toggle(mode_value):
        return gr.update(interactive=mode_value == BUDGET_RATIO), gr.update(interactive=mode_value == BUDGET_KEEP)

    mode.change(toggle, mode, [ratio, keep], queue=False, show_progress="hidden", api_name=False)
    return mode, ratio, keep

"""Pruned visual tokens outside the toolkit: which inference path an export carries, and the files that carry it.

A model evaluated on pruned visual tokens (Dual-Priv token pruning, ``prune_at_eval``) would answer differently
in stock transformers, which feeds every visual token. Such an export carries the pruned inference path in Hugging
Face's own mechanism for custom architectures: :data:`toolkit.remote.MODELING_FILE` copied into the folder,
``auto_map`` entries in ``config.json`` (``AutoModelForImageTextToText``) and ``processor_config.json``
(``AutoProcessor``), the pruning settings in ``config.json`` (``dualpriv_token_pruning``). Loaded with
``trust_remote_code=True`` it is a ``LlavaForConditionalGeneration`` subclass fed the pruned tokens; loaded without
it, a plain LLaVA fed all tokens (the card says what that changes).

Per method (measured, see the card's note): a Dual-Priv model trained on 16 of 64 tokens scored 73-77 % on them
and 67-68 % on all 64 (2 seeds, 60 held-out photos), so its export keeps the pruned path. Non-private, DP-SGD
and DP-ZO feed all visual tokens (``token_strategy="none"``): stock inference.
Dual-Priv (and ``mean-attention``) with ``prune_at_eval`` feed pruned tokens: remote code. Strategies the modeling
file does not implement (``random``, ``uniform``, ``pool``, ``divprune``) export stock with a note.

Example::

    >>> from toolkit.config import TrainConfig
    >>> from toolkit.features import make_pruner_for
    >>> from toolkit.models import build_model
    >>> pruner = make_pruner_for(build_model("tiny"), TrainConfig(method="dual-priv", steps=1).resolved())
    >>> pruning_settings(pruner)["n_kept"], pruning_settings(pruner)["n_contextual"]
    (13, 2)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from toolkit.remote import MODELING_FILE

REMOTE_STRATEGIES = ("dual-priv", "mean-attention")
MODULE = MODELING_FILE.stem
MODEL_CLASS = f"{MODULE}.DualPrivLlavaForConditionalGeneration"
PROCESSOR_CLASS = f"{MODULE}.DualPrivLlavaProcessor"


def pruning_settings(pruner) -> dict | None:
    """What the modeling file needs to prune as ``pruner`` does, or None when every visual token is fed."""
    if pruner.strategy == "none":
        return None
    if pruner.strategy not in REMOTE_STRATEGIES:
        raise ValueError(f"strategy {pruner.strategy!r} has no remote-code inference path")
    return dict(strategy=pruner.strategy, score=pruner.spec.score, layer=int(pruner.layer),
                feature_layer=int(pruner.feature_layer), has_cls=bool(pruner.has_cls), with_cls=bool(pruner.with_cls),
                n_kept=int(pruner.n_kept), n_contextual=int(pruner.n_contextual), n_out=int(pruner.n_out),
                n_in=int(pruner.n_in))


def inference_plan(pruner, base_is_copied: bool, export_format: str) -> tuple[str, dict | None, str]:
    """``(inference, settings, note)``: ``"stock"`` or ``"remote-code"``, the pruning settings, and the card's
    sentence on visual tokens."""
    if pruner.strategy == "none":
        return "stock", None, f"all {pruner.n_out} visual tokens, as stock transformers feeds them."
    fed = f"{pruner.n_out} of {pruner.n_in} visual tokens ({pruner.strategy})"
    if pruner.strategy not in REMOTE_STRATEGIES:
        return "stock", None, (f"the toolkit feeds {fed}; this strategy has no remote-code path, so stock "
                               "transformers feeds all tokens and may answer differently: use the toolkit's predict.")
    if export_format == "adapter" and not base_is_copied:
        return "stock", None, (f"the toolkit feeds {fed}; the base model is referenced, not copied, so it carries no "
                               "remote code: stock transformers feeds all tokens and may answer differently. Export "
                               "with export_format='merged' for the pruned path outside the toolkit.")
    return "remote-code", pruning_settings(pruner), (
        f"the model was evaluated on {fed}. Load it with `trust_remote_code=True` (model and processor) to feed the "
        f"same tokens: `{MODELING_FILE.name}` in this folder subclasses `LlavaForConditionalGeneration`. Without it, "
        "transformers loads a plain LLaVA that feeds all visual tokens: a different input from the one evaluated "
        "(measured on Dual-Priv models trained from scratch on the toolkit's photo set: free-text answers agreed on "
        "18 of 40 photos; closed-set accuracy fell from 73-77 % on the pruned tokens to 67-68 % on all tokens, "
        "2 seeds, 60 photos; with remote code, every answer agreed). The pruned path is the one the export uses "
        "because it is what the model was trained and evaluated on, and it scored higher.")


def _update_json(file: Path, **entries) -> None:
    data = json.loads(file.read_text())
    data.update(entries)
    file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def add_remote_model(folder: Path, settings: dict) -> None:
    """Make the model in ``folder`` load as the pruned LLaVA under ``trust_remote_code=True``."""
    shutil.copyfile(MODELING_FILE, folder / MODELING_FILE.name)
    _update_json(folder / "config.json", auto_map={"AutoModelForImageTextToText": MODEL_CLASS},
                 dualpriv_token_pruning=settings)


def add_remote_processor(folder: Path, settings: dict) -> None:
    """Make ``AutoProcessor.from_pretrained(folder, trust_remote_code=True)`` write one placeholder per pruned
    token (without it, the stock LlavaProcessor: one per patch)."""
    shutil.copyfile(MODELING_FILE, folder / MODELING_FILE.name)
    _update_json(folder / "processor_config.json", auto_map={"AutoProcessor": PROCESSOR_CLASS},
                 num_image_tokens=settings["n_out"])

"""The plan panel: what a run's privacy budget buys, shown before it starts (:func:`toolkit.plan.plan`).

No model is built and no image is opened: N (the accepted records), q, the steps, σ from the toolkit's own
accountant, the ε reached, the averaged update's noise against its clipped signal, and the verdict of the measured
calibration table ("runs like this learned / stayed at the majority class"), with the proposal when another batch
size gives less noise for the same ε and compute.

Example::

    >>> from toolkit.config import TrainConfig
    >>> html = plan_html(TrainConfig(method="dual-priv", epsilon=3.0, steps=30, expected_batch_size=64))
    >>> "σ" in html and "protects" in html
    True
"""
from __future__ import annotations

import html

from toolkit.config import TrainConfig
from toolkit.plan import plan

# the calibration's verdict kinds -> the status colours of the page
KINDS = {"learned": "ok", "stuck": "warn", "uncertain": "warn"}


def plan_html(config: TrainConfig) -> str:
    """The plan of ``config`` as the page shows it: one status line (coloured by the measured verdict), what ε
    protects, and the proposal when there is a better batch size. A config the plan refuses is an error line."""
    try:
        p = plan(config)
    except ValueError as err:
        return f'<div class="dp-msg dp-error">⚠ Plan: {html.escape(str(err))}</div>'
    kind = KINDS.get(p.evidence.get("kind"), "info") if p.private else "info"
    icon = {"ok": "✓ ", "warn": "⚠ ", "info": ""}[kind]
    parts = [f'<div class="dp-msg dp-{kind}">{icon}{html.escape(p.line())}</div>',
             f"<p>Privacy unit: {html.escape(p.unit_sentence)}.</p>"]
    if p.proposal and not p.proposal["same_as_config"]:
        parts.append(f"<p>Proposal: batch size {p.proposal['expected_batch_size']} and {p.proposal['steps']} steps: "
                     f"{html.escape(p.proposal['effect'])}.</p>")
    return "\n".join(parts)

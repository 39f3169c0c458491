"""The training curve of one run: loss and ε spent per step (the dashboard draws it live, notebooks after a run)."""
from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from toolkit.vocabulary import METHOD_COLOURS, format_epsilon

LOSS_COLOUR = METHOD_COLOURS["dp-sgd"]
EPSILON_COLOUR = METHOD_COLOURS["dual-priv"]


def training_curve_figure(rows, epsilon_target: float | None = None, title: str | None = None) -> go.Figure:
    """Training loss and ε spent so far (dashed line: the target ε) side by side, sharing the step axis; only the
    panels that have something to draw (a private run's withheld loss, a non-private run's ε = ∞ are said in the
    remaining panel's title).

    Args:
        rows: the run's history, as ``train``'s per-step callback rows (dicts) or ``TrainResult.history``
            (a DataFrame): ``step``, and ``loss``, ``epsilon_spent`` and ``steps`` (the planned total) when known.
            A run that does not report its loss says so in its ε panel's title.
        epsilon_target: drawn as a dashed line when finite.
    """
    if isinstance(rows, pd.DataFrame):
        rows = rows.to_dict(orient="records")
    steps = [r["step"] for r in rows]
    losses = [r.get("loss") for r in rows]
    eps = [r.get("epsilon_spent") for r in rows]
    has_loss = any(loss is not None for loss in losses)
    private = any(e is not None and math.isfinite(e) for e in eps)
    # One panel per thing drawn: a withheld loss or a non-private run's ε = ∞ leaves no blank half.
    if private:  # a private run's loss is a function of the private batches that ε does not cover
        left = "training loss (released: outside the DP guarantee)"
        right = "ε spent" if has_loss else "ε spent (training loss not released: outside the DP guarantee)"
    else:
        left = ("training loss (non-private: ε = ∞)" if has_loss or not rows
                else "training loss (not reported by this run; non-private: ε = ∞)")
        right = None
    panels = ([left] if has_loss or not private else []) + ([right] if private else [])
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=panels)
    if has_loss:
        fig.add_trace(go.Scatter(x=steps, y=losses, mode="lines+markers", name="loss", marker=dict(size=4),
                                 line=dict(color=LOSS_COLOUR)), row=1, col=1)
    if private:
        col = len(panels)
        fig.add_trace(go.Scatter(x=steps, y=eps, mode="lines+markers", name="ε spent", marker=dict(size=4),
                                 line=dict(color=EPSILON_COLOUR)), row=1, col=col)
        if epsilon_target is not None and math.isfinite(epsilon_target):
            fig.add_hline(y=epsilon_target, line_dash="dash", line_color="grey", row=1, col=col,
                          annotation_text=f"target ε = {format_epsilon(epsilon_target)}",
                          annotation_position="bottom right")
    total = rows[-1].get("steps") if rows else None
    for col in range(1, len(panels) + 1):
        fig.update_xaxes(title_text="step", row=1, col=col, range=[0, total + 0.5] if total else None)
    fig.update_layout(title=title, height=330, margin=dict(l=50, r=30, t=70, b=40), showlegend=False,
                      template="plotly_white")
    return fig

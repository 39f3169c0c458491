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
    """Two panels sharing the step axis: training loss, and ε spent so far (dashed line: the target ε).

    Args:
        rows: the run's history, as ``train``'s per-step callback rows (dicts) or ``TrainResult.history``
            (a DataFrame): ``step``, and ``loss``, ``epsilon_spent`` and ``steps`` (the planned total) when known.
            A run that does not report its loss gets an empty loss panel that says so.
        epsilon_target: drawn as a dashed line when finite.
    """
    if isinstance(rows, pd.DataFrame):
        rows = rows.to_dict(orient="records")
    steps = [r["step"] for r in rows]
    losses = [r.get("loss") for r in rows]
    eps = [r.get("epsilon_spent") for r in rows]
    has_loss = any(loss is not None for loss in losses)
    private = any(e is not None and math.isfinite(e) for e in eps)
    if private:  # a private run's loss is a function of the private batches that ε does not cover
        left = ("training loss (released: outside the DP guarantee)" if has_loss
                else "training loss (not released: outside the DP guarantee)")
    else:
        left = "training loss" if has_loss or not rows else "training loss (not reported by this run)"
    right = "ε spent" if private else "ε (non-private: ∞)"
    fig = make_subplots(rows=1, cols=2, subplot_titles=(left, right))
    if has_loss:
        fig.add_trace(go.Scatter(x=steps, y=losses, mode="lines+markers", name="loss", marker=dict(size=4),
                                 line=dict(color=LOSS_COLOUR)), row=1, col=1)
    if private:
        fig.add_trace(go.Scatter(x=steps, y=eps, mode="lines+markers", name="ε spent", marker=dict(size=4),
                                 line=dict(color=EPSILON_COLOUR)), row=1, col=2)
        if epsilon_target is not None and math.isfinite(epsilon_target):
            fig.add_hline(y=epsilon_target, line_dash="dash", line_color="grey", row=1, col=2,
                          annotation_text=f"target ε = {format_epsilon(epsilon_target)}",
                          annotation_position="bottom right")
    total = rows[-1].get("steps") if rows else None
    for col in (1, 2):
        fig.update_xaxes(title_text="step", row=1, col=col, range=[0, total + 0.5] if total else None)
    fig.update_layout(title=title, height=330, margin=dict(l=40, r=20, t=60, b=40), showlegend=False,
                      template="plotly_white")
    return fig

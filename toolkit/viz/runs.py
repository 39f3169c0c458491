"""The runs of a session compared: accuracy against the target ε and against wall time, one marker per run.

Drawn from a table with one row per run (``run``, ``method``, ``epsilon``, ``accuracy``, ``wall_time_s``; ``pinned``
and ``task`` used when present), as the dashboard's Runs tab keeps it. Pinned runs are drawn larger and labelled
with their number; ε = ∞ (non-private) sits at the right end of the ε axis.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from toolkit.viz.style import METHOD_SYMBOL, add_chance_line, method_colour, ordered_methods, require_columns
from toolkit.vocabulary import format_epsilon, method_label


def runs_comparison_figure(runs: pd.DataFrame, n_eval: int | None = None) -> go.Figure:
    """Two panels sharing the accuracy axis: accuracy (%) vs target ε (log; ∞ at the right end) and vs wall time
    (s). One marker per run, coloured by method; pinned runs (``pinned`` True) larger and numbered. With
    ``n_eval`` the chance line gets its ± 2 standard-error band."""
    require_columns(runs, ["run", "method", "epsilon", "accuracy", "wall_time_s"], "runs_comparison_figure")
    data = runs.copy()
    data["epsilon"] = pd.to_numeric(data["epsilon"].replace({"inf": math.inf, "∞": math.inf}), errors="coerce")
    finite = sorted(e for e in data["epsilon"].dropna().unique() if math.isfinite(e))
    inf_x = finite[-1] * 3 if finite else 1.0
    data["x_eps"] = data["epsilon"].where(np.isfinite(data["epsilon"]), inf_x)
    pinned = data["pinned"].fillna(False).astype(bool) if "pinned" in data else pd.Series(False, index=data.index)
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.06,
                        subplot_titles=("accuracy vs target ε", "accuracy vs wall time of the run"))
    for method in ordered_methods(data["method"]):
        rows = data[data["method"] == method]
        pin = pinned[rows.index]
        sizes = np.where(pin, 16, 9)
        text = [f"#{r}" if p else "" for r, p in zip(rows["run"], pin)]
        hover = [f"run #{r} · {method_label(method)} · ε {format_epsilon(e)} · {100 * a:.1f}% · {t:.0f} s"
                 + (" · pinned" if p else "")
                 for r, e, a, t, p in zip(rows["run"], rows["epsilon"], rows["accuracy"], rows["wall_time_s"], pin)]
        marker = dict(color=method_colour(method), size=sizes, symbol=METHOD_SYMBOL.get(method, "circle"),
                      line=dict(width=np.where(pin, 2, 0.5), color="black"))
        for col, x in ((1, rows["x_eps"]), (2, rows["wall_time_s"])):
            fig.add_trace(go.Scatter(x=x, y=100 * rows["accuracy"], mode="markers+text", text=text,
                                     textposition="top center", marker=marker, name=method_label(method),
                                     legendgroup=method, showlegend=col == 1, hovertext=hover, hoverinfo="text"),
                          row=1, col=col)
    for col in (1, 2):
        add_chance_line(fig, data, n_eval=n_eval, row=1, col=col)
    fig.update_xaxes(type="log", tickvals=finite + [inf_x], ticktext=[format_epsilon(e) for e in finite] + ["∞"],
                     title_text="target ε (log; ∞ = non-private)", row=1, col=1)
    fig.update_xaxes(title_text="wall time (s)", rangemode="tozero", row=1, col=2)
    fig.update_yaxes(title_text="accuracy (%)", row=1, col=1)
    fig.update_layout(template="plotly_white", height=400, margin=dict(l=50, r=20, t=50, b=50),
                      legend=dict(title="method", orientation="h", y=-0.2))
    return fig

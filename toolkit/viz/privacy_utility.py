"""The privacy–utility curve: accuracy vs the target ε, one line per method, from a sweep table.

The one figure of this kind in the toolkit: notebooks, the CLI and the dashboard all draw it with
:func:`privacy_utility_figure` (the dashboard passes ``width=None`` to fill its plot area).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from toolkit.viz.style import (
    add_chance_line, aggregate, method_colour, ordered_methods, require_columns, subtitle, title,
)
from toolkit.vocabulary import format_epsilon, method_label


def privacy_utility_figure(df: pd.DataFrame, metric: str = "accuracy", width: int | None = 760,
                           n_eval: int | None = None) -> go.Figure:
    """Accuracy (%) vs the target ε, one line per method; error bars: ±1 s.d. over seeds.

    Args:
        df: one row per run with ``method``, ``epsilon`` (a number, ``inf`` or the string ``"inf"``) and
            ``metric``; ``seed``, ``epsilon_spent``, ``delta`` and ``task`` are used when present.
        width: in pixels; None lets the figure fill its container.
        n_eval: test records per run; when given, the chance line gets its ± 2 standard-error noise band.

    ε is on a log axis; ε = ∞ (no noise; the only point of ``non-private``, which ignores ε) sits at the right
    end, and the non-private level is also drawn as a dashed line for reference. Hover shows mean, s.d.,
    seeds and the ε actually spent.
    """
    require_columns(df, ["method", "epsilon", metric], "privacy_utility_figure")
    data = df.copy()
    data["epsilon"] = pd.to_numeric(data["epsilon"], errors="coerce")
    finite = sorted(e for e in data["epsilon"].dropna().unique() if math.isfinite(e))
    inf_x = finite[-1] * 3 if finite else 1.0   # where ε = ∞ is drawn: right of every finite ε
    data["x"] = data["epsilon"].where(np.isfinite(data["epsilon"]), inf_x)
    stats = aggregate(data, ["method", "x"], metric)
    spent = None
    if "epsilon_spent" in data:
        spent = aggregate(data.assign(epsilon_spent=pd.to_numeric(data["epsilon_spent"], errors="coerce")),
                          ["method", "x"], "epsilon_spent")
    fig = go.Figure()
    for method in ordered_methods(stats["method"]):
        s = stats[stats["method"] == method].sort_values("x")
        if spent is not None:
            spent_mean = spent[spent["method"] == method].sort_values("x")["mean"].tolist()
        else:
            spent_mean = [None] * len(s)
        eps_text = ["∞" if x == inf_x else format_epsilon(x) for x in s["x"]]
        spent_text = [format_epsilon(v if v is None or np.isfinite(v) else None, digits=2) for v in spent_mean]
        custom = np.stack([s["std"] * 100, s["count"], np.array(eps_text, dtype=object),
                           np.array(spent_text, dtype=object)], axis=1)
        label = method_label(method)
        fig.add_trace(go.Scatter(
            x=s["x"], y=s["mean"] * 100, mode="lines+markers", name=label,
            line=dict(color=method_colour(method)), marker=dict(size=8),
            error_y=dict(type="data", array=s["std"] * 100, visible=True), customdata=custom,
            hovertemplate=(f"{label}<br>target ε = %{{customdata[2]}} (spent %{{customdata[3]}})"
                           "<br>accuracy %{y:.1f}% ± %{customdata[0]:.1f} (n = %{customdata[1]})<extra></extra>"),
        ))
        if method == "non-private":
            fig.add_hline(y=float(s["mean"].iloc[-1]) * 100, line_dash="dash", line_color=method_colour(method),
                          opacity=0.6)
    add_chance_line(fig, data, n_eval=n_eval)
    fig.update_xaxes(type="log", tickvals=finite + [inf_x], ticktext=[format_epsilon(e) for e in finite] + ["∞"],
                     title="target ε (log scale; smaller = more private)")
    fig.update_yaxes(title=f"{metric} (%)" if metric == "accuracy" else metric)
    fig.update_layout(title=title("Privacy-utility: accuracy vs ε", subtitle(data)), template="plotly_white",
                      width=width, height=470, legend=dict(title="method"), margin=dict(t=90))
    return fig

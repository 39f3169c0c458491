"""Plotly figures of the dashboard that the toolkit does not already provide (no training logic here).

* :func:`training_curve_figure`: loss and ε spent per step, with the ε target as a dashed line (live view).
* :func:`memory_figure`: peak memory per method from a ``toolkit.bench.run_bench`` table, ratios as labels.
* :func:`privacy_utility_figure`: accuracy vs ε per method from a sweep table; uses
  ``toolkit.viz.privacy_utility_figure`` when that module exists, else draws the same curve here.
"""
from __future__ import annotations

import math

import pandas as pd

METHOD_COLOURS = {"non-private": "#7f7f7f", "dp-sgd": "#1f77b4", "dual-priv": "#d62728", "dp-zo": "#2ca02c"}


def training_curve_figure(rows: list[dict], epsilon_target: float | None = None, title: str | None = None):
    """Two panels sharing the step axis: training loss, and ε spent so far (dashed line: the target ε)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    steps = [r["step"] for r in rows]
    losses = [r.get("loss") for r in rows]
    eps = [r.get("epsilon_spent") for r in rows]
    private = any(e is not None and math.isfinite(e) for e in eps)
    right = "ε spent" if private else "ε (non-private: ∞)"
    fig = make_subplots(rows=1, cols=2, subplot_titles=("training loss", right))
    fig.add_trace(go.Scatter(x=steps, y=losses, mode="lines+markers", name="loss", marker=dict(size=4),
                             line=dict(color="#1f77b4")), row=1, col=1)
    if private:
        fig.add_trace(go.Scatter(x=steps, y=eps, mode="lines+markers", name="ε spent", marker=dict(size=4),
                                 line=dict(color="#d62728")), row=1, col=2)
        if epsilon_target is not None and math.isfinite(epsilon_target):
            fig.add_hline(y=epsilon_target, line_dash="dash", line_color="grey", row=1, col=2,
                          annotation_text=f"target ε = {epsilon_target:g}", annotation_position="bottom right")
    total = rows[-1].get("steps") if rows else None
    for col in (1, 2):
        fig.update_xaxes(title_text="step", row=1, col=col, range=[0, (total or 1) + 0.5] if total else None)
    fig.update_layout(title=title, height=330, margin=dict(l=40, r=20, t=60, b=40), showlegend=False,
                      template="plotly_white")
    return fig


def memory_figure(table: pd.DataFrame):
    """Bars of peak memory per method, each labelled with its ratio to DP-SGD (and DP-ZO when measured)."""
    import plotly.graph_objects as go

    labels = []
    for _, row in table.iterrows():
        parts = [f"{row['peak_memory_mb']:.1f} MB"]
        for column, name in (("memory_vs_dp_sgd", "DP-SGD"), ("memory_vs_dp_zo", "DP-ZO")):
            value = row.get(column)
            if value is not None and not pd.isna(value):
                parts.append(f"{value:.2f}x {name}")
        labels.append("<br>".join(parts))
    colours = [METHOD_COLOURS.get(m, "#9467bd") for m in table["method"]]
    fig = go.Figure(go.Bar(x=list(table["method"]), y=list(table["peak_memory_mb"]), text=labels,
                           textposition="outside", marker_color=colours, cliponaxis=False))
    device = str(table["device"].iloc[0]) if "device" in table and len(table) else ""
    top = float(table["peak_memory_mb"].max()) if len(table) else 1.0
    fig.update_layout(title=f"Peak memory of one training step ({device}; see the note below)",
                      yaxis_title="peak memory (MB)",
                      height=420, margin=dict(l=50, r=20, t=60, b=40), template="plotly_white",
                      yaxis=dict(range=[0, top * 1.3 if top > 0 else 1]))
    return fig


def privacy_utility_figure(table: pd.DataFrame):
    """Accuracy vs ε per method (mean over seeds, error bars = std). Prefers ``toolkit.viz`` when present."""
    try:
        from toolkit.viz import privacy_utility_figure as toolkit_figure
    except ImportError:
        return fallback_privacy_utility_figure(table)
    fig = toolkit_figure(table)
    fig.update_layout(width=None, autosize=True)  # fill the app's plot area instead of a fixed width
    return fig


def fallback_privacy_utility_figure(table: pd.DataFrame):
    """The privacy–utility curve drawn here: finite ε on the x axis (log scale); non-private (ε = ∞) as a
    dashed horizontal line per method, since it has no place on the ε axis."""
    import plotly.graph_objects as go

    df = table.copy()
    df["epsilon"] = pd.to_numeric(df["epsilon"], errors="coerce")
    df["accuracy"] = pd.to_numeric(df["accuracy"], errors="coerce")
    fig = go.Figure()
    for method, group in df.groupby("method", sort=False):
        colour = METHOD_COLOURS.get(str(method), None)
        finite = group[group["epsilon"].apply(lambda e: math.isfinite(e))]
        infinite = group[group["epsilon"].apply(lambda e: not math.isfinite(e))]
        if len(finite):
            stats = finite.groupby("epsilon")["accuracy"].agg(["mean", "std", "count"]).reset_index()
            fig.add_trace(go.Scatter(
                x=stats["epsilon"], y=stats["mean"], mode="lines+markers", name=str(method),
                line=dict(color=colour), error_y=dict(type="data", array=stats["std"].fillna(0), visible=True),
                customdata=stats["count"], hovertemplate="ε=%{x}<br>accuracy=%{y:.3f}<br>%{customdata} seed(s)",
            ))
        if len(infinite):
            fig.add_hline(y=float(infinite["accuracy"].mean()), line_dash="dash", line_color=colour or "grey",
                          annotation_text=f"{method} (ε = ∞)", annotation_position="top left")
    fig.update_layout(title="Privacy–utility: accuracy vs ε (privacy unit: one record = one source image)",
                      xaxis_title="ε (log scale)", yaxis_title="accuracy", xaxis_type="log", height=420,
                      template="plotly_white", margin=dict(l=50, r=20, t=60, b=40))
    return fig

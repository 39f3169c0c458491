"""The utility study's figures (:mod:`toolkit.sweeps.study`): the tuning arms on validation, and the chosen
configurations on test across ε. Both take the plain records of ``utility-study.json`` (lists of dicts)."""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from toolkit.viz.style import PALETTE, method_colour, title
from toolkit.vocabulary import PRIVACY_UNIT


def tuning_figure(tuning: list[dict], width: int | None = 760) -> go.Figure:
    """Validation accuracy (%) of every tuning arm, best first, winners and losers alike; error bars: ± 1
    standard error over seeds; colour: the method."""
    df = pd.DataFrame(tuning)
    if df.empty:
        raise ValueError("tuning_figure: no tuning arms")
    df = df.sort_values("mean", kind="stable")
    seeds = int(df["count"].max())
    fig = go.Figure(go.Bar(
        x=100 * df["mean"], y=df["arm"], orientation="h", marker_color=[method_colour(m) for m in df["method"]],
        error_x=dict(type="data", array=100 * df["sem"].fillna(0.0), visible=True),
        customdata=df[["steps", "train_time_s"]].to_numpy(),
        hovertemplate="%{y}<br>validation %{x:.1f}%<br>%{customdata[0]} steps, %{customdata[1]:.0f} s of "
                      "training<extra></extra>"))
    fig.update_xaxes(title="validation accuracy (%)")
    fig.update_layout(title=title("Tuning at ε = 3 (validation split)",
                                  f"{seeds} seeds, mean ± 1 s.e.; red: Dual-Priv, blue: DP-SGD; {PRIVACY_UNIT}"),
                      template="plotly_white", width=width, height=120 + 26 * len(df), margin=dict(l=10, t=90))
    return fig


def study_figure(comparison: list[dict], task: str, width: int | None = 760) -> go.Figure:
    """Test accuracy (%) vs ε of each chosen configuration (one line per view); error bars: ± 1 standard error
    over seeds."""
    df = pd.DataFrame(comparison)
    if df.empty:
        raise ValueError("study_figure: no test results")
    fig = go.Figure()
    for colour, (family, rows) in zip(PALETTE[1:] + PALETTE[:1], df.groupby("family", sort=False)):
        rows = rows.sort_values("epsilon")
        fig.add_trace(go.Scatter(
            x=rows["epsilon"], y=rows["mean"], mode="lines+markers", name=f"{family}: {rows['arm'].iloc[0]}",
            line=dict(color=colour), error_y=dict(type="data", array=rows["se"].fillna(0.0), visible=True),
            customdata=rows[["seeds"]].to_numpy(),
            hovertemplate=f"{family}<br>ε = %{{x}}<br>%{{y:.1f}}% (n = %{{customdata[0]}})<extra></extra>"))
    seeds = int(df["seeds"].max())
    fig.update_xaxes(type="log", tickvals=sorted(df["epsilon"].unique()), title="target ε (log scale)")
    fig.update_yaxes(title="test accuracy (%)")
    fig.update_layout(title=title(f"Chosen on validation, measured on test: {task}",
                                  f"up to {seeds} seeds, mean ± 1 s.e.; {PRIVACY_UNIT}"),
                      template="plotly_white", width=width, height=470, legend=dict(orientation="h", y=-0.25),
                      margin=dict(t=90))
    return fig

"""What each part contributes, from the ablation-type sweeps (:func:`toolkit.sweeps.named_sweep`).

* :func:`ablation_flags` / :func:`ablation_contributions` / :func:`ablation_figure`: the 2^4 grid of Dual-Priv's
  four mechanisms (selection, fusion, fusion noise, update pruning) and each one's paired contribution
  (``ablation`` sweep).
* :func:`tokens_accuracy_figure`: accuracy vs visual tokens fed to the LLM, one line per selection strategy
  (``budget`` sweep).
* :func:`lora_rank_figure`: update pruning vs a lower LoRA rank at equal updated parameters (``lora-rank`` sweep).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from toolkit.viz.style import (
    PALETTE, STRATEGY_LABELS, add_chance_line, aggregate, method_colour, require_columns, subtitle, title,
)
from toolkit.vocabulary import format_epsilon, method_label

MECHANISMS = ("selection", "fusion", "fusion noise", "update pruning")


def ablation_flags(df: pd.DataFrame) -> pd.DataFrame:
    """The four on/off mechanisms of each row, from its config columns:

    * ``selection``: on when ``token_strategy`` is ``dual-priv`` ([CLS] attention), off for a random control;
    * ``fusion``: on unless ``contextual_tokens`` is 0 (empty = the strategy's default k > 0);
    * ``fusion noise``: on when ``fusion_noise_std`` is ``matched`` or a number > 0;
    * ``update pruning``: on when ``grad_prune_ratio`` > 0.
    """
    require_columns(df, ["token_strategy", "contextual_tokens", "fusion_noise_std", "grad_prune_ratio"],
                    "ablation_flags")

    def noise_on(v) -> bool:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return False
        if isinstance(v, str):
            if v.strip().lower() in ("", "none", "off", "nan"):
                return False
            if v == "matched":
                return True
            try:
                return float(v) > 0
            except ValueError:
                return True
        return float(v) > 0

    ctx = pd.to_numeric(df["contextual_tokens"], errors="coerce")
    return pd.DataFrame({
        "selection": df["token_strategy"].astype(str).eq("dual-priv").to_numpy(),
        "fusion": ~(ctx == 0).to_numpy(),
        "fusion noise": df["fusion_noise_std"].map(noise_on).astype(bool).to_numpy(),
        "update pruning": (pd.to_numeric(df["grad_prune_ratio"], errors="coerce").fillna(0) > 0).to_numpy(),
    }, index=df.index)


def ablation_contributions(df: pd.DataFrame, metric: str = "accuracy") -> pd.DataFrame:
    """Each mechanism's paired effect: over every pair of cells (same seed) that differ only in that mechanism,
    the mean and s.d. of (on − off). Pairs missing a partner (a skipped combination) are left out."""
    flags = ablation_flags(df)
    data = flags.assign(**{metric: df[metric].to_numpy(), "seed": df["seed"].to_numpy() if "seed" in df else 0})
    rows = []
    for mech in MECHANISMS:
        others = [m for m in MECHANISMS if m != mech] + ["seed"]
        on = data[data[mech]].groupby(others)[metric].mean()
        off = data[~data[mech]].groupby(others)[metric].mean()
        diff = (on - off).dropna()
        rows.append(dict(mechanism=mech, mean=float(diff.mean()) if len(diff) else float("nan"),
                         std=float(diff.std()) if len(diff) > 1 else 0.0, pairs=int(len(diff))))
    return pd.DataFrame(rows)


def ablation_figure(df: pd.DataFrame, metric: str = "accuracy") -> go.Figure:
    """Left: a 4 x 4 heatmap of mean accuracy over the on/off combinations of the four mechanisms (columns:
    selection x fusion; rows: fusion noise x update pruning), each cell printed as mean ± s.d.; combinations
    not run (fusion noise without fused tokens) are blank. Right: each mechanism's paired contribution
    (mean of on − off over cells identical otherwise, error bar 1 s.d.)."""
    require_columns(df, [metric], "ablation_figure")
    data = ablation_flags(df).assign(**{metric: df[metric].to_numpy()})
    yes = {True: "on", False: "off"}
    col_keys = [(s, f) for s in (True, False) for f in (True, False)]
    row_keys = [(n, p) for n in (True, False) for p in (True, False)]
    col_names = [f"{'[CLS]' if s else 'random'} sel.<br>fusion {yes[f]}" for s, f in col_keys]
    row_names = [f"noise {yes[n]}, pruning {yes[p]}" for n, p in row_keys]
    z = np.full((4, 4), np.nan)
    text = [["not run" for _ in range(4)] for _ in range(4)]
    for i, (n, p) in enumerate(row_keys):
        for j, (s, f) in enumerate(col_keys):
            cell = data[(data["selection"] == s) & (data["fusion"] == f) & (data["fusion noise"] == n)
                        & (data["update pruning"] == p)][metric]
            if len(cell):
                z[i, j] = cell.mean() * 100
                sd = cell.std() * 100 if len(cell) > 1 else 0.0
                text[i][j] = f"{z[i, j]:.1f} ± {sd:.1f}" if len(cell) > 1 else f"{z[i, j]:.1f}"
    contrib = ablation_contributions(df, metric)
    fig = make_subplots(rows=1, cols=2, column_widths=[0.62, 0.38], horizontal_spacing=0.2,
                        subplot_titles=(f"mean {metric} (%) per combination", "contribution: on − off (points)"))
    fig.add_trace(go.Heatmap(z=z, x=col_names, y=row_names, text=text, texttemplate="%{text}",
                             colorscale="Viridis", colorbar=dict(title="%", x=0.5, thickness=10),
                             hovertemplate="%{x}<br>%{y}<br>" + metric + " %{z:.1f}%<extra></extra>"), row=1, col=1)
    names = [f"{m}<br>{v * 100:+.1f} ({n} pairs)" if np.isfinite(v) else f"{m}<br>no pairs"
             for m, v, n in zip(contrib["mechanism"], contrib["mean"], contrib["pairs"])]
    fig.add_trace(go.Bar(
        y=names, x=contrib["mean"].fillna(0) * 100, orientation="h",
        error_x=dict(type="data", array=contrib["std"] * 100, visible=True),
        marker_color=["#d62728" if v < 0 else "#2ca02c" for v in contrib["mean"].fillna(0)],
        showlegend=False, hovertemplate="%{y}: %{x:+.2f} points<extra></extra>"), row=1, col=2)
    fig.add_vline(x=0, line_color="#444", row=1, col=2)
    fig.update_yaxes(autorange="reversed", row=1, col=1)
    fig.update_yaxes(autorange="reversed", row=1, col=2)
    eps = df["epsilon"].dropna().unique() if "epsilon" in df else []
    extra = (f"ε = {', '.join(format_epsilon(e) for e in eps)}; 'not run': fusion noise needs fused tokens; "
             "fusion noise is heuristic (outside the DP guarantee)")
    fig.update_layout(title=title("Ablation: what each Dual-Priv mechanism contributes", subtitle(df, extra)),
                      template="plotly_white", width=1100, height=480, margin=dict(t=100, l=150))
    return fig


def tokens_accuracy_figure(df: pd.DataFrame, metric: str = "accuracy", group: str = "token_strategy") -> go.Figure:
    """Accuracy (%) vs visual tokens fed to the LLM, one line per ``group`` (selection strategy by default);
    error bars ±1 s.d. over seeds. The right end is the full token count when no token is pruned."""
    require_columns(df, ["visual_tokens", metric, group], "tokens_accuracy_figure")
    stats = aggregate(df, [group, "visual_tokens"], metric)
    fig = go.Figure()
    for i, key in enumerate(sorted(stats[group].astype(str).unique())):
        s = stats[stats[group].astype(str) == key].sort_values("visual_tokens")
        name = STRATEGY_LABELS.get(key, key) if group == "token_strategy" else method_label(key)
        fig.add_trace(go.Scatter(
            x=s["visual_tokens"], y=s["mean"] * 100, mode="lines+markers", name=name,
            line=dict(color=method_colour(key) if group == "method" else PALETTE[i % len(PALETTE)]),
            error_y=dict(type="data", array=s["std"] * 100, visible=True), customdata=s["count"],
            hovertemplate=name + "<br>%{x} visual tokens: %{y:.1f}% (n = %{customdata})<extra></extra>"))
    add_chance_line(fig, df)
    has_n_in = "visual_tokens_in" in df and df["visual_tokens_in"].notna().any()
    n_in = int(df["visual_tokens_in"].max()) if has_n_in else None
    extra = f"{n_in} patches in" if n_in else ""
    if "epsilon" in df and df["epsilon"].notna().any():
        extra += f"; ε = {', '.join(format_epsilon(e) for e in sorted(df['epsilon'].dropna().unique()))}"
    fig.update_xaxes(title="visual tokens fed to the LLM")
    fig.update_yaxes(title=f"{metric} (%)")
    fig.update_layout(title=title("Accuracy vs visual tokens", subtitle(df, extra.strip("; "))),
                      template="plotly_white", width=760, height=470, legend=dict(title="selection"),
                      margin=dict(t=90))
    return fig


def lora_rank_figure(df: pd.DataFrame, metric: str = "accuracy") -> go.Figure:
    """Accuracy of "rank r + update pruning p" vs "rank r' without pruning" at (nearly) equal updated parameters
    per step, one group per pair; the full-rank unpruned reference as a dashed line. Needs the ``lora-rank``
    sweep's ``arm``/``pair``/``arm_kind`` columns (else groups by ``lora_rank`` x ``grad_prune_ratio``)."""
    require_columns(df, [metric, "lora_rank", "grad_prune_ratio"], "lora_rank_figure")
    data = df.copy()
    if "arm" not in data:
        data["arm"] = [f"r={int(r)}, prune {p:g}" for r, p in zip(data["lora_rank"], data["grad_prune_ratio"])]
        data["arm_kind"] = np.where(data["grad_prune_ratio"] > 0, "update pruning", "lower rank")
        data["pair"] = "all"
    stats = data.groupby(["pair", "arm_kind", "arm"], sort=False).agg(
        mean=(metric, "mean"), std=(metric, "std"), n=(metric, "count"),
        updated=("updated_params", "median") if "updated_params" in data else (metric, "count")).reset_index()
    stats["std"] = stats["std"].fillna(0)
    fig = go.Figure()
    colours = {"update pruning": "#d62728", "lower rank": "#1f77b4", "reference": "#7f7f7f"}
    ref = stats[stats["arm_kind"] == "reference"]
    for kind in ("update pruning", "lower rank"):
        s = stats[stats["arm_kind"] == kind]
        if s.empty:
            continue
        fig.add_trace(go.Bar(
            x=[s["pair"].tolist(), s["arm"].tolist()], y=s["mean"] * 100, name=kind, marker_color=colours[kind],
            error_y=dict(type="data", array=s["std"] * 100, visible=True),
            text=[f"{m * 100:.1f}%<br>{int(u):,} upd." for m, u in zip(s["mean"], s["updated"])],
            textposition="inside", textangle=0, insidetextanchor="middle", customdata=s["n"],
            hovertemplate="%{x}<br>%{y:.1f}% (n = %{customdata})<extra></extra>"))
    if not ref.empty:
        fig.add_hline(y=float(ref["mean"].iloc[0]) * 100, line_dash="dash", line_color=colours["reference"],
                      annotation_text=f"reference {ref['arm'].iloc[0]}: {ref['mean'].iloc[0] * 100:.1f}%",
                      annotation_position="top left")
    add_chance_line(fig, data)
    fig.update_xaxes(title="matched pair (share of the rank-r trainable parameters updated per step) and arm")
    fig.update_yaxes(title=f"{metric} (%)", rangemode="tozero")
    fig.update_layout(barmode="overlay", template="plotly_white", width=860, height=500, margin=dict(t=100),
                      title=title("Update pruning vs a lower LoRA rank at equal updated parameters",
                                   subtitle(data, "r' matched from trainable counts")))
    return fig

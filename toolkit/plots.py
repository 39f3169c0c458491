"""Figures from a sweep DataFrame (:func:`toolkit.sweeps.run_sweep`) or a bench table (:mod:`toolkit.bench`).

Every function takes the DataFrame and returns a ``plotly.graph_objects.Figure`` whose title and subtitle say
what is plotted, over how many seeds, and what the error bars are, so the figure reads without the code.
:func:`save_figure` (from :mod:`toolkit.tokens.overlay`) writes ``.html`` (always) or ``.png``/``.svg``/``.pdf``
(kaleido + Chromium).

* :func:`privacy_utility_figure`: accuracy vs ε per method, mean ± 1 s.d. over seeds, ε = ∞ at the right end.
* :func:`memory_time_figure`: peak memory and step time per method, with each bar's ratio to DP-SGD printed.
* :func:`ablation_figure`: the 2^4 mechanism grid as a heatmap, and each mechanism's paired contribution.
* :func:`tokens_accuracy_figure`: accuracy vs visual tokens fed to the LLM, one line per selection strategy.
* :func:`flops_memory_figure`: the analytic FLOPs per step (:mod:`toolkit.flops`) next to measured peak memory.
* :func:`lora_rank_figure`: update pruning vs a lower LoRA rank at equal updated parameters.
* :func:`scaling_figure`: peak memory and step time as visual tokens or batch size grow.

Privacy unit everywhere: one record = one source image (ε is per image).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from toolkit.tokens.overlay import ImageExportError, save_figure  # noqa: F401  (re-exported)

METHOD_ORDER = ("non-private", "dp-sgd", "dual-priv", "dp-zo")
METHOD_LABELS = {"non-private": "non-private", "dp-sgd": "DP-SGD", "dual-priv": "Dual-Priv", "dp-zo": "DP-ZO"}
METHOD_COLOURS = {"non-private": "#7f7f7f", "dp-sgd": "#1f77b4", "dual-priv": "#d62728", "dp-zo": "#2ca02c"}
METHOD_DASH = {"non-private": "dot", "dp-sgd": "solid", "dual-priv": "dash", "dp-zo": "dashdot"}
METHOD_SYMBOL = {"non-private": "circle-open", "dp-sgd": "circle", "dual-priv": "diamond", "dp-zo": "square"}
STRATEGY_LABELS = {"dual-priv": "[CLS] attention + fusion (Dual-Priv)", "dual-priv-random": "random + fusion",
                   "random": "random", "pool": "average pooling", "uniform": "uniform stride",
                   "divprune": "DivPrune", "mean-attention": "mean attention", "none": "all tokens"}
PRIVACY_UNIT = "privacy unit: one record = one source image"
PALETTE = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22")


def _require(df: pd.DataFrame, columns, figure: str) -> pd.DataFrame:
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"{figure} needs a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{figure}: the DataFrame lacks column(s) {missing} (has {list(df.columns)})")
    if df.empty:
        raise ValueError(f"{figure}: the DataFrame has no rows")
    return df


def _methods(values) -> list[str]:
    present = [m for m in METHOD_ORDER if m in set(values)]
    return present + sorted(set(values) - set(present))


def _label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def _agg(df: pd.DataFrame, by: list[str], value: str) -> pd.DataFrame:
    out = df.groupby(by, dropna=False, sort=True)[value].agg(["mean", "std", "count"]).reset_index()
    out["std"] = out["std"].fillna(0.0)
    return out


def _subtitle(df: pd.DataFrame, extra: str = "") -> str:
    seeds = df["seed"].nunique() if "seed" in df else 1
    parts = [f"{seeds} seed{'s' if seeds != 1 else ''}" + (", mean ± 1 s.d." if seeds > 1 else "")]
    if "delta" in df and df["delta"].notna().any():
        parts.append(f"δ = {df['delta'].dropna().iloc[0]:g}")
    if "task" in df and df["task"].notna().any():
        parts.append(f"task: {', '.join(sorted(df['task'].dropna().astype(str).unique()))}")
    parts.append(PRIVACY_UNIT)
    if extra:
        parts.append(extra)
    return "; ".join(parts)


def _title(text: str, sub: str) -> dict:
    return dict(text=f"{text}<br><sup>{sub}</sup>", x=0.01, xanchor="left")


def _chance(df: pd.DataFrame) -> float | None:
    from toolkit.data import TASKS

    if "task" not in df:
        return None
    tasks = df["task"].dropna().astype(str).unique()
    if len(tasks) != 1 or tasks[0] not in TASKS:
        return None
    return 1.0 / len(TASKS[tasks[0]][3])


def _add_chance(fig, df, **where) -> None:
    chance = _chance(df)
    if chance is not None:
        fig.add_hline(y=100 * chance, line_dash="dot", line_color="#999999",
                      annotation_text=f"chance {100 * chance:.0f}%", annotation_position="bottom right", **where)


# --------------------------------------------------------------------------------------- privacy-utility

def privacy_utility_figure(df: pd.DataFrame, metric: str = "accuracy"):
    """Accuracy (%) vs the target ε, one line per method; error bars: ±1 s.d. over seeds.

    ε is on a log axis; ε = ∞ (no noise; the only point of ``non-private``, which ignores ε) sits at the right
    end, and the non-private level is also drawn as a dashed line for reference. Hover shows mean, s.d.,
    seeds and the ε actually spent.
    """
    import plotly.graph_objects as go

    _require(df, ["method", "epsilon", metric], "privacy_utility_figure")
    data = df.copy()
    data["epsilon"] = pd.to_numeric(data["epsilon"], errors="coerce")
    finite = sorted(e for e in data["epsilon"].dropna().unique() if math.isfinite(e))
    inf_x = (finite[-1] * 3 if finite else 1.0)
    data["x"] = data["epsilon"].where(np.isfinite(data["epsilon"]), inf_x)
    stats = _agg(data, ["method", "x"], metric)
    spent = _agg(data.assign(epsilon_spent=pd.to_numeric(data.get("epsilon_spent"), errors="coerce")),
                 ["method", "x"], "epsilon_spent") if "epsilon_spent" in data else None
    fig = go.Figure()
    for method in _methods(stats["method"]):
        s = stats[stats["method"] == method].sort_values("x")
        sp = spent[spent["method"] == method].sort_values("x")["mean"].tolist() if spent is not None else [None] * len(s)
        eps_text = ["∞" if x == inf_x else f"{x:g}" for x in s["x"]]
        custom = np.stack([s["std"] * 100, s["count"], np.array(eps_text, dtype=object),
                           np.array([("∞" if (v is None or not np.isfinite(v)) else f"{v:.2f}") for v in sp],
                                    dtype=object)], axis=1)
        fig.add_trace(go.Scatter(
            x=s["x"], y=s["mean"] * 100, mode="lines+markers", name=_label(method),
            line=dict(color=METHOD_COLOURS.get(method)), marker=dict(size=8),
            error_y=dict(type="data", array=s["std"] * 100, visible=True), customdata=custom,
            hovertemplate=(f"{_label(method)}<br>target ε = %{{customdata[2]}} (spent %{{customdata[3]}})"
                           "<br>accuracy %{y:.1f}% ± %{customdata[0]:.1f} (n = %{customdata[1]})<extra></extra>"),
        ))
        if method == "non-private":
            fig.add_hline(y=float(s["mean"].iloc[-1]) * 100, line_dash="dash",
                          line_color=METHOD_COLOURS["non-private"], opacity=0.6)
    _add_chance(fig, data)
    ticks = finite + [inf_x]
    fig.update_xaxes(type="log", tickvals=ticks, ticktext=[f"{e:g}" for e in finite] + ["∞"],
                     title="target ε (log scale; smaller = more private)")
    fig.update_yaxes(title=f"{metric} (%)" if metric == "accuracy" else metric)
    fig.update_layout(title=_title("Privacy-utility: accuracy vs ε", _subtitle(data)), template="plotly_white",
                      width=760, height=470, legend=dict(title="method"), margin=dict(t=90))
    return fig


# ---------------------------------------------------------------------------------------- memory & time

def _ratio_text(values: pd.Series, methods: list[str], reference: str, unit: str, fmt: str) -> list[str]:
    ref = values.get(reference)
    out = []
    for m in methods:
        text = f"{values[m]:{fmt}} {unit}"
        if ref is not None and np.isfinite(ref) and ref > 0 and np.isfinite(values[m]):
            text += f"<br>{values[m] / ref:.2f}× {_label(reference)}"
        out.append(text)
    return out


def memory_time_figure(df: pd.DataFrame, reference: str = "dp-sgd"):
    """Peak memory (MB) and step time (s) per method, bars side by side, the ratio to ``reference`` printed on
    every bar. Several rows per method (seeds, ε) are summarised by their median."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    _require(df, ["method", "peak_memory_mb", "step_time_s"], "memory_time_figure")
    med = df.groupby("method")[["peak_memory_mb", "step_time_s"]].median()
    methods = _methods(med.index)
    reference = reference if reference in methods else methods[0]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("peak memory of one step (MB)", "time per step (s)"))
    for col, (metric, unit, fmt) in enumerate((("peak_memory_mb", "MB", ".0f"), ("step_time_s", "s", ".3f")), 1):
        values = med[metric]
        fig.add_trace(go.Bar(
            x=[_label(m) for m in methods], y=[values[m] for m in methods],
            marker_color=[METHOD_COLOURS.get(m, "#444") for m in methods],
            text=_ratio_text(values, methods, reference, unit, fmt), textposition="outside", cliponaxis=False,
            showlegend=False, hovertemplate="%{x}: %{y:.4g} " + unit + "<extra></extra>",
        ), row=1, col=col)
    notes = []
    for column in ("memory_method", "device"):
        if column in df and df[column].notna().any():
            notes.append(", ".join(sorted(df[column].dropna().astype(str).unique())))
    if "visual_tokens" in df:
        vt = df.groupby("method")["visual_tokens"].median()
        notes.append("visual tokens: " + ", ".join(f"{_label(m)} {int(vt[m])}" for m in methods if m in vt))
    sub = f"median over rows per method; ratios vs {_label(reference)}; " + "; ".join(notes)
    fig.update_yaxes(rangemode="tozero")
    for col in (1, 2):
        top = float(np.nanmax(med.iloc[:, col - 1].to_numpy()))
        if np.isfinite(top) and top > 0:
            fig.update_yaxes(range=[0, top * 1.3], row=1, col=col)
    fig.update_layout(title=_title("Memory and time per training step, by method", sub), template="plotly_white",
                      width=900, height=460, margin=dict(t=100))
    return fig


# ---------------------------------------------------------------------------------------------- ablation

MECHANISMS = ("selection", "fusion", "fusion noise", "update pruning")


def ablation_flags(df: pd.DataFrame) -> pd.DataFrame:
    """The four on/off mechanisms of each row, from its config columns:

    * ``selection``: on when ``token_strategy`` is ``dual-priv`` ([CLS] attention), off for a random control;
    * ``fusion``: on unless ``contextual_tokens`` is 0 (empty = the strategy's default k > 0);
    * ``fusion noise``: on when ``fusion_noise_std`` is ``matched`` or a number > 0;
    * ``update pruning``: on when ``grad_prune_ratio`` > 0.
    """
    _require(df, ["token_strategy", "contextual_tokens", "fusion_noise_std", "grad_prune_ratio"], "ablation_flags")

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


def ablation_figure(df: pd.DataFrame, metric: str = "accuracy"):
    """Left: a 4 x 4 heatmap of mean accuracy over the on/off combinations of the four mechanisms (columns:
    selection x fusion; rows: fusion noise x update pruning), each cell printed as mean ± s.d.; combinations
    not run (fusion noise without fused tokens) are blank. Right: each mechanism's paired contribution
    (mean of on − off over cells identical otherwise, error bar 1 s.d.)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    _require(df, [metric], "ablation_figure")
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
    extra = (f"ε = {', '.join(f'{e:g}' for e in eps)}; 'not run': fusion noise needs fused tokens; "
             "fusion noise is heuristic (outside the DP guarantee)")
    fig.update_layout(title=_title("Ablation: what each Dual-Priv mechanism contributes", _subtitle(df, extra)),
                      template="plotly_white", width=1100, height=480, margin=dict(t=100, l=150))
    return fig


# ---------------------------------------------------------------------------------------- visual tokens

def tokens_accuracy_figure(df: pd.DataFrame, metric: str = "accuracy", group: str = "token_strategy"):
    """Accuracy (%) vs visual tokens fed to the LLM, one line per ``group`` (selection strategy by default);
    error bars ±1 s.d. over seeds. The right end is the full token count when no token is pruned."""
    import plotly.graph_objects as go

    _require(df, ["visual_tokens", metric, group], "tokens_accuracy_figure")
    stats = _agg(df, [group, "visual_tokens"], metric)
    fig = go.Figure()
    for i, key in enumerate(sorted(stats[group].astype(str).unique())):
        s = stats[stats[group].astype(str) == key].sort_values("visual_tokens")
        name = STRATEGY_LABELS.get(key, key) if group == "token_strategy" else _label(key)
        fig.add_trace(go.Scatter(
            x=s["visual_tokens"], y=s["mean"] * 100, mode="lines+markers", name=name,
            line=dict(color=METHOD_COLOURS.get(key) if group == "method" else PALETTE[i % len(PALETTE)]),
            error_y=dict(type="data", array=s["std"] * 100, visible=True), customdata=s["count"],
            hovertemplate=name + "<br>%{x} visual tokens: %{y:.1f}% (n = %{customdata})<extra></extra>"))
    _add_chance(fig, df)
    n_in = int(df["visual_tokens_in"].max()) if "visual_tokens_in" in df and df["visual_tokens_in"].notna().any() else None
    extra = f"{n_in} patches in" if n_in else ""
    if "epsilon" in df and df["epsilon"].notna().any():
        extra += f"; ε = {', '.join(f'{e:g}' for e in sorted(df['epsilon'].dropna().unique()))}"
    fig.update_xaxes(title="visual tokens fed to the LLM")
    fig.update_yaxes(title=f"{metric} (%)")
    fig.update_layout(title=_title("Accuracy vs visual tokens", _subtitle(df, extra.strip("; "))),
                      template="plotly_white", width=760, height=470, legend=dict(title="selection"),
                      margin=dict(t=90))
    return fig


# --------------------------------------------------------------------------------------------- FLOPs

def flops_memory_figure(df: pd.DataFrame, reference: str = "dp-sgd"):
    """Left: the analytic FLOPs of one step per method (:func:`toolkit.flops.estimate_step_flops`), stacked as
    forward / backward / DP per-example overhead / DP-ZO's second forward; right: the measured peak memory.
    Each method is taken at its median visual tokens and batch in ``df``; ratios vs ``reference`` printed."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from toolkit.flops import flops_for_rows

    _require(df, ["method", "visual_tokens", "peak_memory_mb"], "flops_memory_figure")
    if "expected_batch_size" not in df and "batch_size" not in df:
        raise ValueError("flops_memory_figure: the DataFrame needs expected_batch_size or batch_size")
    batch_col = "expected_batch_size" if "expected_batch_size" in df else "batch_size"
    one = df.sort_values(["method"]).groupby("method", as_index=False).agg(
        {c: "first" for c in df.columns if c not in ("method", "visual_tokens", batch_col, "peak_memory_mb")}
        | {"visual_tokens": "median", batch_col: "median", "peak_memory_mb": "median"})
    est = flops_for_rows(one)
    methods = _methods(est["method"])
    est = est.set_index("method").loc[methods]
    labels = [_label(m) for m in methods]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("estimated GFLOPs per step (LLM part)",
                                                        "measured peak memory (MB)"))
    parts = (("gflops_forward", "forward", "#9ecae1"), ("gflops_backward", "backward", "#3182bd"),
             ("gflops_dp_overhead", "DP per-example grads + clipping", "#e6550d"),
             ("gflops_zo_extra", "DP-ZO second forward", "#31a354"), ("gflops_tower", "vision tower", "#bbbbbb"))
    for column, name, colour in parts:
        if (est[column] > 0).any():
            fig.add_trace(go.Bar(x=labels, y=est[column], name=name, marker_color=colour,
                                 hovertemplate="%{x} " + name + ": %{y:.4g} GFLOPs<extra></extra>"), row=1, col=1)
    total = est["gflops_step"]
    fig.add_trace(go.Scatter(x=labels, y=total * 1.02, mode="text", showlegend=False, cliponaxis=False,
                             text=_ratio_text(total, methods, reference if reference in methods else methods[0],
                                              "GF", ".3g"), textposition="top center", hoverinfo="skip"),
                  row=1, col=1)
    mem = est["peak_memory_mb"].astype(float)
    fig.add_trace(go.Bar(x=labels, y=mem, marker_color=[METHOD_COLOURS.get(m, "#444") for m in methods],
                         text=_ratio_text(mem, methods, reference if reference in methods else methods[0], "MB", ".0f"),
                         textposition="outside", cliponaxis=False, showlegend=False,
                         hovertemplate="%{x}: %{y:.0f} MB<extra></extra>"), row=1, col=2)
    for col, top in ((1, float(total.max())), (2, float(np.nanmax(mem.to_numpy())) if mem.notna().any() else 0)):
        if top > 0:
            fig.update_yaxes(range=[0, top * 1.35], row=1, col=col)
    sub = (f"batch {int(est[batch_col].iloc[0])}, visual tokens: "
           + ", ".join(f"{_label(m)} {int(est.loc[m, 'visual_tokens'])}" for m in methods)
           + "; FLOPs = matmuls only; "
           + ("vision tower inside the step (as benchmarked)" if (est["gflops_tower"] > 0).any()
              else "vision tower outside the step (features computed once per example)"))
    fig.update_layout(barmode="stack", title=_title("Compute and memory per training step", sub),
                      template="plotly_white", width=1000, height=480, margin=dict(t=100),
                      legend=dict(orientation="h", y=-0.15))
    return fig


# ------------------------------------------------------------------------------------------ LoRA rank

def lora_rank_figure(df: pd.DataFrame, metric: str = "accuracy"):
    """Accuracy of "rank r + update pruning p" vs "rank r' without pruning" at (nearly) equal updated parameters
    per step, one group per pair; the full-rank unpruned reference as a dashed line. Needs the ``lora-rank``
    sweep's ``arm``/``pair``/``arm_kind`` columns (else groups by ``lora_rank`` x ``grad_prune_ratio``)."""
    import plotly.graph_objects as go

    _require(df, [metric, "lora_rank", "grad_prune_ratio"], "lora_rank_figure")
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
    _add_chance(fig, data)
    fig.update_xaxes(title="matched pair (share of the rank-r trainable parameters updated per step) and arm")
    fig.update_yaxes(title=f"{metric} (%)", rangemode="tozero")
    fig.update_layout(barmode="overlay", template="plotly_white", width=860, height=500, margin=dict(t=100),
                      title=_title("Update pruning vs a lower LoRA rank at equal updated parameters",
                                   _subtitle(data, "r' matched from trainable counts")))
    return fig


# -------------------------------------------------------------------------------------------- scaling

def scaling_figure(df: pd.DataFrame, x: str = "visual_tokens", metrics=("peak_memory_mb", "step_time_s")):
    """How peak memory and step time grow with ``x`` (``visual_tokens`` or ``batch_size``), one line per method
    (median over repeated rows)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    _require(df, ["method", x, *metrics], "scaling_figure")
    titles = {"peak_memory_mb": "peak memory (MB)", "step_time_s": "time per step (s)",
              "gflops_step": "estimated GFLOPs per step"}
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[titles.get(m, m) for m in metrics])
    med = df.groupby(["method", x])[list(metrics)].median().reset_index()
    for method in _methods(med["method"]):
        s = med[med["method"] == method].sort_values(x)
        for col, metric in enumerate(metrics, 1):
            fig.add_trace(go.Scatter(x=s[x], y=s[metric], mode="lines+markers", name=_label(method),
                                     legendgroup=method, showlegend=col == 1,
                                     line=dict(color=METHOD_COLOURS.get(method), dash=METHOD_DASH.get(method)),
                                     marker=dict(symbol=METHOD_SYMBOL.get(method), size=8)), row=1, col=col)
    for col in range(1, len(metrics) + 1):
        fig.update_xaxes(title=x.replace("_", " "), row=1, col=col)
        fig.update_yaxes(rangemode="tozero", row=1, col=col)
    sub = "median over repeated rows; coinciding methods overlap (distinct dashes and markers)"
    if "device" in df and df["device"].notna().any():
        sub += "; device: " + ", ".join(sorted(df["device"].dropna().astype(str).unique()))
    fig.update_layout(title=_title(f"Memory and time as {x.replace('_', ' ')} grows", sub),
                      template="plotly_white", width=1000, height=440, margin=dict(t=90))
    return fig


__all__ = ["privacy_utility_figure", "memory_time_figure", "ablation_figure", "ablation_flags",
           "ablation_contributions", "tokens_accuracy_figure", "flops_memory_figure", "lora_rank_figure",
           "scaling_figure", "save_figure", "ImageExportError", "METHOD_LABELS", "METHOD_COLOURS"]

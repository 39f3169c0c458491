"""Cost figures: peak memory, step time and FLOPs per method, from a bench table (:func:`toolkit.bench.run_bench`)
or a sweep table.

* :func:`memory_time_figure`: peak memory and step time side by side, each bar's ratio to DP-SGD printed.
* :func:`peak_memory_figure`: peak memory alone, each bar's ratio to DP-SGD and DP-ZO printed (the dashboard's
  Memory tab, whose table holds those ratios).
* :func:`flops_memory_figure`: the analytic FLOPs per step (:mod:`toolkit.flops`) next to the measured peak memory.
* :func:`scaling_figure`: peak memory and step time as visual tokens or batch size grow.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from toolkit.flops import flops_for_rows
from toolkit.viz.style import (
    METHOD_DASH, METHOD_SYMBOL, method_colour, ordered_methods, ratio_text, require_columns, title,
)
from toolkit.vocabulary import method_label


def memory_time_figure(df: pd.DataFrame, reference: str = "dp-sgd") -> go.Figure:
    """Peak memory (MB) and step time (s) per method, bars side by side, the ratio to ``reference`` printed on
    every bar. Several rows per method (seeds, ε) are summarised by their median."""
    require_columns(df, ["method", "peak_memory_mb", "step_time_s"], "memory_time_figure")
    med = df.groupby("method")[["peak_memory_mb", "step_time_s"]].median()
    methods = ordered_methods(med.index)
    reference = reference if reference in methods else methods[0]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("peak memory of one step (MB)", "time per step (s)"))
    for col, (metric, unit, fmt) in enumerate((("peak_memory_mb", "MB", ".0f"), ("step_time_s", "s", ".3f")), 1):
        values = med[metric]
        fig.add_trace(go.Bar(
            x=[method_label(m) for m in methods], y=[values[m] for m in methods],
            marker_color=[method_colour(m) for m in methods],
            text=ratio_text(values, methods, reference, unit, fmt), textposition="outside", cliponaxis=False,
            showlegend=False, hovertemplate="%{x}: %{y:.4g} " + unit + "<extra></extra>",
        ), row=1, col=col)
    notes = []
    for column in ("memory_method", "device"):
        if column in df and df[column].notna().any():
            notes.append(", ".join(sorted(df[column].dropna().astype(str).unique())))
    if "visual_tokens" in df:
        vt = df.groupby("method")["visual_tokens"].median()
        notes.append("visual tokens: " + ", ".join(f"{method_label(m)} {int(vt[m])}" for m in methods if m in vt))
    sub = f"median over rows per method; ratios vs {method_label(reference)}; " + "; ".join(notes)
    fig.update_yaxes(rangemode="tozero")
    for col in (1, 2):
        top = float(np.nanmax(med.iloc[:, col - 1].to_numpy()))
        if np.isfinite(top) and top > 0:
            fig.update_yaxes(range=[0, top * 1.3], row=1, col=col)
    fig.update_layout(title=title("Memory and time per training step, by method", sub), template="plotly_white",
                      width=900, height=460, margin=dict(t=100))
    return fig


def peak_memory_figure(table: pd.DataFrame) -> go.Figure:
    """Bars of peak memory per method (one row each, as :func:`toolkit.bench.run_bench` returns), each labelled
    with its ratio to DP-SGD and to DP-ZO when the table has them (``memory_vs_dp_sgd``, ``memory_vs_dp_zo``).
    With ``peak_memory_mb_min`` / ``peak_memory_mb_max`` (repeated measurements; the bar is then their median)
    a whisker shows the min–max spread and the subtitle says over how many ``repeats``. Fills its container's
    width."""
    require_columns(table, ["method", "peak_memory_mb"], "peak_memory_figure")
    labels = []
    for _, row in table.iterrows():
        parts = [f"{row['peak_memory_mb']:.1f} MB"]
        for column, reference in (("memory_vs_dp_sgd", "dp-sgd"), ("memory_vs_dp_zo", "dp-zo")):
            value = row.get(column)
            if value is not None and not pd.isna(value):
                parts.append(f"{value:.2f}× {method_label(reference)}")
        labels.append("<br>".join(parts))
    methods = list(table["method"])
    spread = {"peak_memory_mb_min", "peak_memory_mb_max"} <= set(table.columns)
    error = None
    if spread:
        error = dict(type="data", symmetric=False, color="#333333", thickness=1.5, width=8,
                     array=(table["peak_memory_mb_max"] - table["peak_memory_mb"]).clip(lower=0).tolist(),
                     arrayminus=(table["peak_memory_mb"] - table["peak_memory_mb_min"]).clip(lower=0).tolist())
    fig = go.Figure(go.Bar(x=[method_label(m) for m in methods], y=list(table["peak_memory_mb"]), text=labels,
                           textposition="outside", marker_color=[method_colour(m) for m in methods],
                           cliponaxis=False, error_y=error))
    device = str(table["device"].iloc[0]) if "device" in table else ""
    preset = f"preset {table['preset'].iloc[0]}, " if "preset" in table else ""
    repeats = int(table["repeats"].iloc[0]) if "repeats" in table else 1
    how = (f"median of {repeats} measurements, whiskers min–max" if spread and repeats > 1 else "one measurement")
    top = float((table["peak_memory_mb_max"] if spread else table["peak_memory_mb"]).max())
    fig.update_layout(title=title("Peak memory of one training step", f"{preset}{device}; {how}; see the note below"),
                      yaxis_title="peak memory (MB)", height=440, margin=dict(l=50, r=20, t=80, b=40),
                      template="plotly_white", yaxis=dict(range=[0, top * 1.35 if top > 0 else 1]))
    return fig


def flops_memory_figure(df: pd.DataFrame, reference: str = "dp-sgd") -> go.Figure:
    """Left: the analytic FLOPs of one step per method (:func:`toolkit.flops.estimate_step_flops`), stacked as
    forward / backward / DP per-example overhead / DP-ZO's second forward; right: the measured peak memory.
    Each method is taken at its median visual tokens and batch in ``df``; ratios vs ``reference`` printed."""
    require_columns(df, ["method", "visual_tokens", "peak_memory_mb"], "flops_memory_figure")
    if "expected_batch_size" not in df and "batch_size" not in df:
        raise ValueError("flops_memory_figure: the DataFrame needs expected_batch_size or batch_size")
    batch_col = "expected_batch_size" if "expected_batch_size" in df else "batch_size"
    one = df.sort_values(["method"]).groupby("method", as_index=False).agg(
        {c: "first" for c in df.columns if c not in ("method", "visual_tokens", batch_col, "peak_memory_mb")}
        | {"visual_tokens": "median", batch_col: "median", "peak_memory_mb": "median"})
    est = flops_for_rows(one)
    methods = ordered_methods(est["method"])
    est = est.set_index("method").loc[methods]
    reference = reference if reference in methods else methods[0]
    labels = [method_label(m) for m in methods]
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
                             text=ratio_text(total, methods, reference, "GF", ".3g"), textposition="top center",
                             hoverinfo="skip"), row=1, col=1)
    mem = est["peak_memory_mb"].astype(float)
    fig.add_trace(go.Bar(x=labels, y=mem, marker_color=[method_colour(m) for m in methods],
                         text=ratio_text(mem, methods, reference, "MB", ".0f"), textposition="outside",
                         cliponaxis=False, showlegend=False, hovertemplate="%{x}: %{y:.0f} MB<extra></extra>"),
                  row=1, col=2)
    for col, top in ((1, float(total.max())), (2, float(np.nanmax(mem.to_numpy())) if mem.notna().any() else 0)):
        if top > 0:
            fig.update_yaxes(range=[0, top * 1.35], row=1, col=col)
    sub = (f"batch {int(est[batch_col].iloc[0])}, visual tokens: "
           + ", ".join(f"{method_label(m)} {int(est.loc[m, 'visual_tokens'])}" for m in methods)
           + "; FLOPs = matmuls only; "
           + ("vision tower inside the step (as benchmarked)" if (est["gflops_tower"] > 0).any()
              else "vision tower outside the step (features computed once per example)"))
    fig.update_layout(barmode="stack", title=title("Compute and memory per training step", sub),
                      template="plotly_white", width=1000, height=480, margin=dict(t=100),
                      legend=dict(orientation="h", y=-0.15))
    return fig


def scaling_figure(df: pd.DataFrame, x: str = "visual_tokens",
                   metrics=("peak_memory_mb", "step_time_s")) -> go.Figure:
    """How peak memory and step time grow with ``x`` (``visual_tokens`` or ``batch_size``), one line per method
    (median over repeated rows)."""
    require_columns(df, ["method", x, *metrics], "scaling_figure")
    titles = {"peak_memory_mb": "peak memory (MB)", "step_time_s": "time per step (s)",
              "gflops_step": "estimated GFLOPs per step"}
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[titles.get(m, m) for m in metrics])
    med = df.groupby(["method", x])[list(metrics)].median().reset_index()
    for method in ordered_methods(med["method"]):
        s = med[med["method"] == method].sort_values(x)
        for col, metric in enumerate(metrics, 1):
            fig.add_trace(go.Scatter(x=s[x], y=s[metric], mode="lines+markers", name=method_label(method),
                                     legendgroup=method, showlegend=col == 1,
                                     line=dict(color=method_colour(method), dash=METHOD_DASH.get(method)),
                                     marker=dict(symbol=METHOD_SYMBOL.get(method), size=8)), row=1, col=col)
    for col in range(1, len(metrics) + 1):
        fig.update_xaxes(title=x.replace("_", " "), row=1, col=col)
        fig.update_yaxes(rangemode="tozero", row=1, col=col)
    sub = "median over repeated rows; coinciding methods overlap (distinct dashes and markers)"
    if "device" in df and df["device"].notna().any():
        sub += "; device: " + ", ".join(sorted(df["device"].dropna().astype(str).unique()))
    fig.update_layout(title=title(f"Memory and time as {x.replace('_', ' ')} grows", sub),
                      template="plotly_white", width=1000, height=440, margin=dict(t=90))
    return fig

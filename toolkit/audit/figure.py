"""The audit's table and figure (one row / one marker per audited run; see :mod:`toolkit.audit`)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from toolkit.audit.run import AuditResult
from toolkit.vocabulary import METHOD_COLOURS, format_epsilon, method_label


# ------------------------------------------------------------------------------------------------ figures

def audit_table(results) -> pd.DataFrame:
    """One row per audit from :class:`AuditResult` objects, their ``summary()`` dicts, or a DataFrame of them."""
    if isinstance(results, pd.DataFrame):
        table = results.copy()
    else:
        rows = [r.summary() if isinstance(r, AuditResult) else dict(r) for r in results]
        table = pd.DataFrame(rows)
    if table.empty:
        raise ValueError("no audit results to show")
    needed = ["method", "epsilon_reported", "epsilon_lower_bound", "epsilon_ceiling", "guesses", "correct"]
    missing = [col for col in needed if col not in table.columns]
    if missing:
        raise ValueError(f"audit results lack {missing} (give AuditResult objects or their summary() dicts)")
    if "label" not in table.columns:
        table["label"] = ""
    table["label"] = table["label"].fillna("")
    if "epsilon_target" not in table.columns:
        table["epsilon_target"] = table["epsilon_reported"]
    for col in ("epsilon_target", "epsilon_reported", "epsilon_lower_bound", "epsilon_ceiling"):
        # the CLI's JSON spells ε = ∞ "inf" (strict JSON has no infinity)
        table[col] = pd.to_numeric(table[col].replace({"inf": math.inf}), errors="coerce")
    table["epsilon_target"] = table["epsilon_target"].fillna(table["epsilon_reported"])
    return table


def audit_figure(results):
    """The audit next to the accountant: target ε (x, log scale, ∞ at the right end) vs the empirical lower bound
    (y), one marker per run and method (methods side by side at each ε).

    Grey dashed: y = ε. A run is a *violation* when its bound exceeds the ε its accountant *reported* (≤ the
    target); violations get a thick black outline and say so on hover. Dotted: the audit's ceiling (every guess
    right); nothing above it can ever be shown, so a target ε above the ceiling is out of the audit's reach.
    Runs with a ``label`` (e.g. "noise removed") are drawn as crosses.
    """
    table = audit_table(results)
    table["target"] = table["epsilon_target"]
    table["violation"] = table["epsilon_lower_bound"] > table["epsilon_reported"]
    finite = sorted(e for e in table["target"].unique() if math.isfinite(e))
    inf_x = finite[-1] * 3 if finite else 1.0
    ceiling = float(table["epsilon_ceiling"].max())
    top = 1.3 * max(ceiling, float(table["epsilon_lower_bound"].max()), 1.0)
    methods = [m for m in ("non-private", "dp-sgd", "dual-priv", "dp-zo") if m in set(table["method"])]
    methods += sorted(set(table["method"]) - set(methods))
    fig = go.Figure()
    if finite:
        line = np.geomspace(min(finite) / 1.6, max(finite) * 1.6, 60)
        fig.add_trace(go.Scatter(x=line, y=line, mode="lines", name="ε (above it: a bug)",
                                 line=dict(color="#999999", dash="dash"), hoverinfo="skip"))
    fig.add_hline(y=ceiling, line_dash="dot", line_color="#555555",
                  annotation_text=f"audit ceiling {ceiling:.2f} (every guess right)", annotation_position="top left")
    for position, method in enumerate(methods):
        shift = 1.0 + 0.07 * (position - (len(methods) - 1) / 2)   # side by side on the log axis
        for label, group in table[table["method"] == method].groupby("label", sort=True):
            name = method_label(method) + (f" ({label})" if label else "")
            x = group["target"].where(np.isfinite(group["target"]), inf_x) * shift
            hover = [f"target ε {format_epsilon(t)}, reported {format_epsilon(r, 3)}<br>{int(c)}/{int(g)} guesses "
                     f"right{'<br><b>VIOLATION: leaks more than reported</b>' if bad else ''}"
                     for t, r, c, g, bad in zip(group["target"], group["epsilon_reported"], group["correct"],
                                                group["guesses"], group["violation"])]
            fig.add_trace(go.Scatter(
                x=x, y=group["epsilon_lower_bound"], mode="markers", name=name, text=hover,
                marker=dict(size=12, color=METHOD_COLOURS.get(method, "#444444"),
                            symbol="x" if label else "circle",
                            line=dict(width=[3 if bad else 1 for bad in group["violation"]],
                                      color=["#000000" if bad else "#ffffff" for bad in group["violation"]])),
                hovertemplate=f"{name}<br>lower bound %{{y:.2f}}<br>%{{text}}<extra></extra>"))
    has_inf = bool((~np.isfinite(table["target"])).any())
    ticks = finite + ([inf_x] if has_inf else [])
    fig.update_xaxes(type="log", tickvals=ticks,
                     ticktext=[format_epsilon(e) for e in finite] + (["∞"] if has_inf else []),
                     title="target ε of the run (log scale); the accountant reports at most this")
    fig.update_yaxes(title="empirical ε lower bound", range=[0, top])
    confidence = float(table["confidence"].iloc[0]) if "confidence" in table else 0.95
    canaries = int(table["canaries"].max()) if "canaries" in table else None
    sub = (f"one run each (Steinke, Nasr & Jagielski 2023): {int(table['guesses'].max())} guesses on "
           f"{canaries if canaries else '?'} canaries, {confidence:.0%} confidence; one record = one source image"
           "<br>above the dashed line: a proven bug; below it: consistent with the reported ε, not a proof")
    fig.update_layout(title=dict(text=f"Privacy audit: the reported ε vs what one run shows<br><sup>{sub}</sup>",
                                 x=0.01, xanchor="left"),
                      template="plotly_white", width=820, height=500, legend=dict(title="method"),
                      margin=dict(t=110))
    return fig

"""The look every figure shares, and the helpers that make a figure readable without the code.

Method order, labels and colours come from :mod:`toolkit.vocabulary`, so a method is drawn and named the same way
in the notebooks, the CLI pictures and the dashboard. A figure's title carries a subtitle saying over how many
seeds it averages, δ, the task and the privacy unit (:func:`subtitle`, :func:`title`); accuracy figures draw the
task's chance level (:func:`add_chance_line`).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from toolkit import stats
from toolkit.data import TASKS
from toolkit.vocabulary import METHOD_COLOURS, METHODS, PRIVACY_UNIT, method_label

# Distinct dashes and markers: methods whose curves coincide (e.g. equal memory) stay distinguishable.
METHOD_DASH = {"non-private": "dot", "dp-sgd": "solid", "dual-priv": "dash", "dp-zo": "dashdot"}
METHOD_SYMBOL = {"non-private": "circle-open", "dp-sgd": "circle", "dual-priv": "diamond", "dp-zo": "square"}
OTHER_COLOUR = "#444444"  # a method outside the vocabulary (a user's own)
STRATEGY_LABELS = {"dual-priv": "[CLS] attention + fusion (Dual-Priv)", "dual-priv-random": "random + fusion",
                   "random": "random", "pool": "average pooling", "uniform": "uniform stride",
                   "divprune": "DivPrune", "mean-attention": "mean attention", "none": "all tokens"}
PALETTE = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
PRIVACY_UNIT_NOTE = f"privacy unit: {PRIVACY_UNIT}"


def method_colour(method: str) -> str:
    return METHOD_COLOURS.get(method, OTHER_COLOUR)


def require_columns(df: pd.DataFrame, columns, figure: str) -> pd.DataFrame:
    """``df`` itself when it is a non-empty DataFrame holding ``columns``; else an error naming ``figure``."""
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"{figure} needs a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{figure}: the DataFrame lacks column(s) {missing} (has {list(df.columns)})")
    if df.empty:
        raise ValueError(f"{figure}: the DataFrame has no rows")
    return df


def ordered_methods(values) -> list[str]:
    """The methods present in ``values``: the vocabulary's order first, then any others alphabetically."""
    present = [m for m in METHODS if m in set(values)]
    return present + sorted(set(values) - set(present))


def aggregate(df: pd.DataFrame, by: list[str], value: str) -> pd.DataFrame:
    """``mean``, ``std`` (0 for a single seed) and ``count`` of ``value`` per group ``by``."""
    out = df.groupby(by, dropna=False, sort=True)[value].agg(["mean", "std", "count"]).reset_index()
    out["std"] = out["std"].fillna(0.0)
    return out


def subtitle(df: pd.DataFrame, extra: str = "") -> str:
    """Seeds (and what the error bars are), δ, task and the privacy unit of the rows in ``df``."""
    seeds = df["seed"].nunique() if "seed" in df else 1
    parts = [f"{seeds} seed{'s' if seeds != 1 else ''}" + (", mean ± 1 s.d." if seeds > 1 else "")]
    if "delta" in df and df["delta"].notna().any():
        parts.append(f"δ = {df['delta'].dropna().iloc[0]:g}")
    if "task" in df and df["task"].notna().any():
        parts.append(f"task: {', '.join(sorted(df['task'].dropna().astype(str).unique()))}")
    parts.append(PRIVACY_UNIT_NOTE)
    if extra:
        parts.append(extra)
    return "; ".join(parts)


def title(text: str, sub: str) -> dict:
    """A plotly title: ``text`` with ``sub`` in small type below it, left-aligned."""
    return dict(text=f"{text}<br><sup>{sub}</sup>", x=0.01, xanchor="left")


def chance_level(df: pd.DataFrame) -> float | None:
    """1 / number of candidate answers when every row is one known task, else None."""
    if "task" not in df:
        return None
    tasks = df["task"].dropna().astype(str).unique()
    if len(tasks) != 1 or tasks[0] not in TASKS:
        return None
    return stats.chance_level(len(TASKS[tasks[0]][3]))


def add_chance_line(fig, df: pd.DataFrame, n_eval: int | None = None, **where) -> None:
    """A dotted horizontal line at the chance accuracy (in %), when :func:`chance_level` knows it; with ``n_eval``
    (test records per run) also a grey band of ± 2 binomial standard errors around it (:mod:`toolkit.stats`): a point inside the band is
    not distinguishable from guessing."""
    chance = chance_level(df)
    if chance is None:
        return
    fig.add_hline(y=100 * chance, line_dash="dot", line_color="#999999",
                  annotation_text=f"chance {100 * chance:.0f}%", annotation_position="bottom right", **where)
    if n_eval:
        band = 100 * stats.noise_band(chance, n_eval)
        fig.add_hrect(y0=100 * chance - band, y1=100 * chance + band, fillcolor="#999999", opacity=0.15,
                      line_width=0, annotation_text=f"noise of a guesser (± 2 s.e., {n_eval} test records)",
                      annotation_position="top left", annotation_font_size=10, **where)


def ratio_text(values: pd.Series, methods: list[str], reference: str, unit: str, fmt: str) -> list[str]:
    """Bar labels: each method's value with ``unit``, and its ratio to ``reference`` when that is measurable. A
    missing value reads "withheld": a private run does not release its step time or memory by default."""
    ref = values.get(reference)
    out = []
    for m in methods:
        if not np.isfinite(values[m]):
            out.append("withheld")
            continue
        text = f"{values[m]:{fmt}} {unit}"
        if ref is not None and np.isfinite(ref) and ref > 0 and np.isfinite(values[m]):
            text += f"<br>{values[m] / ref:.2f}× {method_label(reference)}"
        out.append(text)
    return out


def with_alpha(hex_colour: str, alpha: float) -> str:
    """``#rrggbb`` -> ``rgba(r, g, b, alpha)``."""
    r, g, b = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r}, {g}, {b}, {alpha})"

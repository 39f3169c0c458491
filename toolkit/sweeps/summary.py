"""Summaries of a results DataFrame: mean and spread of a value over seeds, per group."""
from __future__ import annotations

import pandas as pd


def summarize(df: pd.DataFrame, by, value: str = "accuracy") -> pd.DataFrame:
    """Mean, standard deviation (over seeds), standard error and count of ``value`` per group ``by``.

    ``by`` is a column name or a list of them; groups with missing keys are kept (``dropna=False``). Returns
    columns ``*by, mean, std, count, sem``, sorted by ``by``. Raises ``ValueError`` naming a missing column."""
    by = [by] if isinstance(by, str) else list(by)
    missing = [c for c in (*by, value) if c not in df.columns]
    if missing:
        raise ValueError(f"summarize: the results have no column(s) {missing}")
    grouped = df.groupby(by, dropna=False, sort=True)[value]
    out = grouped.agg(["mean", "std", "count"]).reset_index()
    out["sem"] = out["std"] / out["count"].clip(lower=1) ** 0.5
    return out

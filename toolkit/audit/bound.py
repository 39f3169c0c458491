"""The one-run bound of Steinke, Nasr & Jagielski (2023): p-values, the ε lower bound and its ceiling, and the
membership guesses it counts (see :mod:`toolkit.audit` for the procedure and the maths)."""
from __future__ import annotations

import numpy as np
from scipy import special, stats

from toolkit.validation import check_int, check_number



# Grid points scanned for the last rejected ε before bisecting (see epsilon_lower_bound).
_GRID_POINTS = 400
_TOLERANCE = 1e-7


# ------------------------------------------------------------------------------------------------ the bound

def _check_counts(m, r, v) -> tuple[int, int, int]:
    m = check_int("m (canaries)", m, minimum=1)
    r = check_int("r (guesses)", r, minimum=0, maximum=m)
    v = check_int("v (correct guesses)", v, minimum=0, maximum=r)
    return m, r, v


def _check_delta(delta) -> float:
    delta = check_number("delta", delta, minimum=0, strict=False)
    if delta >= 1:
        raise ValueError(f"delta must be in [0, 1), got {delta!r}")
    return delta


def _check_confidence(confidence) -> float:
    confidence = check_number("confidence", confidence)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return confidence


def _bounds(m: int, r: int, v: int, epsilons, delta: float) -> np.ndarray:
    """The paper's ``f(ε, v)`` for every ε in ``epsilons`` (vectorised over ε), before any minimum."""
    epsilons = np.atleast_1d(np.asarray(epsilons, dtype=float))
    if v == 0:
        return np.ones_like(epsilons)                               # P[at least 0 correct] = 1
    q = special.expit(epsilons)[:, None]                            # e^ε / (1 + e^ε); 1 at ε = ∞
    # sf[:, j] = P[B ≥ j] for j = 0..v (binom.sf(j − 1) = P[B > j − 1]); upper tails keep their precision.
    sf = stats.binom.sf(np.arange(-1, v)[None, :], r, q)
    beta = sf[:, v]                                                 # P[B ≥ v]
    if delta == 0:
        return np.clip(beta, 0.0, 1.0)
    i = np.arange(1, v + 1)
    between = sf[:, v - i] - beta[:, None]                          # P[v − i ≤ B < v]
    alpha = np.max(between / i, axis=1)
    return np.clip(beta + 2.0 * m * delta * alpha, 0.0, 1.0)


def _tail_bounds(m: int, r: int, v_max: int, epsilon: float, delta: float) -> np.ndarray:
    """``f(ε, v)`` for ``v = 0..v_max`` at one ε (what the running minimum of :func:`one_run_p_value` scans)."""
    return np.array([_bounds(m, r, v, epsilon, delta)[0] for v in range(v_max + 1)])


def _p_values(m: int, r: int, v: int, epsilons, delta: float) -> np.ndarray:
    """:func:`one_run_p_value` for every ε in ``epsilons``."""
    if 2.0 * m * delta <= 1.0:
        return _bounds(m, r, v, epsilons, delta)
    return np.min([_bounds(m, r, vv, epsilons, delta) for vv in range(v + 1)], axis=0)


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """p-value of "the run is (ε, δ)-DP" given ``v`` correct guesses out of ``r`` on ``m`` canaries.

    ``min_{v' ≤ v} f(ε, v')`` with ``f`` from the module docstring (Steinke, Nasr & Jagielski 2023). When
    ``2mδ ≤ 1`` the minimum is ``f(ε, v)`` itself, so the O(v²) scan is skipped: each ratio in ``α(v + 1)``,
    ``P[v + 1 − i ≤ B ≤ v] / i``, is a weighted mean of ``P[B = v]`` and a ratio in ``α(v)``, so
    ``α(v + 1) ≤ α(v) + P[B = v]`` while ``β`` drops by ``P[B = v]``, so
    ``f(v + 1) − f(v) ≤ (2mδ − 1)·P[B = v] ≤ 0``.
    (With ``2mδ > 1`` no case where the minimum binds below 1 was found numerically; it is kept as a guard.)

    >>> round(one_run_p_value(m=100, r=10, v=10, epsilon=0.0, delta=0.0), 12) == round(0.5 ** 10, 12)
    True
    """
    m, r, v = _check_counts(m, r, v)
    epsilon = check_number("epsilon", epsilon, minimum=0, strict=False, allow_inf=True)
    delta = _check_delta(delta)
    return float(_p_values(m, r, v, epsilon, delta)[0])


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest ε rejected at ``confidence``: ``sup{ε ≥ 0 : p(ε) < 1 − confidence}`` (0.0 if none).

    ``p(ε) ≥ P[Binomial(r, q(ε)) ≥ v]``, which rises with ε, so nothing beyond the ε where that tail reaches
    ``1 − confidence`` can be rejected (with δ = 0 that ε is the answer). Below it ``p`` is evaluated on a grid
    and the crossing after the *last* rejected grid point is bisected (the δ term need not be monotone in ε).
    Every value returned is itself a rejected ε, so the answer errs low, by at most the bisection tolerance
    (or a rejected sliver narrower than the grid step, if one exists).

    >>> round(epsilon_lower_bound(m=100, r=20, v=20, delta=0.0), 4)   # logit(0.05 ** (1/20))
    1.8227
    """
    m, r, v = _check_counts(m, r, v)
    delta = _check_delta(delta)
    level = 1.0 - _check_confidence(confidence)
    if v == 0 or _p_values(m, r, v, 0.0, delta)[0] >= level:
        return 0.0

    def bisect(rejected, lo: float, hi: float) -> float:  # rejected(lo) holds, rejected(hi) does not
        while hi - lo > _TOLERANCE:
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if rejected(mid) else (lo, mid)
        return lo

    def tail_rejects(eps: float) -> bool:
        return _bounds(m, r, v, eps, 0.0)[0] < level

    top = 1.0
    while tail_rejects(top) and top < 1e3:  # q(ε) rounds to 1 long before ε = 1000
        top *= 2.0
    if tail_rejects(top):
        return float(top)
    top_rejected = bisect(tail_rejects, 0.0, top)
    if delta == 0:
        return float(top_rejected)
    grid = np.linspace(0.0, top_rejected, _GRID_POINTS + 1)
    rejected = np.flatnonzero(_p_values(m, r, v, grid, delta) < level)
    last = int(rejected[-1])                                       # grid[0] = 0 is rejected (checked above)
    if last == _GRID_POINTS:
        return float(top_rejected)
    return float(bisect(lambda eps: _p_values(m, r, v, eps, delta)[0] < level, grid[last], grid[last + 1]))


def epsilon_ceiling(m: int, r: int, delta: float, confidence: float = 0.95) -> float:
    """The most an audit with ``r`` guesses on ``m`` canaries can ever show: the bound with every guess right."""
    return epsilon_lower_bound(m, r, r, delta, confidence)


# ------------------------------------------------------------------------------------------------ guesses

def guess_membership(scores, k: int) -> np.ndarray:
    """``+1`` ("in") for the ``k`` highest scores, ``−1`` ("out") for the ``k`` lowest, ``0`` (abstain) else.

    Ties are broken by position (the canaries' order is independent of the coins, so this leaks nothing).
    """
    scores = np.asarray(scores, dtype=float)
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D (one per canary), got shape {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite (a canary's loss was NaN or inf)")
    m = check_int("m (canaries)", len(scores), minimum=2)
    k = check_int("k (guesses per side)", k, minimum=1)
    if 2 * k > m:
        raise ValueError(f"k = {k} guesses per side need 2k <= m, but m = {m} canaries")
    order = np.argsort(-scores, kind="stable")
    guesses = np.zeros(m, dtype=int)
    guesses[order[:k]] = 1
    guesses[order[m - k:]] = -1
    return guesses


def count_correct(guesses, included) -> tuple[int, int]:
    """``(r, v)``: guesses made (non-zero) and correct ones (``+1`` on an included canary, ``−1`` on an excluded)."""
    guesses = np.asarray(guesses, dtype=int)
    included = np.asarray(included, dtype=bool)
    if guesses.shape != included.shape:
        raise ValueError(f"guesses {guesses.shape} and included {included.shape} differ in shape")
    truth = np.where(included, 1, -1)
    return int(np.count_nonzero(guesses)), int(np.sum(guesses * truth == 1))

"""The f-DP one-run bound (Mahloujifar, Melis & Chaudhuri, "Auditing f-Differential Privacy in One Run", ICML
2025), next to Steinke et al.'s (:mod:`toolkit.audit.bound`): same canaries, same guesses, a tighter test.

The claim under test is the Gaussian trade-off curve through the reported (ε, δ): the run is μ-GDP with
``μ = 1 / σ(ε, δ)``, ``σ(ε, δ)`` the noise of the Gaussian mechanism (sensitivity 1) that is exactly (ε, δ)-DP
(Balle & Wang 2018: ``δ = Φ(1/(2σ) − εσ) − e^ε Φ(−1/(2σ) − εσ)``). DP-SGD's subsampled Gaussian composes to a
curve close to a Gaussian one, which is why the paper audits this claim; it is stronger than (ε, δ)-DP alone, so a
bound above the reported ε would falsify the GDP reading of the guarantee, not necessarily (ε, δ) itself.

The test is one-sided, as the paper's and jax-privacy's: ``r`` counts only the "in" guesses (the canaries with the
highest scores), ``v`` those that were really included (:func:`count_in_guesses`). The paper's recursion with the
cap at 1: with ``r`` such guesses of which ``v`` are right on ``m`` canaries, at significance ``α = 1 − confidence``, start from the masses ``α·v/m`` (right) and ``α·(r − v)/m``
(wrong); for ``i = v − 1, …, 0`` the trade-off curve forces the wrong mass up to at least ``f̄(right)`` with
``f̄(x) = Φ(Φ⁻¹(x) − μ)``, and each unit of extra wrong mass lets ``i / (r − i)`` more right mass in. If the two
masses then exceed ``r / m``, seeing ``v`` right guesses is too unlikely under the claim: it is rejected. The ε
lower bound is the largest ε rejected.

Example::

    >>> round(fdp_epsilon_lower_bound(m=1000, r=100, v=100, delta=1e-5), 2) > 0
    True
    >>> fdp_epsilon_lower_bound(m=1000, r=100, v=50, delta=1e-5)    # half right: a coin does as well
    0.0
"""
from __future__ import annotations

import functools
import math

import numpy as np
from scipy import optimize, stats

from toolkit.audit.bound import _check_confidence, _check_counts, _check_delta

_TOLERANCE = 1e-6
_MAX_EPSILON = 64.0   # e^64: beyond any audit's reach with a million canaries


@functools.lru_cache(maxsize=4096)
def gaussian_sigma(epsilon: float, delta: float) -> float:
    """σ of the Gaussian mechanism with sensitivity 1 that is exactly (ε, δ)-DP (0.0 at ε = ∞)."""
    if math.isinf(epsilon):
        return 0.0

    def excess(log_sigma: float) -> float:   # δ(ε; σ) − δ, decreasing in σ
        sigma = math.exp(log_sigma)
        a, b = 1 / (2 * sigma), epsilon * sigma
        return stats.norm.cdf(a - b) - math.exp(epsilon) * stats.norm.cdf(-a - b) - delta

    lo, hi = -12.0, 12.0
    if excess(lo) <= 0:       # even a tiny σ reaches δ: essentially no noise needed
        return math.exp(lo)
    if excess(hi) > 0:        # δ = 0 (or below what e^12 noise gives): no Gaussian is that private
        return math.inf
    return math.exp(optimize.brentq(excess, lo, hi, xtol=1e-12))


def rejects(m: int, r: int, v: int, epsilon: float, delta: float, confidence: float = 0.95) -> bool:
    """True when ``v`` right guesses out of ``r`` on ``m`` canaries reject "μ-GDP with μ = 1/σ(ε, δ)" at
    ``confidence`` (the module docstring's recursion)."""
    m, r, v = _check_counts(m, r, v)
    delta = _check_delta(delta)
    level = 1.0 - _check_confidence(confidence)
    if v == 0:
        return False
    sigma = gaussian_sigma(float(epsilon), delta)
    if sigma == 0.0:          # μ = ∞: any outcome is possible, nothing is rejected
        return False
    mu = 1.0 / sigma          # 0 when σ = ∞ (δ = 0): perfect privacy, the strictest claim
    right, wrong = level * v / m, level * (r - v) / m
    for i in range(v - 1, -1, -1):
        forced = max(wrong, stats.norm.cdf(stats.norm.ppf(right) - mu))
        if forced == wrong:   # the curve no longer pushes: neither mass moves again
            break
        right = min(right + i / (r - i) * (forced - wrong), 1.0)
        wrong = forced
    return right + wrong > r / m


def count_in_guesses(guesses, included) -> tuple[int, int]:
    """``(r, v)`` for the one-sided test: the "in" guesses (``+1``) and how many of them were included."""
    guesses = np.asarray(guesses, dtype=int)
    included = np.asarray(included, dtype=bool)
    if guesses.shape != included.shape:
        raise ValueError(f"guesses {guesses.shape} and included {included.shape} differ in shape")
    guessed_in = guesses == 1
    return int(guessed_in.sum()), int((guessed_in & included).sum())


def fdp_epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest ε whose Gaussian trade-off curve the guesses reject at ``confidence`` (0.0 if none).

    Rejection is monotone in ε (a larger ε is a smaller σ, a curve closer to 0), so the bound is bracketed by
    doubling and bisected; every value returned is itself rejected (the answer errs low by the tolerance)."""
    m, r, v = _check_counts(m, r, v)
    delta = _check_delta(delta)
    confidence = _check_confidence(confidence)
    if not rejects(m, r, v, 0.0, delta, confidence):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejects(m, r, v, hi, delta, confidence):
        lo, hi = hi, 2 * hi
        if hi > _MAX_EPSILON:
            return lo
    while hi - lo > _TOLERANCE:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rejects(m, r, v, mid, delta, confidence) else (lo, mid)
    return lo


def fdp_epsilon_ceiling(m: int, r: int, delta: float, confidence: float = 0.95) -> float:
    """The most the f-DP test can show with ``r`` guesses on ``m`` canaries: every guess right."""
    return fdp_epsilon_lower_bound(m, r, r, delta, confidence)

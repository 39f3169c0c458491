"""The f-DP one-run bound (Mahloujifar et al. 2025; no training): the Gaussian mechanism's (ε, δ) curve, soundness
on a mechanism that is exactly μ-GDP (simulated canaries), its power next to Steinke's, and input errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, stats

from toolkit.audit import count_correct, epsilon_ceiling, epsilon_lower_bound, guess_membership
from toolkit.audit.fdp import (count_in_guesses, fdp_epsilon_ceiling, fdp_epsilon_lower_bound, gaussian_sigma,
                                rejects)


def gaussian_delta(epsilon: float, sigma: float) -> float:
    """δ(ε) of the Gaussian mechanism with sensitivity 1 and noise σ, from its privacy-loss distribution
    N(μ²/2, μ²), μ = 1/σ: E[(1 − e^{ε − L})₊] written out (independent of the module's closed form)."""
    mu = 1 / sigma
    loss = stats.norm(loc=mu ** 2 / 2, scale=mu)
    return loss.sf(epsilon) - math.exp(epsilon) * stats.norm.sf((epsilon + mu ** 2 / 2) / mu)


def true_epsilon(mu: float, delta: float) -> float:
    """The ε at ``delta`` of a μ-GDP mechanism (solved from :func:`gaussian_delta`)."""
    return optimize.brentq(lambda e: gaussian_delta(e, 1 / mu) - delta, 0.0, 100.0)


@pytest.mark.parametrize("epsilon,delta", [(1.0, 1e-5), (3.0, 1e-5), (8.0, 1e-6), (0.5, 1e-3)])
def test_gaussian_sigma_is_the_noise_whose_delta_at_epsilon_is_delta(epsilon, delta):
    sigma = gaussian_sigma(epsilon, delta)
    assert gaussian_delta(epsilon, sigma) == pytest.approx(delta, rel=1e-6)
    assert gaussian_sigma(math.inf, delta) == 0.0


def test_gaussian_sigma_matches_the_analytic_gaussian_mechanism_value():
    assert gaussian_sigma(1.0, 1e-5) == pytest.approx(3.7306, abs=1e-3)   # Balle & Wang (2018), Table 1 regime


def test_a_mu_gdp_mechanism_is_rarely_audited_above_its_true_epsilon_and_often_near_it():
    """Canary scores ``μ·[in] + N(0, 1)``: each canary's membership is exactly μ-GDP (μ = 1: ε = 4.38 at δ = 1e-5).
    At 95 % confidence a bound may exceed the true ε in about 5 % of the trials, and with 10⁵ canaries and 1000
    "in" guesses the test has the power to come near it (a test that rejected too much, e.g. one assuming 0.7 μ,
    lands above the truth in 7 of these 10 trials)."""
    mu, delta, m, k = 1.0, 1e-5, 100_000, 1000
    truth = true_epsilon(mu, delta)
    rng = np.random.default_rng(3)
    bounds = []
    for _ in range(10):
        included = rng.random(m) < 0.5
        r, v = count_in_guesses(guess_membership(mu * included + rng.normal(size=m), k), included)
        assert r == k
        bounds.append(fdp_epsilon_lower_bound(m, r, v, delta))
    assert sum(b > truth for b in bounds) <= 2      # P[Binomial(10, 0.05) > 2] ≈ 0.012
    assert np.median(bounds) > 0.6 * truth


def test_in_guesses_are_counted_one_sided():
    assert count_in_guesses([1, 1, -1, 0, 1], [True, False, False, True, True]) == (3, 2)
    with pytest.raises(ValueError, match="differ in shape"):
        count_in_guesses([1, -1], [True])


def test_the_fdp_bound_is_tighter_than_steinkes_on_the_same_guesses():
    for m, r in [(128, 32), (256, 64), (1000, 100)]:
        assert fdp_epsilon_ceiling(m, r, 1e-5) > 1.5 * epsilon_ceiling(m, r, 1e-5)
        for v in range(r // 2, r + 1, max(1, r // 8)):
            assert fdp_epsilon_lower_bound(m, r, v, 1e-5) >= epsilon_lower_bound(m, r, v, 1e-5) - 1e-6, (m, r, v)


def test_the_bound_is_rejected_itself_and_rises_with_correct_guesses():
    m, r = 256, 64
    bounds = [fdp_epsilon_lower_bound(m, r, v, 1e-5) for v in range(r // 2, r + 1)]
    assert all(a <= b for a, b in zip(bounds, bounds[1:]))
    for v, bound in zip(range(r // 2, r + 1), bounds):
        if bound > 0:
            assert rejects(m, r, v, bound, 1e-5) and not rejects(m, r, v, bound + 1e-3, 1e-5)
    assert bounds[-1] == fdp_epsilon_ceiling(m, r, 1e-5)


def test_half_right_guesses_or_no_guess_certify_nothing():
    assert fdp_epsilon_lower_bound(1000, 100, 50, 1e-5) == 0.0
    assert fdp_epsilon_lower_bound(1000, 0, 0, 1e-5) == 0.0
    assert not rejects(1000, 100, 100, math.inf, 1e-5)       # ε = ∞ claims nothing


@pytest.mark.parametrize("args,words", [
    ((10, 11, 0, 1e-5), "r (guesses)"), ((10, 4, 5, 1e-5), "v (correct guesses)"),
    ((10, 4, 4, 1.0), "delta must be in [0, 1)"), ((0, 0, 0, 1e-5), "m (canaries)"),
])
def test_bad_counts_are_named(args, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        fdp_epsilon_lower_bound(*args)

"""The one-run audit's statistics (no training): the (ε, δ) bound of Steinke, Nasr & Jagielski (2023) against
values derived here independently, its soundness computed exactly, the guesses, the figure, and input errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize
from scipy.stats import beta as beta_dist

from toolkit.audit import (audit_figure, audit_table, count_correct, epsilon_ceiling, epsilon_lower_bound,
                           guess_membership, one_run_p_value)
from toolkit.audit import _tail_bounds  # the un-minimised bound, to check the monotonicity claim

LEVEL = 0.05


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def rr_accuracy(epsilon: float) -> float:
    """Accuracy of ε-DP randomised response: the most an ε-DP run lets one guess be right."""
    return math.exp(epsilon) / (1.0 + math.exp(epsilon))


def binom_pmf(j: int, n: int, p: float) -> float:
    return math.comb(n, j) * p ** j * (1.0 - p) ** (n - j)


def paper_bound_from_scratch(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """The bound written out with math.comb sums, nothing shared with toolkit.audit."""
    q = rr_accuracy(epsilon)
    tail = sum(binom_pmf(j, r, q) for j in range(v, r + 1))
    alpha = max((sum(binom_pmf(j, r, q) for j in range(v - i, v)) / i for i in range(1, v + 1)), default=0.0)
    return min(1.0, tail + 2 * m * delta * alpha)


# ------------------------------------------------------------------------------------------ closed forms

@pytest.mark.parametrize("r", [1, 5, 20, 64, 200])
def test_delta_zero_all_correct_is_logit_of_level_root(r):
    # δ = 0, every guess right: P[Bin(r, q) >= r] = q^r < 0.05  <=>  ε < logit(0.05^(1/r)).
    expected = max(0.0, logit(LEVEL ** (1.0 / r)))   # r = 1: q ≥ 1/2 > 0.05 for every ε ≥ 0, nothing rejected
    assert epsilon_lower_bound(m=max(r, 2) * 2, r=r, v=r, delta=0.0) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("r,v", [(10, 9), (32, 28), (64, 50), (100, 70), (500, 300), (40, 20)])
def test_delta_zero_is_the_beta_quantile(r, v):
    # P[Bin(r, q) >= v] = I_q(v, r - v + 1) (regularised incomplete beta), so the ε where the tail equals 0.05 is
    # logit of the 0.05-quantile of Beta(v, r - v + 1); 0 when that quantile is at or below 1/2 (ε = 0).
    q = beta_dist.ppf(LEVEL, v, r - v + 1)
    expected = max(0.0, logit(q))
    assert epsilon_lower_bound(m=1000, r=r, v=v, delta=0.0) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("m,delta", [(100, 1e-4), (1000, 1e-5), (10, 1e-3), (200, 1e-6)])
def test_one_guess_with_delta_has_a_closed_form(m, delta):
    # r = v = 1: β = q, α = P[B = 0] = 1 - q, so p = q + c (1 - q) with c = 2mδ; p = 0.05 at q = (0.05 - c)/(1 - c).
    c = 2 * m * delta
    expected = logit((LEVEL - c) / (1 - c))
    assert one_run_p_value(m, 1, 1, 0.7, delta) == pytest.approx(rr_accuracy(0.7) + c * (1 - rr_accuracy(0.7)), rel=1e-9)
    assert epsilon_lower_bound(m=m, r=1, v=1, delta=delta) == pytest.approx(max(0.0, expected), abs=1e-5)


def test_one_guess_is_never_enough():
    # q ≥ 1/2 for every ε ≥ 0, so one right guess never gets p below 0.05: nothing is rejected.
    assert epsilon_lower_bound(m=100, r=1, v=1, delta=0.0) == 0.0


@pytest.mark.parametrize("m,delta", [(5, 1e-3), (50, 1e-3), (500, 1e-4)])
@pytest.mark.parametrize("confidence", [0.5, 0.6])
def test_two_guesses_with_delta_solved_independently(m, delta, confidence):
    # r = v = 2: β = q², α = max(P[B = 1], P[B ≤ 1] / 2) = max(2q(1 - q), (1 - q²)/2); solved with brentq.
    # (Two guesses can only reject at a low confidence: q² ≥ 1/4 for every ε ≥ 0.)
    c, level = 2 * m * delta, 1 - confidence

    def p(eps):
        q = rr_accuracy(eps)
        return q * q + c * max(2 * q * (1 - q), (1 - q * q) / 2)

    assert p(0.0) < level
    expected = optimize.brentq(lambda e: p(e) - level, 0.0, 50.0, xtol=1e-12)
    assert epsilon_lower_bound(m=m, r=2, v=2, delta=delta, confidence=confidence) == pytest.approx(expected, abs=1e-5)
    assert epsilon_lower_bound(m=m, r=2, v=2, delta=delta) == 0.0


def test_p_value_matches_the_formula_written_from_scratch():
    rng = np.random.default_rng(0)
    for _ in range(60):
        m = int(rng.integers(2, 400))
        r = int(rng.integers(0, m + 1))
        v = int(rng.integers(0, r + 1))
        eps = float(rng.uniform(0, 6))
        delta = float(10 ** rng.uniform(-7, -2.5))
        if 2 * m * delta > 1:
            continue
        expected = 1.0 if v == 0 else paper_bound_from_scratch(m, r, v, eps, delta)
        assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(expected, rel=1e-7, abs=1e-12), (m, r, v, eps, delta)


def test_p_value_at_epsilon_zero_is_a_fair_coin_tail():
    # ε = 0: every guess is right with probability 1/2.
    assert one_run_p_value(100, 10, 10, 0.0, 0.0) == pytest.approx(0.5 ** 10)
    assert one_run_p_value(100, 10, 8, 0.0, 0.0) == pytest.approx(sum(math.comb(10, j) for j in (8, 9, 10)) / 1024)


# ------------------------------------------------------------------------------------------ soundness

@pytest.mark.parametrize("r", [16, 32, 64, 200])
@pytest.mark.parametrize("epsilon", [0.0, 0.5, 1.0, 3.0])
@pytest.mark.parametrize("delta", [0.0, 1e-5])
def test_an_epsilon_dp_guesser_exceeds_epsilon_at_most_five_percent_of_the_time(r, epsilon, delta):
    # The best ε-DP guesser (randomised response) gets Bin(r, e^ε/(1+e^ε)) right. Exactly: the probability that
    # the audit's lower bound exceeds ε must be at most 1 - confidence. (An ε-DP run is also (ε, δ)-DP.)
    m = 2 * r
    q = rr_accuracy(epsilon)
    # the bound grows with v (tested below), so the alarms are v >= v_star: find v_star by bisection
    lo, hi = -1, r + 1            # bound(lo) <= ε (or lo = -1), bound(hi) > ε (or hi = r + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if epsilon_lower_bound(m, r, mid, delta) > epsilon else (mid, hi)
    false_alarm = sum(binom_pmf(v, r, q) for v in range(hi, r + 1))
    assert false_alarm <= LEVEL


def test_the_bound_is_not_vacuous():
    # ... and it is not trivially small: with 1000 guesses from a 2-DP guesser it usually lands within 0.3 of 2.
    r, epsilon = 1000, 2.0
    q = rr_accuracy(epsilon)
    typical = int(round(r * q))
    assert epsilon - 0.3 < epsilon_lower_bound(2 * r, r, typical, 1e-5) < epsilon


# ------------------------------------------------------------------------------------------ shape

def test_bound_grows_with_correct_guesses_and_shrinks_with_delta():
    bounds = [epsilon_lower_bound(128, 32, v, 1e-5) for v in range(33)]
    assert all(b2 >= b1 for b1, b2 in zip(bounds, bounds[1:]))
    assert bounds[16] == 0.0 and bounds[-1] == epsilon_ceiling(128, 32, 1e-5)
    assert epsilon_lower_bound(128, 32, 30, 1e-3) < epsilon_lower_bound(128, 32, 30, 1e-5) \
        <= epsilon_lower_bound(128, 32, 30, 0.0)


def test_delta_term_alone_is_monotone_in_v_when_2m_delta_at_most_one():
    # The docstring's argument: f(v + 1) - f(v) ≤ (2mδ - 1) P[B = v] ≤ 0, so no running minimum is needed.
    for m, r, eps, delta in [(100, 60, 1.0, 5e-3), (400, 200, 2.5, 1e-3), (50, 50, 0.3, 1e-2)]:
        assert 2 * m * delta <= 1
        f = _tail_bounds(m, r, r, eps, delta)
        assert np.all(np.diff(f) <= 1e-12)
        assert one_run_p_value(m, r, r // 2, eps, delta) == pytest.approx(f[r // 2])


def test_large_delta_uses_the_running_minimum():
    # 2mδ > 1: the monotonicity argument fails, so the p-value is the minimum over v' ≤ v (a valid bound on P[≥ v]).
    m, r, eps, delta = 100, 40, 1.0, 0.05
    f = _tail_bounds(m, r, r, eps, delta)
    for v in range(1, r + 1):
        assert one_run_p_value(m, r, v, eps, delta) == pytest.approx(f[: v + 1].min())
        assert one_run_p_value(m, r, v, eps, delta) <= f[v]


def test_ceiling_values_quoted_in_the_docs():
    assert epsilon_ceiling(128, 32, 1e-5) == pytest.approx(2.3176, abs=1e-3)
    assert epsilon_ceiling(128, 64, 1e-5) < 3.1


# ------------------------------------------------------------------------------------------ guesses

def test_guesses_take_top_and_bottom_k():
    scores = np.array([0.5, 3.0, -1.0, 2.0, 0.0, -2.0])
    guesses = guess_membership(scores, 2)
    assert guesses.tolist() == [0, 1, -1, 1, 0, -1]
    assert count_correct(guesses, [0, 1, 0, 1, 1, 0]) == (4, 4)
    assert count_correct(guesses, [1, 0, 1, 0, 0, 1]) == (4, 0)


def test_perfect_scores_reach_the_ceiling():
    rng = np.random.default_rng(1)
    included = rng.random(128) < 0.5
    scores = included + rng.normal(0, 0.01, 128)
    r, v = count_correct(guess_membership(scores, 16), included)
    assert (r, v) == (32, 32)
    assert epsilon_lower_bound(128, r, v, 1e-5) == epsilon_ceiling(128, 32, 1e-5)


def test_scores_unrelated_to_membership_give_no_bound():
    rng = np.random.default_rng(2)
    included = rng.random(256) < 0.5
    hits = 0
    for _ in range(50):
        r, v = count_correct(guess_membership(rng.normal(size=256), 32), included)
        hits += epsilon_lower_bound(256, r, v, 1e-5) > 0
    assert hits <= 8   # each trial is ε = 0 randomised response: P[bound > 0] ≤ 0.05, so P[more than 8 of 50] < 0.001


# ------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("call,match", [
    (lambda: guess_membership([1.0], 1), "m \\(canaries\\) must be an integer >= 2"),
    (lambda: guess_membership([1.0, 2.0, 3.0], 2), "2k <= m"),
    (lambda: guess_membership([1.0, 2.0], 0), "k \\(guesses per side\\)"),
    (lambda: guess_membership([1.0, float("nan")], 1), "finite"),
    (lambda: epsilon_lower_bound(10, 5, 6, 1e-5), "v \\(correct guesses\\)"),
    (lambda: epsilon_lower_bound(10, 11, 6, 1e-5), "r \\(guesses\\)"),
    (lambda: epsilon_lower_bound(10, 5, 5, 1.0), "delta"),
    (lambda: epsilon_lower_bound(10, 5, 5, -1e-5), "delta"),
    (lambda: epsilon_lower_bound(10, 5, 5, 1e-5, confidence=1.0), "confidence"),
    (lambda: one_run_p_value(10, 5, 5, -0.1, 1e-5), "epsilon"),
    (lambda: count_correct([1, -1], [True]), "shape"),
])
def test_bad_input_is_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------------------------------------------ figure

def _rows():
    base = dict(guesses=32, canaries=128, confidence=0.95, epsilon_ceiling=2.32)
    return [dict(base, method="non-private", epsilon_target=math.inf, epsilon_reported=math.inf,
                 epsilon_lower_bound=1.5, correct=30),
            dict(base, method="dp-sgd", epsilon_target=1.0, epsilon_reported=0.99, epsilon_lower_bound=0.0,
                 correct=17),
            dict(base, method="dp-sgd", epsilon_target=1.0, epsilon_reported=0.99, epsilon_lower_bound=1.8, correct=31,
                 label="noise removed"),
            dict(base, method="dp-zo", epsilon_target="inf", epsilon_reported="inf", epsilon_lower_bound=0.0,
                 correct=15)]


def test_audit_figure_shows_each_method_the_diagonal_and_infinity():
    fig = audit_figure(_rows())
    traces = {t.name: t for t in fig.data}
    assert fig.data[0].name.startswith("ε (above it: a bug)")
    assert {"Non-private", "DP-SGD", "DP-SGD (noise removed)", "DP-ZO"} <= set(traces)
    assert list(fig.layout.xaxis.ticktext) == ["1", "∞"]
    assert "ceiling" in fig.layout.annotations[0].text
    # the run whose bound exceeds its reported ε is marked as a violation; the others are not
    assert list(traces["DP-SGD (noise removed)"].marker.line.width) == [3]
    assert "VIOLATION" in traces["DP-SGD (noise removed)"].text[0]
    assert list(traces["DP-SGD"].marker.line.width) == [1] and "VIOLATION" not in traces["DP-SGD"].text[0]


def test_audit_table_needs_the_columns():
    with pytest.raises(ValueError, match="lack"):
        audit_table([dict(method="dp-sgd")])
    with pytest.raises(ValueError, match="no audit results"):
        audit_table([])
    assert audit_table(_rows())["epsilon_reported"].tolist()[-1] == math.inf

"""Accounting: σ calibration reaches the target ε without overshoot (checked with Opacus' own accountants),
ε before/after steps, save/restore of the history, clear errors."""
from __future__ import annotations

import math

import pytest

from toolkit.privacy.accounting import (
    PrivacyBudgetError,
    accountant_state,
    calibrate_noise,
    epsilon_for,
    epsilon_spent,
    make_accountant,
    restore_accountant,
    calibrate_continuation,
    history_epsilon,
    rdp_noise_estimate,
)

DELTA = 1e-5


def _opacus_epsilon(mechanism: str, sigma: float, q: float, steps: int) -> float:
    """ε straight from Opacus (default settings), independent of the toolkit's reporting function."""
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism)
    acc.history = [(sigma, q, steps)]
    return float(acc.get_epsilon(DELTA))


@pytest.mark.parametrize("accountant,target,q,steps", [
    ("rdp", 1.0, 0.05, 200),
    ("rdp", 8.0, 0.2, 50),
    ("prv", 1.0, 0.05, 200),
    ("prv", 3.0, 0.1, 60),
])
def test_calibration_reaches_target_without_overshoot(accountant, target, q, steps):
    sigma = calibrate_noise(target, DELTA, q, steps, accountant=accountant)
    eps = epsilon_for(sigma, q, steps, DELTA, accountant=accountant)
    assert target - 0.02 <= eps <= target
    # Opacus' own accountant agrees: no overshoot by its count either.
    assert _opacus_epsilon(accountant, sigma, q, steps) <= target + 1e-9
    # A slightly smaller σ would overshoot: the calibration is tight, not just safe.
    assert epsilon_for(sigma * 0.97, q, steps, DELTA, accountant=accountant) > target


def test_prv_is_tighter_than_rdp():
    s_prv = calibrate_noise(2.0, DELTA, 0.05, 200, accountant="prv")
    s_rdp = calibrate_noise(2.0, DELTA, 0.05, 200, accountant="rdp")
    assert s_prv < s_rdp


def test_infinite_epsilon_means_no_noise():
    assert calibrate_noise(math.inf, DELTA, 0.1, 10) == 0.0


@pytest.mark.parametrize("kwargs", [
    dict(target_epsilon=0.0), dict(target_epsilon=-1.0), dict(target_epsilon=float("nan")),
    dict(target_delta=0.0), dict(target_delta=1.0), dict(target_delta=-1e-5),
    dict(sample_rate=0.0), dict(sample_rate=1.5), dict(steps=0), dict(steps=2.5), dict(accountant="gdp"),
])
def test_calibration_rejects_bad_input(kwargs):
    args = dict(target_epsilon=1.0, target_delta=DELTA, sample_rate=0.1, steps=10, accountant="rdp") | kwargs
    with pytest.raises(ValueError):
        calibrate_noise(**args)


def test_impossible_budget_is_a_clear_error():
    with pytest.raises(PrivacyBudgetError):
        calibrate_noise(1e-4, 1e-10, 1.0, 10_000, accountant="rdp")


@pytest.mark.parametrize("mechanism", ["prv", "rdp"])
def test_epsilon_spent_before_and_after_steps(mechanism):
    acc = make_accountant(mechanism)
    assert epsilon_spent(acc, DELTA) == 0.0
    for _ in range(20):
        acc.step(noise_multiplier=1.0, sample_rate=0.1)
    eps = epsilon_spent(acc, DELTA)
    assert 0 < eps < math.inf
    assert eps == pytest.approx(epsilon_for(1.0, 0.1, 20, DELTA, mechanism))
    acc.step(noise_multiplier=0.0, sample_rate=0.1)  # one non-private step voids the guarantee
    assert epsilon_spent(acc, DELTA) == math.inf


def test_accountant_state_round_trip_keeps_epsilon():
    acc = make_accountant("rdp")
    for sigma in (1.0, 1.0, 1.5):
        acc.step(noise_multiplier=sigma, sample_rate=0.1)
    state = accountant_state(acc)
    assert state == {"mechanism": "rdp", "history": [[1.0, 0.1, 2], [1.5, 0.1, 1]]}
    back = restore_accountant(state)
    assert epsilon_spent(back, DELTA) == epsilon_spent(acc, DELTA)
    back.step(noise_multiplier=1.5, sample_rate=0.1)  # continues the last entry
    assert back.history[-1] == (1.5, 0.1, 2)


@pytest.mark.parametrize("state", [None, {}, {"mechanism": "rdp"}, {"mechanism": "xyz", "history": []},
                                   {"mechanism": "rdp", "history": [[1.0, 0.1]]},
                                   {"mechanism": "rdp", "history": [[1.0, 2.0, 3]]}])
def test_restore_rejects_malformed_state(state):
    with pytest.raises(ValueError):
        restore_accountant(state)


def test_a_continuation_keeps_the_composed_epsilon_within_the_new_target():
    past = [(2.0, 0.1, 20)]                                # spends 1.23 under RDP
    sigma = calibrate_continuation(past, 3.0, 1e-5, 0.1, 30, accountant="rdp")
    total = history_epsilon(past + [(sigma, 0.1, 30)], 1e-5, "rdp")
    assert 3.0 - 0.01 <= total <= 3.0                     # the composition, not the new steps alone
    assert sigma > calibrate_noise(3.0, 1e-5, 0.1, 30, "rdp")
    with pytest.raises(PrivacyBudgetError, match="already spent"):
        calibrate_continuation([(0.3, 0.5, 200)], 1.0, 1e-5, 0.1, 30, accountant="rdp")


@pytest.mark.parametrize("target,q,steps", [(1.0, 0.01, 500), (3.0, 0.05, 100), (8.0, 0.25, 30)])
def test_the_fast_rdp_estimate_never_claims_less_noise_than_the_accountant_needs(target, q, steps):
    """The plan's proposal ranks batch sizes with it: it must be an upper bound on σ (its ε at most the target by
    the toolkit's own RDP accountant) and close to the calibrated σ (within 3 %)."""
    estimate = rdp_noise_estimate(target, 1e-5, q, steps)
    assert epsilon_for(estimate, q, steps, 1e-5, accountant="rdp") <= target + 1e-9
    assert estimate == pytest.approx(calibrate_noise(target, 1e-5, q, steps, accountant="rdp"), rel=0.03)

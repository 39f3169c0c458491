"""The per-run ε curve must report what Opacus' accountants report."""
import math

import pytest

from toolkit.privacy.accounting import epsilon_for, make_accountant
from toolkit.privacy.curve import EpsilonCurve


@pytest.mark.parametrize("sigma, q, steps", [(2.883, 128 / 700, 110), (1.2, 0.25, 3), (0.8, 0.01, 400)])
def test_curve_at_planned_steps_equals_opacus_prv_accountant(sigma, q, steps):
    curve = EpsilonCurve(sigma, q, steps, 1e-5)
    accountant = make_accountant("prv")
    accountant.history = [(sigma, q, steps)]
    opacus_eps = accountant.get_epsilon(1e-5)
    assert curve(steps) == pytest.approx(min(opacus_eps, epsilon_for(sigma, q, steps, 1e-5, "rdp")), abs=1e-9)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_curve_before_planned_steps_matches_the_accountant_within_its_error(accountant):
    curve = EpsilonCurve(1.0, 0.1, 60, 1e-5, accountant=accountant)
    for t in (1, 7, 30):
        assert curve(t) == pytest.approx(epsilon_for(1.0, 0.1, t, 1e-5, accountant), abs=0.01)
    values = [curve(t) for t in range(1, 61, 5)]
    assert values == sorted(values)


def test_curve_edge_cases():
    assert EpsilonCurve(1.0, 0.1, 5, 1e-5)(0) == 0.0
    assert math.isinf(EpsilonCurve(0.0, 0.1, 5, 1e-5)(3))
    with pytest.raises(ValueError, match="sized for 5"):
        EpsilonCurve(1.0, 0.1, 5, 1e-5)(6)


def test_training_reports_the_accountants_own_final_epsilon():
    from toolkit.train import TrainConfig, train

    result = train(TrainConfig(method="dp-sgd", epsilon=2.0, steps=4, train_limit=32, eval_limit=8,
                               warm_start_steps=0, expected_batch_size=8, progress=False))
    exact = epsilon_for(result.noise_multiplier, result.sample_rate, 4, 1e-5, "prv")
    assert result.epsilon_spent == pytest.approx(exact, abs=1e-9) and exact <= 2.0

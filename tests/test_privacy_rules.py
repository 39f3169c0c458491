"""Rules a private run keeps before it starts (issue 20): δ < 1/N (refused, naming N; an explicit override is
marked outside the guarantee), a warning above 1/(10N), no batch larger than N (a batch of N is q = 1), and
opted-in fixed batches marked as not covered by the Poisson accountant and drawn from the secret generator.

Each test was checked to fail when the claim it protects is broken in the code."""
from __future__ import annotations

import warnings

import pytest
import torch

from fast_run import fast
from toolkit.config import TrainConfig
from toolkit.privacy import FixedBatchSampler
from toolkit.plan import plan
from toolkit.privacy.rules import LargeDeltaWarning, check_delta, declared_units
from toolkit.train import make_sampler, train

FAST = fast(steps=2)


# ------------------------------------------------------------------------------------------------ δ

def test_a_delta_of_one_over_n_or_more_is_refused_naming_n_and_the_rule():
    for delta in (0.5, 1 / 32):
        with pytest.raises(ValueError, match=r"not below 1/N = 1/32 .*N = 32 records.*allow_large_delta"):
            train(TrainConfig(method="dp-sgd", epsilon=3.0, delta=delta, **FAST))


def test_an_accepted_large_delta_is_marked_outside_the_guarantee():
    result = train(TrainConfig(method="dp-sgd", epsilon=3.0, delta=0.5, allow_large_delta=True, **FAST))
    assert any("allow_large_delta" in note and "delta=0.5" in note
               for note in result.summary()["outside_the_guarantee"])


def test_a_delta_above_one_over_ten_n_warns_and_a_small_one_does_not():
    with pytest.warns(LargeDeltaWarning, match=r"1/\(10N\)"):
        check_delta(1 / 200, 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_delta(1 / 1000, 100)
        check_delta(1e-5, 100)


# ------------------------------------------------------------------------------------------- batch ≥ N

def test_a_batch_larger_than_the_data_set_is_refused():
    with pytest.raises(ValueError, match="expected_batch_size=40 is larger than the N = 32 records"):
        train(TrainConfig(method="dp-sgd", epsilon=3.0, **dict(FAST, expected_batch_size=40)))


def test_a_batch_of_the_whole_data_set_is_reported_as_q_one():
    result = train(TrainConfig(method="dp-sgd", epsilon=3.0, **dict(FAST, expected_batch_size=32)))
    assert result.sample_rate == 1.0 and result.summary()["sample_rate"] == 1.0


# ------------------------------------------------------------------------------------- declared size

def test_a_declared_size_below_the_data_is_refused_in_the_same_words_by_train_and_plan():
    words = r"dataset_size 5 is smaller than the training set's 32 records"
    with pytest.raises(ValueError, match=words):
        train(TrainConfig(method="dp-sgd", epsilon=3.0, dataset_size=5, **FAST))
    with pytest.raises(ValueError, match=words):
        plan(TrainConfig(method="dp-sgd", epsilon=3.0, dataset_size=5, **FAST), propose=False)
    assert declared_units(None, 32) == 32 and declared_units(32, 32) == 32 and declared_units(400, 32) == 400


# --------------------------------------------------------------------------------------- fixed batches

def _fixed(**fields) -> TrainConfig:
    return TrainConfig(method="dp-sgd", sampling="fixed", allow_fixed_batches=True, **dict(FAST, **fields))


def _first_batches(sampler, n: int = 4) -> list[list[int]]:
    return [b.tolist() for b in sampler.batches(n)]


def test_fixed_batches_of_a_private_run_come_from_the_secret_generator_not_the_public_seed():
    config = _fixed().resolved()
    secret = [_first_batches(make_sampler(config, 32, 32, 0.25)) for _ in range(3)]
    assert len({str(b) for b in secret}) > 1  # OS entropy: runs differ although seed=0 is public
    public = _first_batches(FixedBatchSampler(32, 8, seed=config.seed))
    assert all(b != public for b in secret)
    # a noise_seed (reproducible, not private) decides them; the public seed does not
    a = _first_batches(make_sampler(_fixed(noise_seed=3, seed=0).resolved(), 32, 32, 0.25))
    b = _first_batches(make_sampler(_fixed(noise_seed=3, seed=9).resolved(), 32, 32, 0.25))
    assert a == b


def test_a_resumed_fixed_batch_sampler_continues_the_same_order():
    sampler = FixedBatchSampler(32, 8, generator=torch.Generator().manual_seed(1))
    sampler.skip(3)
    state = sampler.state_dict()
    expected = _first_batches(sampler, 5)
    resumed = FixedBatchSampler(32, 8, generator=torch.Generator())
    resumed.load_state_dict(state)
    assert _first_batches(resumed, 5) == expected


def test_a_private_fixed_batch_run_is_marked_as_not_covered_by_the_poisson_accountant():
    with pytest.warns(UserWarning, match="fixed-size"):
        result = train(_fixed(epsilon=3.0))
    notes = result.summary()["outside_the_guarantee"]
    assert any("fixed-size" in note and "does NOT bound" in note for note in notes)
    assert result.summary()["privacy_segments"][0]["sampling"] == "fixed"


def test_a_planner_can_check_delta_without_warning_and_still_refuses():
    """plan_sweep checks every cell's δ without the warning (each cell's run gives it) and without touching the
    process-wide warning filters, which a run in another thread relies on."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_delta(1 / 200, 100, warn=False)
    with pytest.raises(ValueError, match="not below 1/N"):
        check_delta(0.5, 100, warn=False)

"""Privacy claims of a whole training run (``toolkit.train``): secret randomness, the sampling the accountant
assumes, empty batches, resume within the checkpoint's plan, and what leaves a private run.

Each test protects one claim and was checked to fail when that claim is broken in the code."""
from __future__ import annotations

import math

import pytest
import torch

from fast_run import FAST
import toolkit.privacy.update_pruning as update_pruning_module
import toolkit.zo as zo_module
from toolkit.config import TrainConfig
from toolkit.privacy import epsilon_for, history_epsilon
from toolkit.train import setup, train

# q = 1: every record joins every step, so the Poisson draw carries no randomness and only the noise differs.
ALL_RECORDS = dict(steps=2, train_limit=16, eval_limit=8, warm_start_steps=0, expected_batch_size=16, progress=False)


def trained_weights(result) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in result.bundle.model.parameters() if p.requires_grad])


def _differ_unless_seeded(**config):
    a, b = (trained_weights(train(TrainConfig(**config))) for _ in range(2))
    c, d = (trained_weights(train(TrainConfig(noise_seed=11, **config))) for _ in range(2))
    return not torch.equal(a, b), torch.equal(c, d)


# ------------------------------------------------------------------------------------ secret randomness

def test_dp_sgd_noise_is_secret_without_a_noise_seed():
    differ, reproducible = _differ_unless_seeded(method="dp-sgd", epsilon=3.0, **ALL_RECORDS)
    assert differ and reproducible


def test_dp_zo_noise_is_secret_without_a_noise_seed():
    differ, reproducible = _differ_unless_seeded(method="dp-zo", epsilon=3.0, **ALL_RECORDS)
    assert differ and reproducible


def test_fusion_noise_is_secret_without_a_noise_seed():
    # ε = ∞ and q = 1: no DP noise, no sampling randomness; only the fusion noise can make runs differ.
    differ, reproducible = _differ_unless_seeded(method="dual-priv", epsilon=math.inf, fusion_noise_std=0.5,
                                                 **ALL_RECORDS)
    assert differ and reproducible


def test_poisson_batches_are_secret_without_a_noise_seed():
    # ε = ∞: no noise, so only which records join each step can make runs differ.
    config = dict(method="dp-sgd", epsilon=math.inf, release_training_stats=True, **dict(FAST, steps=6))
    sizes = [train(TrainConfig(**config)).history.batch_size.tolist() for _ in range(3)]
    assert len({tuple(s) for s in sizes}) > 1
    seeded = [train(TrainConfig(noise_seed=5, **config)).history.batch_size.tolist() for _ in range(2)]
    assert seeded[0] == seeded[1]


@pytest.mark.parametrize("method", ["dp-sgd", "dp-zo"])
def test_secure_mode_reaches_the_noise_of_every_private_method(method, monkeypatch):
    seen = []
    module = update_pruning_module if method == "dp-sgd" else zo_module
    real = module.opacus_noise

    def spy(**kwargs):
        seen.append(kwargs["secure_mode"])
        return real(**kwargs)

    monkeypatch.setattr(module, "opacus_noise", spy)
    train(TrainConfig(method=method, epsilon=3.0, secure_mode=True, **FAST))
    assert seen and all(seen)


# ------------------------------------------------------------------------------ sampling and accounting

def _mean_batch_size(sampler, draws: int = 2000) -> float:
    return sum(len(sampler.sample()) for _ in range(draws)) / draws


def test_the_sampler_draws_at_the_rate_the_accountant_records():
    run = setup(TrainConfig(method="dp-sgd", epsilon=3.0, **FAST).resolved())
    q, n = run.sample_rate, run.sampler.n_records
    assert q == pytest.approx(8 / 32)
    mean = _mean_batch_size(run.sampler)
    assert mean == pytest.approx(q * n, abs=4 * math.sqrt(q * (1 - q) * n / 2000))
    run.optimizer.empty_step()
    assert run.optimizer.accountant.history[-1][1] == pytest.approx(q)


def test_the_sampler_uses_the_declared_dataset_size():
    run = setup(TrainConfig(method="dp-sgd", epsilon=3.0, dataset_size=128, **FAST).resolved())
    assert run.sampler.n_records == 128 and run.sample_rate == pytest.approx(8 / 128)
    # Expected batch size q·N over the declared N, not over the 32 records held.
    assert _mean_batch_size(run.sampler) == pytest.approx(8.0, abs=4 * math.sqrt(8 * (1 - 8 / 128) / 2000))


def test_empty_batches_are_noised_and_accounted_steps():
    # q = 2/1000 over 32 held records: almost every step holds none of them.
    result = train(TrainConfig(method="dp-sgd", epsilon=3.0, dataset_size=1000, **dict(FAST, expected_batch_size=2,
                                                                                       steps=4)))
    expected = epsilon_for(result.noise_multiplier, 2 / 1000, 4, 1e-5)
    assert result.epsilon_spent == pytest.approx(expected, abs=0.02)
    assert result.history.epsilon_spent.is_monotonic_increasing and len(result.history) == 4


# ------------------------------------------------------------------------------------------ resume

@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A dp-sgd run at ε = 1 planned for 6 steps, stopped after 3, checkpointed."""
    path = str(tmp_path_factory.mktemp("ckpt") / "run.pt")
    first = train(TrainConfig(method="dp-sgd", epsilon=1.0, checkpoint_path=path, **dict(FAST, steps=6)),
                  callback=lambda row: row["step"] < 3)
    assert first.steps == 3
    return path, first


def test_resume_with_more_steps_than_planned_is_refused(interrupted):
    path, _ = interrupted
    with pytest.raises(ValueError, match="steps: checkpoint 6, this config 40"):
        train(TrainConfig(method="dp-sgd", epsilon=1.0, resume_from=path, **dict(FAST, steps=40)))


def test_resume_with_another_epsilon_is_refused_without_a_new_budget(interrupted):
    path, _ = interrupted
    with pytest.raises(ValueError, match="epsilon: checkpoint 1, this config 8"):
        train(TrainConfig(method="dp-sgd", epsilon=8.0, resume_from=path, **dict(FAST, steps=6)))


def test_resume_with_a_new_budget_ends_within_it_and_reports_the_composition(interrupted):
    path, first = interrupted
    resumed = train(TrainConfig(method="dp-sgd", epsilon=2.0, resume_from=path, resume_new_budget=True,
                                **dict(FAST, steps=6)))
    assert resumed.steps == 6 and resumed.history.step.tolist() == [4, 5, 6]
    assert first.epsilon_spent < resumed.epsilon_spent <= 2.0
    assert resumed.epsilon_spent >= 2.0 - 0.02  # σ is calibrated on the composition, not as a fresh run
    composed = history_epsilon([(first.noise_multiplier, 0.25, 3), (resumed.noise_multiplier, 0.25, 3)], 1e-5)
    assert resumed.epsilon_spent == pytest.approx(composed, abs=1e-9)
    assert resumed.noise_multiplier < first.noise_multiplier  # the larger budget buys less noise


def test_a_new_budget_already_spent_is_refused(interrupted):
    path, first = interrupted
    with pytest.raises(ValueError, match="already spent"):
        train(TrainConfig(method="dp-sgd", epsilon=first.epsilon_spent / 2, resume_from=path,
                          resume_new_budget=True, **dict(FAST, steps=6)))


# ---------------------------------------------------------------------------- what leaves a private run

def test_private_runs_release_no_training_statistics_by_default():
    rows = []
    result = train(TrainConfig(method="dual-priv", epsilon=3.0, **FAST), callback=rows.append)
    for columns in [set(result.history.columns)] + [set(r) for r in rows]:
        assert not {"loss", "batch_size"} & columns
    summary = result.summary()
    assert summary["released_training_stats"] == []
    assert not any("statistics of the private batches" in note for note in summary["outside_the_guarantee"])


def test_released_training_statistics_are_named_outside_the_guarantee():
    result = train(TrainConfig(method="dp-sgd", epsilon=3.0, release_training_stats=True, **FAST))
    assert {"loss", "batch_size"} <= set(result.history.columns)
    summary = result.summary()
    assert summary["released_training_stats"] == ["loss", "batch_size"]
    assert any("loss, batch_size" in note for note in summary["outside_the_guarantee"])

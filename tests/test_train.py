"""The one training entry point: every method, the result fields, cancel, resume, the CLI."""
import json
import math

import pytest

from fast_run import fast
from toolkit.cli import main
from toolkit.train import METHODS, TrainConfig, train

FAST = fast(eval_limit=16)
JSON_FIELDS = {"method", "epsilon", "delta", "epsilon_spent", "noise_multiplier", "sample_rate", "steps", "accuracy",
               "peak_memory_mb", "step_time_s", "visual_tokens"}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_evaluates_and_reports_the_same_fields(method):
    result = train(TrainConfig(method=method, epsilon=3.0, **FAST))
    summary = result.summary()
    assert JSON_FIELDS <= set(summary)
    json.dumps(summary, default=str)
    assert 0.0 <= result.accuracy <= 1.0 and result.steps == 3
    assert list(result.history.columns[:4]) == ["step", "steps", "epsilon_spent", "lr"]
    # Loss, realised batch size, step time and peak memory are outside ε: released by non-private runs only (by
    # default; tests/test_privacy_release.py).
    assert ({"loss", "batch_size", "step_time_s"} <= set(result.history.columns)) == (method == "non-private")
    assert (result.peak_memory_mb > 0 and result.step_time_s > 0) == (method == "non-private")
    assert result.trainable_params > 0
    if method == "non-private":
        assert math.isinf(result.epsilon_spent) and result.noise_multiplier == 0
    else:
        assert 0 < result.epsilon_spent <= 3.0 and result.noise_multiplier > 0
        assert result.history.epsilon_spent.is_monotonic_increasing
        assert result.sample_rate == pytest.approx(8 / 32)
    assert result.visual_tokens == (16 if method == "dual-priv" else 64)


def test_dual_priv_prunes_tokens_and_updates():
    result = train(TrainConfig(method="dual-priv", epsilon=8.0, grad_prune_ratio=0.3, keep_tokens=24, **FAST))
    assert result.visual_tokens == 24
    assert result.history.kept_fraction.iloc[-1] == pytest.approx(0.7, abs=0.01)


def test_any_method_runs_with_pruned_tokens_for_ablations():
    result = train(TrainConfig(method="dp-sgd", token_strategy="random", keep_tokens=8, fusion_noise_std="matched", **FAST))
    assert result.visual_tokens == 8


def test_callback_false_cancels_cleanly_and_still_evaluates():
    seen = []
    result = train(TrainConfig(method="dp-sgd", **dict(FAST, steps=10)), callback=lambda row: seen.append(row) or len(seen) < 2)
    assert result.cancelled and result.steps == 2 and len(seen) == 2 and 0 <= result.accuracy <= 1


def test_resumed_run_keeps_counting_epsilon(tmp_path):
    ckpt = str(tmp_path / "run.pt")
    base = dict(FAST, steps=6)
    whole = train(TrainConfig(method="dual-priv", epsilon=4.0, **base))
    first = train(TrainConfig(method="dual-priv", epsilon=4.0, checkpoint_path=ckpt, **dict(base, steps=6)),
                  callback=lambda row: row["step"] < 3)
    assert first.steps == 3
    resumed = train(TrainConfig(method="dual-priv", epsilon=4.0, resume_from=ckpt, **base))
    assert resumed.steps == 6
    assert resumed.history.step.tolist() == [4, 5, 6]
    assert resumed.epsilon_spent == pytest.approx(whole.epsilon_spent, rel=1e-9)
    assert resumed.epsilon_spent > first.epsilon_spent


def test_resume_of_a_non_private_checkpoint_into_a_private_run_is_refused(tmp_path):
    ckpt = str(tmp_path / "np.pt")
    train(TrainConfig(method="non-private", checkpoint_path=ckpt, **FAST))
    with pytest.raises(ValueError, match="no DP-SGD state"):
        train(TrainConfig(method="dp-sgd", resume_from=ckpt, **FAST))


@pytest.mark.parametrize("change, message", [
    (dict(method="dp-magic"), "unknown method"),
    (dict(epsilon=0), "epsilon must be a number > 0"),
    (dict(epsilon=-1), "epsilon must be a number > 0"),
    (dict(delta=1.0), "delta must be in"),
    (dict(steps=0), "steps must be an integer >= 1"),
    (dict(grad_prune_ratio=1.0), "grad_prune_ratio must be in"),
    (dict(token_prune_ratio=-0.1), "token_prune_ratio must be in"),
    (dict(max_grad_norm=0), "max_grad_norm must be a finite number > 0"),
    (dict(fusion_noise_std="loud"), "fusion_noise_std"),
    (dict(sampling="fixed"), "[Ff]ixed"),
])
def test_bad_configs_fail_before_any_work_with_a_clear_message(change, message):
    with pytest.raises(ValueError, match=message):
        train(TrainConfig(**dict(dict(FAST, method="dp-sgd"), **change)))


def test_update_pruning_needs_a_private_gradient():
    with pytest.raises(ValueError, match="noisy gradient"):
        train(TrainConfig(method="non-private", grad_prune_ratio=0.2, **FAST))


def test_infinite_epsilon_runs_dp_sgd_without_noise():
    result = train(TrainConfig(method="dp-sgd", epsilon=math.inf, **FAST))
    assert result.noise_multiplier == 0.0


def test_eval_can_use_all_tokens_while_training_pruned():
    result = train(TrainConfig(method="dual-priv", prune_at_eval=False, **FAST))
    assert result.visual_tokens == 16 and 0 <= result.accuracy <= 1


def test_train_cli_writes_the_json_record(tmp_path):
    out = tmp_path / "run.json"
    code = main(["train", "--method", "dual-priv", "--epsilon", "2", "--steps", "2", "--train-limit", "16",
                 "--eval-limit", "8", "--warm-start-steps", "0", "--expected-batch-size", "4", "--progress", "false",
                 "--json", str(out)])
    assert code == 0
    record = json.loads(out.read_text())
    assert JSON_FIELDS <= set(record) and len(record["history"]) == 2 and record["epsilon_spent"] <= 2


def test_train_cli_reports_bad_values_without_a_traceback(capsys):
    assert main(["train", "--method", "dp-sgd", "--epsilon", "-1", "--steps", "2"]) == 2
    assert "epsilon must be a number > 0" in capsys.readouterr().err


def test_explicit_cpu_device_runs_and_a_missing_cuda_device_is_refused():
    import torch

    result = train(TrainConfig(method="dual-priv", device="cpu", **FAST))
    assert 0 <= result.accuracy <= 1
    with pytest.raises(ValueError, match="not a torch device"):
        TrainConfig(method="dp-sgd", device="gpu0", **FAST).resolved()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            TrainConfig(method="dp-sgd", device="cuda", **FAST).resolved()




@pytest.mark.parametrize("options", [dict(update_mask="past-noisy", grad_prune_ratio=0.5),
                                     dict(update_mask="public", grad_prune_ratio=0.5),
                                     dict(update_mask="random", grad_prune_ratio=0.5),
                                     dict(lora_variant="ffa"), dict(optimizer="dp-adambc")])
def test_update_mask_lora_variant_and_optimizer_options_train_within_the_same_budget(options):
    plain = train(TrainConfig(method="dual-priv", epsilon=3.0, **FAST))
    result = train(TrainConfig(method="dual-priv", epsilon=3.0, **dict(FAST, **options)))
    assert result.noise_multiplier == plain.noise_multiplier and result.epsilon_spent == plain.epsilon_spent
    if "update_mask" in options:
        assert result.history.kept_fraction.iloc[-1] == pytest.approx(0.5, abs=1e-3)
    if "lora_variant" in options:
        assert result.trainable_params < plain.trainable_params


def test_options_that_do_not_apply_are_refused():
    with pytest.raises(ValueError, match="needs grad_prune_ratio > 0"):
        TrainConfig(method="dp-sgd", update_mask="random", steps=1).resolved()
    with pytest.raises(ValueError, match="dp-adambc"):
        train(TrainConfig(method="dp-zo", optimizer="dp-adambc", **FAST))

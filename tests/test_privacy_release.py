"""What leaves a private run, over its whole life (issue 20): step time and peak memory are withheld by default
(they grow with the secret batch size), opting in names them outside the guarantee and in the model card, and a
resumed run carries every earlier segment's opt-outs and the accountant's whole history (σ, q, steps, δ).

Each test was checked to fail when the claim it protects is broken in the code."""
from __future__ import annotations

import json
import math

import pytest
import torch

from fast_run import FAST
from toolkit.checkpoint import PrivacyPlan
from toolkit.export import EXPORT_FILE
from toolkit.privacy import history_epsilon
from toolkit.privacy.release import checkpoint_segments, outside_the_guarantee
from toolkit.train import TrainConfig, train

COST = {"step_time_s", "peak_memory_mb"}


def _strings(value) -> str:
    """Every key and string of a (nested) checkpoint state, to look for a released name in it."""
    if isinstance(value, dict):
        return " ".join(str(k) + " " + _strings(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return " ".join(_strings(v) for v in value)
    return value if isinstance(value, str) else ""


# ---------------------------------------------------------------------- step time and peak memory

@pytest.mark.parametrize("method", ["dp-sgd", "dp-zo"])
def test_private_runs_withhold_step_time_and_peak_memory_by_default(method, tmp_path):
    rows = []
    checkpoint = tmp_path / "run.pt"
    result = train(TrainConfig(method=method, epsilon=3.0, checkpoint_path=str(checkpoint), **FAST),
                   callback=rows.append)
    for columns in [set(result.history.columns)] + [set(r) for r in rows]:
        assert not COST & columns
    summary = json.loads(json.dumps(result.summary(), default=str))
    assert math.isnan(float(summary["step_time_s"])) and math.isnan(float(summary["peak_memory_mb"]))
    assert "withheld" in summary["memory_method"]
    assert summary["released_training_stats"] == []
    assert not any("step_time_s" in note for note in summary["outside_the_guarantee"])
    state = torch.load(checkpoint, weights_only=False)
    assert "step_time" not in _strings(state) and "peak_memory" not in _strings(state)


def test_released_step_time_and_memory_are_named_outside_the_guarantee_and_in_the_card(tmp_path):
    result = train(TrainConfig(method="dp-sgd", epsilon=3.0, release_cost_stats=True, **FAST))
    assert "step_time_s" in result.history.columns
    assert result.peak_memory_mb > 0 and result.step_time_s > 0
    summary = result.summary()
    assert summary["released_training_stats"] == ["step_time_s", "peak_memory_mb"]
    assert any("step_time_s, peak_memory_mb" in note for note in summary["outside_the_guarantee"])
    card = (result.save(tmp_path / "export") / "README.md").read_text()
    assert "step_time_s, peak_memory_mb" in card


def test_non_private_runs_still_report_step_time_and_peak_memory():
    result = train(TrainConfig(method="non-private", **FAST))
    assert "step_time_s" in result.history.columns
    assert result.peak_memory_mb > 0 and result.step_time_s > 0


# ------------------------------------------------------------------------------ the run's whole life

@pytest.fixture(scope="module")
def seeded_then_resumed(tmp_path_factory):
    """Steps 1-2 of 4 with a noise_seed, checkpointed; steps 3-4 resumed WITHOUT one, at a new total budget and
    another δ, and exported."""
    folder = tmp_path_factory.mktemp("life")
    path = str(folder / "run.pt")
    first = train(TrainConfig(method="dp-sgd", epsilon=2.0, noise_seed=7, checkpoint_path=path,
                              **dict(FAST, steps=4)), callback=lambda row: row["step"] < 2)
    resumed = train(TrainConfig(method="dp-sgd", epsilon=3.0, delta=2e-5, resume_from=path,
                                resume_new_budget=True, checkpoint_path=str(folder / "again.pt"),
                                **dict(FAST, steps=4)))
    return first, resumed, resumed.save(folder / "export"), folder


def test_a_resumed_run_reports_the_noise_seed_of_an_earlier_segment(seeded_then_resumed):
    _, resumed, export, _ = seeded_then_resumed
    assert resumed.config.noise_seed is None
    notes = resumed.summary()["outside_the_guarantee"]
    assert any(note.startswith("steps 1-2") and "noise_seed" in note and "NO privacy guarantee" in note
               for note in notes)
    card = (export / "README.md").read_text()
    assert "steps 1-2" in card and "NO privacy guarantee" in card
    assert "noise_seed=7" not in card  # the seed's value stays secret


def test_a_checkpoint_of_a_resumed_run_keeps_the_earlier_opt_outs(seeded_then_resumed):
    _, _, _, folder = seeded_then_resumed
    again = train(TrainConfig(method="dp-sgd", epsilon=3.0, delta=2e-5, resume_from=str(folder / "again.pt"),
                              resume_new_budget=True, **dict(FAST, steps=5)))
    assert any(note.startswith("steps 1-2") and "noise_seed" in note
               for note in again.summary()["outside_the_guarantee"])
    assert [s["noise_seed_given"] for s in again.summary()["privacy_segments"]] == [True, False, False]


def test_the_run_json_and_export_hold_every_segment_and_the_epsilon_of_their_composition(seeded_then_resumed):
    first, resumed, export, _ = seeded_then_resumed
    segments = resumed.summary()["privacy_segments"]
    assert [(s["first_step"], s["last_step"]) for s in segments] == [(1, 2), (3, 4)]
    assert [s["delta"] for s in segments] == [1e-5, 2e-5]
    assert segments[0]["noise_multiplier"] == first.noise_multiplier
    assert segments[1]["noise_multiplier"] == resumed.noise_multiplier != first.noise_multiplier
    composed = history_epsilon([(s["noise_multiplier"], s["sample_rate"], s["steps"]) for s in segments], 2e-5)
    assert resumed.epsilon_spent == pytest.approx(composed, abs=1e-9)
    assert json.loads(json.dumps(resumed.summary(), default=str))["privacy_segments"] == segments
    assert json.loads((export / EXPORT_FILE).read_text())["privacy"]["segments"] == segments
    card = (export / "README.md").read_text()
    assert "Privacy history" in card
    assert f"| 1-2 | {first.noise_multiplier:.4g} | 0.25 | 1e-05 |" in card
    assert f"| 3-4 | {resumed.noise_multiplier:.4g} | 0.25 | 2e-05 |" in card


def test_a_checkpoint_from_before_segments_were_recorded_still_carries_its_noise_seed():
    plan = PrivacyPlan("dp-sgd", 3.0, 1e-5, 1.1, 0.25, 6, "prv")
    config = TrainConfig(method="dp-sgd", noise_seed=4, steps=6).resolved().to_dict()
    segments = checkpoint_segments(None, config, plan, step=3)
    assert [(s["first_step"], s["last_step"], s["noise_seed_given"]) for s in segments] == [(1, 3, True)]
    notes = outside_the_guarantee(TrainConfig(method="dp-sgd", steps=6).resolved(), (), segments + [{}])
    assert any(n.startswith("steps 1-3") and "a noise_seed was given" in n for n in notes)
    assert not any("noise_seed=4" in n for n in notes)

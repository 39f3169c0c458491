"""The one-run audit on real training (tiny preset, real Opacus): it has power when nothing is private, it stays
below the reported ε of every private method, and it catches an engine that silently drops the DP noise.

Every run is seeded (canaries, coins, noise, batches), so each test is deterministic; the thresholds sit below the
values measured over seeds 0-4 (docs/DESIGN.md, "Privacy audit"): at ε = ∞ the bound was 1.24-2.32 (dp-sgd),
0.38-2.32 (non-private), 1.03-2.32 (dual-priv); with 128 canaries and k = 16 it can never exceed 2.32.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from toolkit.audit import AUDIT_DEFAULTS, check_answers_known, run_audit
from toolkit.cli import main
from toolkit.config import TrainConfig
from toolkit.privacy import update_pruning
from toolkit.vocabulary import PRIVATE_METHODS

SEED = 0
CANARIES = 128


def config(method: str, epsilon: float, **overrides) -> TrainConfig:
    settings = dict(AUDIT_DEFAULTS, **overrides)
    return TrainConfig(method=method, epsilon=epsilon, progress=False, seed=SEED, noise_seed=SEED, **settings)


# ------------------------------------------------------------------------------------------ power at ε = ∞

@pytest.mark.slow
@pytest.mark.parametrize("method,threshold", [("dp-sgd", 1.0), ("non-private", 0.5)])
def test_audit_finds_the_leak_of_a_run_without_noise(method, threshold):
    result = run_audit(config(method, math.inf), canaries=CANARIES, seed=SEED)
    assert result.epsilon_reported == math.inf and result.noise_multiplier == 0.0
    assert result.epsilon_lower_bound > threshold, result.summary()["correct"]
    # the f-DP bound reads the same guesses more tightly (one-sided: the k "in" guesses)
    assert result.fdp_guesses == result.k and 0 < result.fdp_epsilon_lower_bound <= result.fdp_epsilon_ceiling
    assert result.scores[result.included].mean() > result.scores[~result.included].mean()
    assert not result.violation  # nothing can exceed ε = ∞


# ------------------------------------------------------------------------------------------ private methods

@pytest.mark.slow
@pytest.mark.parametrize("epsilon", [1.0, 3.0, 8.0])
@pytest.mark.parametrize("method", PRIVATE_METHODS)
def test_audit_stays_below_the_reported_epsilon(method, epsilon):
    result = run_audit(config(method, epsilon), canaries=CANARIES, seed=SEED)
    assert 0 < result.epsilon_reported <= epsilon and result.noise_multiplier > 0
    assert result.epsilon_lower_bound < result.epsilon_reported
    assert result.fdp_epsilon_lower_bound < result.epsilon_reported
    assert not result.violation and result.p_value_at_reported >= 0.05


# ------------------------------------------------------------------------------------------ a broken engine

@pytest.mark.slow
@pytest.mark.parametrize("method", ["dp-sgd", "dual-priv"])
def test_audit_catches_an_engine_that_drops_the_noise(method, monkeypatch):
    # The bug: the DP optimizer's Gaussian draw returns zeros, while σ and the accountant are untouched, so the
    # run still reports ε ≤ 1. The audit must prove it leaks more than that.
    calls = []

    def no_noise(std, reference, generator, secure_mode):
        calls.append(std)
        return torch.zeros_like(reference)

    monkeypatch.setattr(update_pruning, "opacus_noise", no_noise)
    result = run_audit(config(method, 1.0), canaries=CANARIES, seed=SEED)
    assert calls and all(std > 0 for std in calls)            # the patched draw is the one the engine uses
    assert result.noise_multiplier > 0 and result.epsilon_reported <= 1.0
    assert result.violation, (result.epsilon_lower_bound, result.epsilon_reported)
    assert result.p_value_at_reported < 0.05


# ------------------------------------------------------------------------------------------ plumbing

def test_declared_size_hides_how_many_canaries_joined():
    # A short run: the sampling rate is B / (records + canaries) whatever the coins say.
    result = run_audit(config("dp-sgd", math.inf, steps=2), canaries=16, k=2, seed=3)
    assert result.train_result.sample_rate == pytest.approx(AUDIT_DEFAULTS["expected_batch_size"]
                                                            / (AUDIT_DEFAULTS["train_limit"] + 16))
    assert result.train_result.extra["n_records"] == AUDIT_DEFAULTS["train_limit"] + 16
    assert (result.guesses, len(result.scores)) == (4, 16)
    again = run_audit(config("dp-sgd", math.inf, steps=2), canaries=16, k=2, seed=3)
    assert again.included.tolist() == result.included.tolist()   # the seed fixes canaries and coins


@pytest.mark.parametrize("kwargs,match", [
    (dict(canaries=1), "canaries must be an integer >= 2"),
    (dict(canaries=16, k=9), "2k <= canaries"),
    (dict(canaries=16, k=0), "k \\(guesses per side\\)"),
    (dict(canaries=16, confidence=1.5), "confidence"),
])
def test_bad_audit_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_audit(config("dp-sgd", 3.0, steps=1), **kwargs)


def test_bad_epsilon_is_refused():
    with pytest.raises(ValueError, match="epsilon must be a number > 0"):
        run_audit(config("dp-sgd", 0.0), canaries=16)


def test_cli_writes_the_audit_as_json(tmp_path, capsys):
    out = tmp_path / "audit.json"
    code = main(["audit", "--method", "dp-sgd", "--epsilon", "inf", "--steps", "2", "--canaries", "16",
                 "--warm-start-steps", "0",
                 "--k", "2", "--canary-seed", "0", "--noise-seed", "0", "--progress", "false", "--json", str(out)])
    assert code == 0
    record = json.loads(out.read_text())
    assert record["epsilon_reported"] == "inf" and record["method"] == "dp-sgd"
    assert record["canaries"] == 16 and record["guesses"] == 4 and len(record["included"]) == 16
    assert "does not prove" in record["what_it_proves"]
    assert "epsilon_lower_bound" in capsys.readouterr().out


@pytest.mark.parametrize("flags,message", [
    (["--canaries", "1"], "canaries must be"),
    (["--canaries", "16", "--k", "9"], "2k <= canaries"),
    (["--epsilon", "0"], "epsilon must be a number > 0"),
])
def test_cli_reports_bad_input(flags, message, capsys):
    assert main(["audit", "--method", "dp-sgd", "--progress", "false", *flags]) == 2
    assert message in capsys.readouterr().err


def test_canary_answers_a_word_level_tokenizer_cannot_spell_are_refused():
    """A local checkpoint's tokenizer may lack a canary answer: every such canary would read as <unk>."""
    core = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "zebra": 1}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>")
    check_answers_known(tokenizer, ("zebra",))
    with pytest.raises(ValueError, match="unknown to the tokenizer"):
        check_answers_known(tokenizer, ("zebra", "walrus"))

"""toolkit.stats: an accuracy read against the chance and majority-class baselines of its evaluation set, the exact
binomial test, the one-answer check, and the ε from which a run is effectively non-private."""
from __future__ import annotations

import math

import pytest

from toolkit import stats


def test_the_binomial_test_is_exact():
    assert stats.binomial_p_value(10, 10, 0.5) == pytest.approx(0.5 ** 10)
    assert stats.binomial_p_value(0, 10, 0.5) == pytest.approx(1.0)
    assert stats.binomial_p_value(9, 10, 0.5) == pytest.approx(11 / 1024)
    assert stats.binomial_p_value(60, 100, 0.5) == pytest.approx(0.0284, abs=1e-4)   # scipy.stats.binomtest


def test_a_model_that_answers_the_majority_class_for_everything_is_named_as_such():
    """The issue's case: 60 photos, 35 % of them 'temple', the model says 'temple' to all: 35 % is no result."""
    answers = ["temple"] * 21 + ["flower"] * 20 + ["tower"] * 19
    read = stats.verdict(21, 60, answers, ["temple"] * 60)
    assert read["collapsed"] and not read["learned"] and read["kind"] == "warn"
    assert read["majority"] == pytest.approx(0.35) and read["majority_answer"] == "temple"
    assert "answers 'temple' for 60 of 60" in read["sentence"]
    assert "one answer for (almost) everything" in read["sentence"] and "majority class 35.0%" in read["sentence"]


def test_learning_must_beat_the_majority_class_not_only_chance():
    answers = ["a"] * 80 + ["b"] * 20                 # chance 50 %, majority 80 %
    predictions = ["a"] * 70 + ["b"] * 30
    read = stats.verdict(70, 100, answers, predictions)
    assert read["baseline"] == "majority class" and not read["learned"]   # 70 % beats chance, not the majority
    assert "below the majority class baseline" in read["sentence"]
    good = stats.verdict(95, 100, answers, predictions)
    assert good["learned"] and good["kind"] == "ok" and "above the majority class baseline" in good["sentence"]
    assert good["p_value"] < 0.01


def test_an_accuracy_within_noise_of_chance_is_said_in_plain_words():
    answers = ["even", "odd"] * 148 + ["even"]
    read = stats.verdict(152, 297, answers, ["even", "odd"] * 148 + ["odd"])
    assert read["kind"] == "warn" and "Within noise of the majority class baseline" in read["sentence"]
    assert "± 5.8 points" in read["sentence"]
    assert stats.verdict(0, 0, [])["kind"] == "warn"


def test_declared_candidates_set_the_chance_level():
    read = stats.verdict(5, 10, [str(i % 5) for i in range(10)], None, candidates=[str(i) for i in range(10)])
    assert read["chance"] == pytest.approx(0.1) and read["n_candidates"] == 10 and not read["collapsed"]


def test_an_epsilon_so_large_that_sigma_is_negligible_is_effectively_non_private():
    kind, text = stats.privacy_strength(1e9, 0.0002)
    assert kind == "warn" and text.startswith("Effectively non-private") and "σ = 0.0002" in text
    assert stats.privacy_strength(3.0, 0.9) == ("ok", "")
    assert stats.privacy_strength(8.0, 0.6)[0] == "ok"
    assert stats.privacy_strength(20.0, None)[0] == "warn"                    # e^20 > 10^6
    assert stats.privacy_strength(math.inf, 0.05)[0] == "warn"
    assert stats.NON_PRIVATE_EPSILON == pytest.approx(13.8, abs=0.05)

"""Is an accuracy evidence of learning? The one place the toolkit reads a held-out accuracy against its baselines.

* :func:`chance_level` (a uniform guess among the candidate answers), :func:`majority_share` (always answering the
  evaluation set's most frequent answer), :func:`binomial_se` and :func:`noise_band` (the ± ``NOISE_SE`` standard
  errors of a guesser's accuracy on ``n`` records, the grey band of the figures);
* :func:`binomial_p_value`: the exact one-sided binomial test of ``correct`` of ``total`` against a baseline rate;
* :func:`verdict`: all of it at once for one evaluated model, with a plain sentence: within noise, below a
  baseline, or above both; and, when the model gives one answer for (almost) every record, that it did so (its
  accuracy is then the share of that answer, not learning);
* :func:`answers_verdict`: the same for a model's per-record answers (records with no known answer left out);
* :func:`privacy_strength`: whether an ε (and its noise multiplier σ) still protects anyone, or is effectively
  non-private.

Used by the dashboard (every accuracy it shows), the figures (:mod:`toolkit.viz.style`) and ``train``'s verdict.
"""
from __future__ import annotations

import math
from collections import Counter

NOISE_SE = 2.0            # within 2 standard errors of a baseline: not distinguishable from it (≈ 95 % two-sided)
SIGNIFICANCE = 0.05       # one-sided binomial test level for "above the baseline"
COLLAPSE_SHARE = 0.9      # one answer for at least 90 % of the records: the model predicts (almost) one answer
# ε from which the guarantee no longer says anything: e^ε > 10^6, so an attacker starting at 50:50 may end more
# than 99.9999 % sure that one image was in the training data (the posterior bound e^ε / (1 + e^ε)).
NON_PRIVATE_EPSILON = math.log(1e6)
# σ below which the noise is negligible: its standard deviation per step is under a tenth of one record's clipped
# gradient, so the run trains as clipped non-private SGD would (ε = 10^9 gave σ = 0.0002).
NON_PRIVATE_SIGMA = 0.1


def chance_level(n_candidates: int) -> float:
    """Accuracy of a uniform guess among ``n_candidates`` answers (nan when there is none)."""
    return 1.0 / n_candidates if n_candidates > 0 else math.nan


def majority_share(answers) -> tuple[str | None, float]:
    """The most frequent of ``answers`` and its share: the accuracy of always giving it ((None, nan) if empty)."""
    counts = Counter(answers)
    if not counts:
        return None, math.nan
    answer, count = counts.most_common(1)[0]
    return answer, count / sum(counts.values())


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy measured on ``n`` independent records when the true rate is ``p``."""
    return math.sqrt(p * (1 - p) / n) if n > 0 else math.inf


def noise_band(p: float, n: int) -> float:
    """Half-width of the band (± ``NOISE_SE`` standard errors) around a baseline rate ``p`` on ``n`` records."""
    return NOISE_SE * binomial_se(p, n)


def binomial_p_value(correct: int, total: int, p: float) -> float:
    """P(X >= correct) for X ~ Binomial(total, p): the exact one-sided test that the model beats rate ``p``."""
    if total <= 0:
        return math.nan
    if p <= 0:
        return 0.0 if correct > 0 else 1.0
    if p >= 1:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = [math.lgamma(total + 1) - math.lgamma(k + 1) - math.lgamma(total - k + 1) + k * log_p
             + (total - k) * log_q for k in range(max(0, correct), total + 1)]
    if not terms:
        return 0.0
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def verdict(correct: int, total: int, answers: list[str], predictions: list[str] | None = None,
            candidates=None) -> dict:
    """Read ``correct`` of ``total`` against the chance and majority-class baselines of the evaluation set.

    ``answers`` are the evaluation set's true answers, ``predictions`` the model's (None when not kept: the
    one-answer check is then skipped), ``candidates`` the closed set ranked (default: the distinct ``answers``).
    Returns a JSON-ready dict: ``accuracy``, ``correct``, ``total``, ``chance``, ``n_candidates``, ``majority``,
    ``majority_answer``, ``baseline`` (the stronger of the two: what learning must beat), ``p_value`` (one-sided
    exact binomial test against it), ``gap_se`` (standard errors above it), ``top_prediction``, ``top_share``,
    ``collapsed`` (one answer for at least ``COLLAPSE_SHARE`` of the records), ``learned`` (above the baseline at
    ``SIGNIFICANCE`` and not collapsed), ``kind`` (``ok`` or ``warn``) and ``sentence`` (plain words).
    """
    if total <= 0:
        return dict(accuracy=math.nan, correct=0, total=0, learned=False, collapsed=False, kind="warn",
                    sentence="Not scored: the evaluation set has no record with a known answer.")
    accuracy = correct / total
    choices = sorted(set(candidates if candidates else answers))
    chance = chance_level(len(choices))
    majority_answer, majority = majority_share(answers)
    baseline_name, baseline = ("majority class", majority) if majority > chance else ("chance", chance)
    p_value = binomial_p_value(correct, total, baseline)
    se = binomial_se(baseline, total)
    gap = (accuracy - baseline) / se if se > 0 else math.inf
    top_prediction, top_share = majority_share(predictions or [])
    collapsed = predictions is not None and len(predictions) > 0 and top_share >= COLLAPSE_SHARE
    learned = p_value < SIGNIFICANCE and not collapsed
    baselines = (f"chance {_percent(chance)} ({len(choices)} answers), majority class {_percent(majority)} "
                 f"(always {majority_answer!r})")
    head = f"{_percent(accuracy)} ({correct} of {total} test records)"
    if collapsed:
        share = predictions.count(top_prediction)
        text = (f"The model answers {top_prediction!r} for {share} of {len(predictions)} test records: it predicts "
                f"one answer for (almost) everything, so {head} is the share of {top_prediction!r} in the test set, "
                f"not learning. Baselines: {baselines}.")
    elif learned:
        text = (f"{head} is above the {baseline_name} baseline ({baselines}): {gap:.1f} standard errors, one-sided "
                f"binomial test p = {p_value:.2g}.")
    elif accuracy < baseline - noise_band(baseline, total):
        text = (f"{head} is below the {baseline_name} baseline ({baselines}): answering {majority_answer!r} every "
                f"time would score more. This run has not learned the task.")
    else:
        text = (f"Within noise of the {baseline_name} baseline: {head} against {baselines}; a guesser lands within "
                f"± {100 * noise_band(baseline, total):.1f} points (binomial test p = {p_value:.2g}). This run has "
                "not measurably learned; more steps, a larger ε or a larger batch may help.")
    return dict(accuracy=accuracy, correct=correct, total=total, chance=chance, n_candidates=len(choices),
                majority=majority, majority_answer=majority_answer, baseline=baseline_name, p_value=p_value,
                gap_se=gap, top_prediction=top_prediction, top_share=top_share, collapsed=collapsed,
                learned=learned, kind="ok" if learned else "warn", sentence=text)


def answers_verdict(predictions: list[str], truth: list[str], correct: list, candidates=None) -> dict:
    """:func:`verdict` of a model's ``predictions`` against the evaluation set's ``truth``; ``correct`` holds
    True/False per record, None where the record's answer is unknown (such records are left out)."""
    scored = [(p, t) for p, t, ok in zip(predictions, truth, correct) if ok is not None]
    n_correct = sum(1 for ok in correct if ok)
    return verdict(n_correct, len(scored), [t for _, t in scored], [p for p, _ in scored], candidates or None)


def privacy_strength(epsilon: float, sigma: float | None = None) -> tuple[str, str]:
    """``(kind, sentence)``: ``("warn", ...)`` when ε (or its σ) is so large that the run is effectively
    non-private (ε >= ``NON_PRIVATE_EPSILON`` or σ < ``NON_PRIVATE_SIGMA``), else ``("ok", "")``."""
    reasons = []
    if epsilon is not None and math.isfinite(epsilon) and epsilon >= NON_PRIVATE_EPSILON:
        reasons.append(f"ε = {epsilon:g} is at least {NON_PRIVATE_EPSILON:.1f}, where e^ε exceeds a million: an "
                       "attacker starting at 50:50 may end more than 99.9999% sure that an image was trained on")
    if sigma is not None and math.isfinite(sigma) and 0 <= sigma < NON_PRIVATE_SIGMA:
        reasons.append(f"its noise multiplier σ = {sigma:.2g} is below {NON_PRIVATE_SIGMA:g}: the noise per step "
                       "is under a tenth of one image's clipped gradient, so training is that of clipped "
                       "non-private SGD")
    if not reasons:
        return "ok", ""
    return "warn", "Effectively non-private: " + "; and ".join(reasons) + "."

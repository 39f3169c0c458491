"""Is an accuracy distinguishable from always answering the evaluation set's most common answer?

A held-out accuracy on ``n`` records is a binomial measurement. The reference a user's result must beat is the
*majority class* (the share of the most common answer in the evaluation set: what a model that learned nothing
but the label prior scores), not the uniform chance of the candidates. :func:`majority_verdict` compares the
two with a one-sided exact binomial test and the normal standard error ``sqrt(p (1 - p) / n)``.

(The dashboard helper's ``toolkit/stats.py`` carries the same verdict; this module is the train/plan side's copy
until the two are merged.)

Example::

    >>> v = majority_verdict(0.52, 200, ["a"] * 100 + ["b"] * 100)
    >>> v["majority"], v["beats_majority"]
    (0.5, False)
"""
from __future__ import annotations

import math
from collections import Counter

from scipy.stats import binomtest

NOISE_SE = 2.0   # more than 2 standard errors above the majority share: learned (≈ 97.7 % one-sided)


def majority_share(answers) -> tuple[float, str | None]:
    """(share of the most common answer, that answer) among ``answers`` (None entries ignored)."""
    known = [str(a).strip().lower() for a in answers if a is not None]
    if not known:
        return math.nan, None
    answer, count = Counter(known).most_common(1)[0]
    return count / len(known), answer


def majority_verdict(accuracy: float | None, n: int, answers) -> dict:
    """The accuracy against the majority class of ``answers`` (the evaluation set's reference answers).

    Returns ``majority`` (its share), ``majority_answer``, ``se`` (binomial s.e. at that share on ``n`` records),
    ``z`` (standard errors above it), ``p_value`` (exact one-sided binomial test that accuracy > majority),
    ``beats_majority`` (z > ``NOISE_SE``) and ``sentence`` (the verdict in words)."""
    share, answer = majority_share(answers)
    out = dict(majority=share, majority_answer=answer, se=None, z=None, p_value=None, beats_majority=False)
    if accuracy is None or n <= 0 or math.isnan(share) or math.isnan(accuracy):
        out["sentence"] = "no accuracy measured: nothing to compare with the majority class"
        return out
    se = math.sqrt(share * (1 - share) / n)
    z = (accuracy - share) / se if se > 0 else (math.inf if accuracy > share else 0.0)
    k = int(round(accuracy * n))
    p_value = float(binomtest(k, n, share, alternative="greater").pvalue) if 0 < share < 1 else (
        0.0 if accuracy > share else 1.0)
    beats = z > NOISE_SE
    out.update(se=se, z=z, p_value=p_value, beats_majority=beats)
    if beats:
        out["sentence"] = (f"{100 * accuracy:.1f}% is {z:.1f} standard errors above the majority class "
                           f"({answer!r}, {100 * share:.1f}% of {n} evaluation records; binomial p = {p_value:.2g})")
    else:
        out["sentence"] = (f"within noise of the majority class: {100 * accuracy:.1f}% vs always answering "
                           f"{answer!r} ({100 * share:.1f}% of {n} evaluation records, ± {100 * NOISE_SE * se:.1f} "
                           f"points at 2 s.e.; binomial p = {p_value:.2g}): this run has not measurably learned")
    return out

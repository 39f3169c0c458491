"""Empirical privacy audit in one training run (Steinke, Nasr & Jagielski 2023): an ε *lower* bound.

The accountant gives an *upper* bound on ε from the algorithm's analysis; it says nothing about whether the code
does what the analysis assumes. This module measures from the outside how much a run actually leaks about its
records, and turns that into an ε that the run provably exceeds (at 95 % confidence):

1. Draw ``m`` canary records (:func:`make_canaries`) and flip an independent fair coin ``S_i ∈ {−1, +1}`` for
   each: canary ``i`` joins the private training set iff ``S_i = +1``. The coins are the secret the auditor
   guesses; the declared data-set size is fixed at ``len(data) + m`` so the sampling rate does not depend on
   them.
2. Train once, with the method and config under audit (:func:`toolkit.train.train`, real Opacus).
3. Score each canary by how much training lowered its loss: ``s_i = L_i(θ_0) − L_i(θ_T)``.
4. Guess ``T_i = +1`` ("in") for the ``k`` highest scores, ``T_i = −1`` ("out") for the ``k`` lowest, and abstain
   on the rest: ``r = 2k`` guesses, ``v`` of them correct (``T_i = S_i``).
5. The bound: if the training algorithm is (ε, δ)-DP with respect to adding/removing one record, then
   (Steinke, Nasr & Jagielski 2023, arXiv:2305.08846: their main theorem for approximate DP, and the p-value
   procedure of their appendix that this module follows)::

       P[v correct or more] ≤ f(ε, v) = β + 2·m·δ·α,    q = e^ε / (1 + e^ε),  B ~ Binomial(r, q)
       β = P[B ≥ v],    α = max_{i = 1..v}  P[v − i ≤ B < v] / i

   With δ = 0 this is the tail of ``r`` guesses each correct with probability ``e^ε / (1 + e^ε)``, the best an
   ε-DP algorithm allows (randomised response). The audit reports the largest ε it rejects::

       ε_lb = sup { ε ≥ 0 : f̃(ε, v) < 1 − confidence },   f̃(ε, v) = min_{v' ≤ v} f(ε, v')

   (the minimum over ``v' ≤ v`` is a valid bound because ``P[≥ v] ≤ P[≥ v']``; it keeps f̃ non-increasing in
   ``v`` so that rejecting is a level-(1 − confidence) test; when ``2mδ ≤ 1`` f itself is non-increasing, see
   :func:`one_run_p_value`). Taking the *sup* over every rejected ε is sound because an ε-DP algorithm is also
   ε'-DP for every ε' ≥ ε, so it must survive all those tests at once, and their combined bound is still one
   function of ``v``.

Why these canaries: a random-noise image with the task's question and an answer drawn uniformly from 19 number
words (:data:`CANARY_ANSWERS`). The tiny model never sees such images in the real data, so nothing but the canary
itself teaches the model its answer, and with 19 answers a canary shares its answer with only 1/19 of the others,
so what the other canaries teach barely moves its loss. Mislabelled digits (parity flipped) or noise images with a
binary answer give the audit almost no power on the tiny model: each canary's loss is then dominated by what the
other half of the canaries (with the same answer) and the real data teach (measured: AUC 0.51 and 0.53 vs 0.79
for 19 answers at the same training budget; see ``docs/DESIGN.md``).

What the audit proves, and what it does not:

* ``ε_lb > ε reported`` (:attr:`AuditResult.violation`) **proves a bug** (or a wrong accounting), at the stated
  confidence: no (ε, δ)-DP algorithm lets an auditor guess that well except with probability ≤ 1 − confidence.
* ``ε_lb ≤ ε reported`` **does not prove the implementation is private**. One run with a few hundred canaries is
  a weak attack: the audit can never show more than :attr:`AuditResult.epsilon_ceiling` (all ``r`` guesses
  right; ≈ 2.3 for m = 128, k = 16), so at ε = 3 or 8 it cannot catch anything by construction, and even below
  its ceiling a leak smaller than the attack's power goes unseen; and a DP-ZO run barely moves any one canary's
  loss, so on the tiny preset this attack did not catch a broken DP-ZO engine in any of 5 seeded runs. It is a
  smoke test for gross bugs such as DP-SGD noise that was silently dropped (tested), not a proof.
* The bound is valid only for ``k`` fixed before looking at the scores (choosing k afterwards is p-hacking).

Example (about 20 s on a CPU, so not run as a doctest; ``tests/test_audit_runs.py`` runs the same audit). A dp-sgd
run at ε = ∞ leaks, so the audit finds ε_lb clearly above 0 (``noise_seed`` makes the run reproducible, and
therefore NOT private: for tests and demonstrations only)::

    >>> import math
    >>> from toolkit.audit import AUDIT_DEFAULTS, run_audit
    >>> from toolkit.config import TrainConfig
    >>> config = TrainConfig(method="dp-sgd", epsilon=math.inf, progress=False, noise_seed=0, **AUDIT_DEFAULTS)
    >>> result = run_audit(config, canaries=128, k=16, seed=0)     # doctest: +SKIP
    >>> result.epsilon_lower_bound > 1.0, result.violation            # doctest: +SKIP
    (True, False)

Privacy unit: one record = one source image; a canary is one record.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from PIL import Image
from scipy import special, stats

from toolkit.config import TrainConfig
from toolkit.data import Collator, VQADataset, VQARecord, make_vqa
from toolkit.features import encode_records, make_pruner_for
from toolkit.forward import LlavaLM, per_example_loss
from toolkit.train import TrainResult, load_bundle, train
from toolkit.validation import check_int, check_number
from toolkit.vocabulary import METHOD_COLOURS, format_epsilon, method_label

__all__ = ["AUDIT_DEFAULTS", "CANARY_ANSWERS", "AuditResult", "one_run_p_value", "epsilon_lower_bound",
           "epsilon_ceiling", "guess_membership", "count_correct", "make_canaries", "canary_losses",
           "run_audit", "audit_table", "audit_figure"]

# Answers of the canaries: 19 single-token number words (in the tiny presets' vocabulary and in real tokenizers).
CANARY_ANSWERS = tuple(str(i) for i in range(19))

# Training settings under which the audit has power on the tiny preset (measured over seeds; docs/DESIGN.md):
# small Poisson batches and many steps make each included canary a large part of the few batches it is in.
AUDIT_DEFAULTS = dict(steps=80, expected_batch_size=16, lr=2e-3, train_limit=32, eval_limit=32,
                      warm_start_steps=0)

# Grid points scanned for the last rejected ε before bisecting (see epsilon_lower_bound).
_GRID_POINTS = 400
_TOLERANCE = 1e-7


# ------------------------------------------------------------------------------------------------ the bound

def _check_counts(m, r, v) -> tuple[int, int, int]:
    m = check_int("m (canaries)", m, minimum=1)
    r = check_int("r (guesses)", r, minimum=0, maximum=m)
    v = check_int("v (correct guesses)", v, minimum=0, maximum=r)
    return m, r, v


def _check_delta(delta) -> float:
    delta = check_number("delta", delta, minimum=0, strict=False)
    if delta >= 1:
        raise ValueError(f"delta must be in [0, 1), got {delta!r}")
    return delta


def _check_confidence(confidence) -> float:
    confidence = check_number("confidence", confidence)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return confidence


def _bounds(m: int, r: int, v: int, epsilons, delta: float) -> np.ndarray:
    """The paper's ``f(ε, v)`` for every ε in ``epsilons`` (vectorised over ε), before any minimum."""
    epsilons = np.atleast_1d(np.asarray(epsilons, dtype=float))
    if v == 0:
        return np.ones_like(epsilons)                               # P[at least 0 correct] = 1
    q = special.expit(epsilons)[:, None]                            # e^ε / (1 + e^ε); 1 at ε = ∞
    # sf[:, j] = P[B ≥ j] for j = 0..v (binom.sf(j − 1) = P[B > j − 1]); upper tails keep their precision.
    sf = stats.binom.sf(np.arange(-1, v)[None, :], r, q)
    beta = sf[:, v]                                                 # P[B ≥ v]
    if delta == 0:
        return np.clip(beta, 0.0, 1.0)
    i = np.arange(1, v + 1)
    between = sf[:, v - i] - beta[:, None]                          # P[v − i ≤ B < v]
    alpha = np.max(between / i, axis=1)
    return np.clip(beta + 2.0 * m * delta * alpha, 0.0, 1.0)


def _tail_bounds(m: int, r: int, v_max: int, epsilon: float, delta: float) -> np.ndarray:
    """``f(ε, v)`` for ``v = 0..v_max`` at one ε (what the running minimum of :func:`one_run_p_value` scans)."""
    return np.array([_bounds(m, r, v, epsilon, delta)[0] for v in range(v_max + 1)])


def _p_values(m: int, r: int, v: int, epsilons, delta: float) -> np.ndarray:
    """:func:`one_run_p_value` for every ε in ``epsilons``."""
    if 2.0 * m * delta <= 1.0:
        return _bounds(m, r, v, epsilons, delta)
    return np.min([_bounds(m, r, vv, epsilons, delta) for vv in range(v + 1)], axis=0)


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """p-value of "the run is (ε, δ)-DP" given ``v`` correct guesses out of ``r`` on ``m`` canaries.

    ``min_{v' ≤ v} f(ε, v')`` with ``f`` from the module docstring (Steinke, Nasr & Jagielski 2023). When
    ``2mδ ≤ 1`` the minimum is ``f(ε, v)`` itself, so the O(v²) scan is skipped: each ratio in ``α(v + 1)``,
    ``P[v + 1 − i ≤ B ≤ v] / i``, is a weighted mean of ``P[B = v]`` and a ratio in ``α(v)``, so
    ``α(v + 1) ≤ α(v) + P[B = v]`` while ``β`` drops by ``P[B = v]``, so
    ``f(v + 1) − f(v) ≤ (2mδ − 1)·P[B = v] ≤ 0``.
    (With ``2mδ > 1`` no case where the minimum binds below 1 was found numerically; it is kept as a guard.)

    >>> round(one_run_p_value(m=100, r=10, v=10, epsilon=0.0, delta=0.0), 12) == round(0.5 ** 10, 12)
    True
    """
    m, r, v = _check_counts(m, r, v)
    epsilon = check_number("epsilon", epsilon, minimum=0, strict=False, allow_inf=True)
    delta = _check_delta(delta)
    return float(_p_values(m, r, v, epsilon, delta)[0])


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest ε rejected at ``confidence``: ``sup{ε ≥ 0 : p(ε) < 1 − confidence}`` (0.0 if none).

    ``p(ε) ≥ P[Binomial(r, q(ε)) ≥ v]``, which rises with ε, so nothing beyond the ε where that tail reaches
    ``1 − confidence`` can be rejected (with δ = 0 that ε is the answer). Below it ``p`` is evaluated on a grid
    and the crossing after the *last* rejected grid point is bisected (the δ term need not be monotone in ε).
    Every value returned is itself a rejected ε, so the answer errs low, by at most the bisection tolerance
    (or a rejected sliver narrower than the grid step, if one exists).

    >>> round(epsilon_lower_bound(m=100, r=20, v=20, delta=0.0), 4)   # logit(0.05 ** (1/20))
    1.8227
    """
    m, r, v = _check_counts(m, r, v)
    delta = _check_delta(delta)
    level = 1.0 - _check_confidence(confidence)
    if v == 0 or _p_values(m, r, v, 0.0, delta)[0] >= level:
        return 0.0

    def bisect(rejected, lo: float, hi: float) -> float:  # rejected(lo) holds, rejected(hi) does not
        while hi - lo > _TOLERANCE:
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if rejected(mid) else (lo, mid)
        return lo

    def tail_rejects(eps: float) -> bool:
        return _bounds(m, r, v, eps, 0.0)[0] < level

    top = 1.0
    while tail_rejects(top) and top < 1e3:  # q(ε) rounds to 1 long before ε = 1000
        top *= 2.0
    if tail_rejects(top):
        return float(top)
    top_rejected = bisect(tail_rejects, 0.0, top)
    if delta == 0:
        return float(top_rejected)
    grid = np.linspace(0.0, top_rejected, _GRID_POINTS + 1)
    rejected = np.flatnonzero(_p_values(m, r, v, grid, delta) < level)
    last = int(rejected[-1])                                       # grid[0] = 0 is rejected (checked above)
    if last == _GRID_POINTS:
        return float(top_rejected)
    return float(bisect(lambda eps: _p_values(m, r, v, eps, delta)[0] < level, grid[last], grid[last + 1]))


def epsilon_ceiling(m: int, r: int, delta: float, confidence: float = 0.95) -> float:
    """The most an audit with ``r`` guesses on ``m`` canaries can ever show: the bound with every guess right."""
    return epsilon_lower_bound(m, r, r, delta, confidence)


# ------------------------------------------------------------------------------------------------ guesses

def guess_membership(scores, k: int) -> np.ndarray:
    """``+1`` ("in") for the ``k`` highest scores, ``−1`` ("out") for the ``k`` lowest, ``0`` (abstain) else.

    Ties are broken by position (the canaries' order is independent of the coins, so this leaks nothing).
    """
    scores = np.asarray(scores, dtype=float)
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D (one per canary), got shape {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite (a canary's loss was NaN or inf)")
    m = check_int("m (canaries)", len(scores), minimum=2)
    k = check_int("k (guesses per side)", k, minimum=1)
    if 2 * k > m:
        raise ValueError(f"k = {k} guesses per side need 2k <= m, but m = {m} canaries")
    order = np.argsort(-scores, kind="stable")
    guesses = np.zeros(m, dtype=int)
    guesses[order[:k]] = 1
    guesses[order[m - k:]] = -1
    return guesses


def count_correct(guesses, included) -> tuple[int, int]:
    """``(r, v)``: guesses made (non-zero) and correct ones (``+1`` on an included canary, ``−1`` on an excluded)."""
    guesses = np.asarray(guesses, dtype=int)
    included = np.asarray(included, dtype=bool)
    if guesses.shape != included.shape:
        raise ValueError(f"guesses {guesses.shape} and included {included.shape} differ in shape")
    truth = np.where(included, 1, -1)
    return int(np.count_nonzero(guesses)), int(np.sum(guesses * truth == 1))


# ------------------------------------------------------------------------------------------------ canaries

def make_canaries(m: int, image_size: int, question: str, rng: np.random.Generator,
                  answers: tuple[str, ...] = CANARY_ANSWERS) -> list[VQARecord]:
    """``m`` records, each a uniform-noise RGB image with ``question`` and an answer drawn uniformly from
    ``answers`` (see the module docstring for why this canary type)."""
    m = check_int("m (canaries)", m, minimum=2)
    if len(answers) < 2:
        raise ValueError(f"canaries need at least two possible answers, got {answers!r}")
    records = []
    for j in range(m):
        pixels = rng.integers(0, 256, size=(image_size, image_size, 3), dtype=np.uint8)
        answer = str(answers[int(rng.integers(len(answers)))])
        records.append(VQARecord(f"canary-{j}", Image.fromarray(pixels, mode="RGB"), question, answer,
                                 (f"canary-{j}",)))
    return records


def membership_coins(rng: np.random.Generator, canaries: list[VQARecord]) -> np.ndarray:
    """The secret coins ``S_i``: canary ``i`` joins the training set iff ``True``; fair, independent of each other
    and of the canaries themselves (their images and answers), drawn after them."""
    return rng.random(len(canaries)) < 0.5


def check_answers_known(tokenizer, answers) -> None:
    """Refuse answers the tokenizer cannot spell: they would all become ``<unk>`` and the audit would be blind."""
    unk = getattr(tokenizer, "unk_token_id", None)
    unknown = [a for a in answers
               if unk is not None and unk in tokenizer(" " + a, add_special_tokens=False)["input_ids"]]
    if unknown:
        raise ValueError(f"canary answers {unknown[:5]} are unknown to the tokenizer (they would all read as "
                         "<unk>); pass answers it can spell")


class _Scorer:
    """Per-canary loss under a model: the canaries' visual tokens are computed once (the tower is frozen) and
    reused for the starting and the trained model, so both see exactly the same inputs."""

    def __init__(self, bundle, config: TrainConfig, canaries: list[VQARecord], batch_size: int = 128):
        pruner = make_pruner_for(bundle, config)
        self.features = encode_records(bundle, pruner, canaries)
        self.collator = Collator(bundle.tokenizer, pruner.n_out, bundle.image_token_id, bundle.prompt_template)
        self.canaries, self.batch_size = canaries, batch_size

    @torch.no_grad()
    def __call__(self, bundle) -> np.ndarray:
        lm = LlavaLM(bundle).bind_collator(self.collator)
        was_training = lm.training
        lm.eval()
        device = next(lm.parameters()).device
        losses = []
        for start in range(0, len(self.canaries), self.batch_size):
            batch = self.collator(self.canaries[start:start + self.batch_size])
            features = self.features[start:start + self.batch_size].to(device)
            logits = lm(features, batch["input_ids"].to(device), batch["attention_mask"].to(device))
            losses.append(per_example_loss(logits, batch["labels"].to(device)).float().cpu())
        lm.train(was_training)
        return torch.cat(losses).numpy().astype(float)


def canary_losses(bundle, config: TrainConfig, canaries: list[VQARecord]) -> np.ndarray:
    """Per-canary loss (mean cross-entropy over the answer tokens) under ``bundle``'s model."""
    return _Scorer(bundle, config.resolved(), canaries)(bundle)


# ------------------------------------------------------------------------------------------------ the audit

@dataclass
class AuditResult:
    """One audited run. ``summary()`` is the JSON-ready record (the CLI writes it)."""

    method: str
    epsilon_target: float           # the config's ε (∞ for non-private)
    epsilon_reported: float         # what the accountant reports the run spent (∞ for non-private / σ = 0)
    delta: float
    confidence: float
    canaries: int                   # m
    k: int                          # guesses per side
    guesses: int                    # r = 2k
    correct: int                    # v
    epsilon_lower_bound: float
    epsilon_ceiling: float
    p_value_at_reported: float      # p-value of "(ε reported, δ)-DP"; < 1 − confidence is a violation
    scores: np.ndarray = field(repr=False)
    included: np.ndarray = field(repr=False)
    membership_guesses: np.ndarray = field(repr=False)
    seed: int = 0
    noise_multiplier: float = 0.0
    steps: int = 0
    accuracy: float = float("nan")
    wall_time_s: float = 0.0
    label: str = ""
    train_result: TrainResult | None = field(default=None, repr=False)

    @property
    def violation(self) -> bool:
        """True when the audit proves the run leaks more than its reported ε (a bug, at ``confidence``)."""
        return self.epsilon_lower_bound > self.epsilon_reported

    def summary(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("scores", "included", "membership_guesses", "train_result")}
        out.update(violation=self.violation, scores=self.scores.tolist(),
                   included=self.included.astype(int).tolist(),
                   membership_guesses=self.membership_guesses.tolist(),
                   in_scores_mean=float(self.scores[self.included].mean()) if self.included.any() else None,
                   out_scores_mean=float(self.scores[~self.included].mean()) if (~self.included).any() else None,
                   what_it_proves=("the run leaks more than its reported ε: a bug" if self.violation else
                                   "nothing: a lower bound below the reported ε does not prove the run private"))
        return out


def _fresh_seed() -> int:
    return int(np.random.SeedSequence().entropy % (2 ** 63))


def run_audit(config: TrainConfig, *, canaries: int = 128, k: int | None = None, seed: int | None = None,
              confidence: float = 0.95, answers: tuple[str, ...] = CANARY_ANSWERS,
              train_set: VQADataset | None = None, eval_set: VQADataset | None = None,
              label: str = "") -> AuditResult:
    """Audit ``config``'s method in one training run (see the module docstring for the procedure and maths).

    Args:
        config: the run under audit (method, ε, δ, schedule, ...). :data:`AUDIT_DEFAULTS` gives a schedule under
            which the audit has power on the tiny preset. Its ``dataset_size`` is raised to
            ``len(data) + canaries`` if smaller, so the sampling rate does not depend on the coins.
        canaries: m, the number of canaries (≥ 2).
        k: guesses per side (``2k ≤ m``); default ``m // 8``. Fix it before looking at scores.
        seed: canaries and coin flips (None: fresh OS entropy, recorded in the result). The training's own
            noise and sampling come from ``config.noise_seed`` (None: secret, as in a real run).
        confidence: of the lower bound (default 95 %).
        answers: the canaries' possible answers (tokens the model's tokenizer can spell).
        train_set / eval_set: data instead of the config's embedded task splits; the canaries are added to
            ``train_set``.
        label: free text carried to the result and the figure (e.g. "noise removed").
    """
    started = time.perf_counter()
    m = check_int("canaries", canaries, minimum=2)
    k = m // 8 if k is None else k
    k = check_int("k (guesses per side)", k, minimum=1)
    if 2 * k > m:
        raise ValueError(f"k = {k} guesses per side need 2k <= canaries, but canaries = {m}")
    confidence = _check_confidence(confidence)
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    c = config.resolved()
    if c.resume_from:
        raise ValueError("an audit trains from the start: resume_from is not supported")
    seed = _fresh_seed() if seed is None else check_int("seed", seed, minimum=0)
    rng = np.random.default_rng([seed, 0xA0D17])

    # The starting model: its canary losses are the baseline the score subtracts (then it is dropped).
    start = load_bundle(c)
    check_answers_known(start.tokenizer, answers)
    data = train_set if train_set is not None else make_vqa(c.task, c.train_split, start.image_size,
                                                            limit=c.train_limit)
    if eval_set is None:
        eval_set = make_vqa(c.task, c.eval_split, start.image_size, limit=c.eval_limit)
    question = data.records[0].question if len(data) else "what is this ?"
    canary_records = make_canaries(m, start.image_size, question, rng, answers)
    included = membership_coins(rng, canary_records)                    # the secret coins S_i
    scorer = _Scorer(start, c, canary_records)
    before = scorer(start)
    del start

    # One training run on the real data plus the included canaries; the declared size hides how many joined.
    train_records = list(data.records) + [r for r, keep in zip(canary_records, included) if keep]
    declared = max(c.dataset_size or 0, len(data) + m)
    run_config = dataclasses.replace(config, dataset_size=declared)
    result = train(run_config, train_set=VQADataset(train_records, data.candidates, name=f"{data.name}+canaries"),
                   eval_set=eval_set)
    after = scorer(result.bundle)

    scores = before - after
    guesses = guess_membership(scores, k)
    r, v = count_correct(guesses, included)
    reported = result.epsilon_spent if c.private else math.inf
    delta = float(c.delta)
    lower = epsilon_lower_bound(m, r, v, delta, confidence)
    p_reported = one_run_p_value(m, r, v, reported, delta) if math.isfinite(reported) else 1.0
    return AuditResult(
        method=c.method, epsilon_target=float(c.epsilon) if c.private else math.inf,
        epsilon_reported=float(reported), delta=delta, confidence=confidence, canaries=m, k=k, guesses=r,
        correct=v, epsilon_lower_bound=lower, epsilon_ceiling=epsilon_ceiling(m, r, delta, confidence),
        p_value_at_reported=float(p_reported), scores=scores, included=included, membership_guesses=guesses,
        seed=seed, noise_multiplier=result.noise_multiplier, steps=result.steps, accuracy=result.accuracy,
        wall_time_s=time.perf_counter() - started, label=label, train_result=result)


# ------------------------------------------------------------------------------------------------ figures

def audit_table(results) -> pd.DataFrame:
    """One row per audit from :class:`AuditResult` objects, their ``summary()`` dicts, or a DataFrame of them."""
    if isinstance(results, pd.DataFrame):
        table = results.copy()
    else:
        rows = [r.summary() if isinstance(r, AuditResult) else dict(r) for r in results]
        table = pd.DataFrame(rows)
    if table.empty:
        raise ValueError("no audit results to show")
    needed = ["method", "epsilon_reported", "epsilon_lower_bound", "epsilon_ceiling", "guesses", "correct"]
    missing = [col for col in needed if col not in table.columns]
    if missing:
        raise ValueError(f"audit results lack {missing} (give AuditResult objects or their summary() dicts)")
    if "label" not in table.columns:
        table["label"] = ""
    table["label"] = table["label"].fillna("")
    if "epsilon_target" not in table.columns:
        table["epsilon_target"] = table["epsilon_reported"]
    for col in ("epsilon_target", "epsilon_reported", "epsilon_lower_bound", "epsilon_ceiling"):
        # the CLI's JSON spells ε = ∞ "inf" (strict JSON has no infinity)
        table[col] = pd.to_numeric(table[col].replace({"inf": math.inf}), errors="coerce")
    table["epsilon_target"] = table["epsilon_target"].fillna(table["epsilon_reported"])
    return table


def audit_figure(results):
    """The audit next to the accountant: target ε (x, log scale, ∞ at the right end) vs the empirical lower bound
    (y), one marker per run and method (methods side by side at each ε).

    Grey dashed: y = ε. A run is a *violation* when its bound exceeds the ε its accountant *reported* (≤ the
    target); violations get a thick black outline and say so on hover. Dotted: the audit's ceiling (every guess
    right); nothing above it can ever be shown, so a target ε above the ceiling is out of the audit's reach.
    Runs with a ``label`` (e.g. "noise removed") are drawn as crosses.
    """
    table = audit_table(results)
    table["target"] = table["epsilon_target"]
    table["violation"] = table["epsilon_lower_bound"] > table["epsilon_reported"]
    finite = sorted(e for e in table["target"].unique() if math.isfinite(e))
    inf_x = finite[-1] * 3 if finite else 1.0
    ceiling = float(table["epsilon_ceiling"].max())
    top = 1.3 * max(ceiling, float(table["epsilon_lower_bound"].max()), 1.0)
    methods = [m for m in ("non-private", "dp-sgd", "dual-priv", "dp-zo") if m in set(table["method"])]
    methods += sorted(set(table["method"]) - set(methods))
    fig = go.Figure()
    if finite:
        line = np.geomspace(min(finite) / 1.6, max(finite) * 1.6, 60)
        fig.add_trace(go.Scatter(x=line, y=line, mode="lines", name="ε (above it: a bug)",
                                 line=dict(color="#999999", dash="dash"), hoverinfo="skip"))
    fig.add_hline(y=ceiling, line_dash="dot", line_color="#555555",
                  annotation_text=f"audit ceiling {ceiling:.2f} (every guess right)", annotation_position="top left")
    for position, method in enumerate(methods):
        shift = 1.0 + 0.07 * (position - (len(methods) - 1) / 2)   # side by side on the log axis
        for label, group in table[table["method"] == method].groupby("label", sort=True):
            name = method_label(method) + (f" ({label})" if label else "")
            x = group["target"].where(np.isfinite(group["target"]), inf_x) * shift
            hover = [f"target ε {format_epsilon(t)}, reported {format_epsilon(r, 3)}<br>{int(c)}/{int(g)} guesses "
                     f"right{'<br><b>VIOLATION: leaks more than reported</b>' if bad else ''}"
                     for t, r, c, g, bad in zip(group["target"], group["epsilon_reported"], group["correct"],
                                                group["guesses"], group["violation"])]
            fig.add_trace(go.Scatter(
                x=x, y=group["epsilon_lower_bound"], mode="markers", name=name, text=hover,
                marker=dict(size=12, color=METHOD_COLOURS.get(method, "#444444"),
                            symbol="x" if label else "circle",
                            line=dict(width=[3 if bad else 1 for bad in group["violation"]],
                                      color=["#000000" if bad else "#ffffff" for bad in group["violation"]])),
                hovertemplate=f"{name}<br>lower bound %{{y:.2f}}<br>%{{text}}<extra></extra>"))
    has_inf = bool((~np.isfinite(table["target"])).any())
    ticks = finite + ([inf_x] if has_inf else [])
    fig.update_xaxes(type="log", tickvals=ticks,
                     ticktext=[format_epsilon(e) for e in finite] + (["∞"] if has_inf else []),
                     title="target ε of the run (log scale); the accountant reports at most this")
    fig.update_yaxes(title="empirical ε lower bound", range=[0, top])
    confidence = float(table["confidence"].iloc[0]) if "confidence" in table else 0.95
    canaries = int(table["canaries"].max()) if "canaries" in table else None
    sub = (f"one run each (Steinke, Nasr & Jagielski 2023): {int(table['guesses'].max())} guesses on "
           f"{canaries if canaries else '?'} canaries, {confidence:.0%} confidence; one record = one source image"
           "<br>above the dashed line: a proven bug; below it: consistent with the reported ε, not a proof")
    fig.update_layout(title=dict(text=f"Privacy audit: the reported ε vs what one run shows<br><sup>{sub}</sup>",
                                 x=0.01, xanchor="left"),
                      template="plotly_white", width=820, height=500, legend=dict(title="method"),
                      margin=dict(t=110))
    return fig

"""One audited training run: canaries in with independent coins, train, score, guess, bound (see
:mod:`toolkit.audit`)."""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import numpy as np

from toolkit.audit.bound import (_check_confidence, count_correct, epsilon_ceiling, epsilon_lower_bound,
                                 guess_membership, one_run_p_value)
from toolkit.audit.canaries import (CANARY_ANSWERS, _Scorer, check_answers_known, make_canaries,
                                    membership_coins)
from toolkit.audit.fdp import count_in_guesses, fdp_epsilon_ceiling, fdp_epsilon_lower_bound
from toolkit.config import TrainConfig
from toolkit.data import VQADataset, make_vqa
from toolkit.train import TrainResult, load_bundle, train
from toolkit.validation import check_int


# Training settings under which the audit has power on the tiny preset (measured over seeds; docs/DESIGN.md):
# small Poisson batches and many steps make each included canary a large part of the few batches it is in.
AUDIT_DEFAULTS = dict(steps=200, expected_batch_size=16, lr=2e-3, train_limit=32, eval_limit=32,
                      warm_start_steps=0)


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
    # the f-DP one-run bound (toolkit.audit.fdp) on the "in" guesses: tests the Gaussian curve through (ε, δ)
    fdp_guesses: int = 0
    fdp_correct: int = 0
    fdp_epsilon_lower_bound: float = 0.0
    fdp_epsilon_ceiling: float = 0.0

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
    r_in, v_in = count_in_guesses(guesses, included)
    p_reported = one_run_p_value(m, r, v, reported, delta) if math.isfinite(reported) else 1.0
    return AuditResult(
        method=c.method, epsilon_target=float(c.epsilon) if c.private else math.inf,
        epsilon_reported=float(reported), delta=delta, confidence=confidence, canaries=m, k=k, guesses=r,
        correct=v, epsilon_lower_bound=lower, epsilon_ceiling=epsilon_ceiling(m, r, delta, confidence),
        p_value_at_reported=float(p_reported), scores=scores, included=included, membership_guesses=guesses,
        seed=seed, noise_multiplier=result.noise_multiplier, steps=result.steps, accuracy=result.accuracy,
        wall_time_s=time.perf_counter() - started, label=label, train_result=result, fdp_guesses=r_in,
        fdp_correct=v_in, fdp_epsilon_lower_bound=fdp_epsilon_lower_bound(m, r_in, v_in, delta, confidence),
        fdp_epsilon_ceiling=fdp_epsilon_ceiling(m, r_in, delta, confidence))

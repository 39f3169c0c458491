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
* Next to it, :attr:`AuditResult.fdp_epsilon_lower_bound` reads the same run with the f-DP one-run test
  (Mahloujifar et al. 2025, :mod:`toolkit.audit.fdp`) on the ``k`` "in" guesses: it tests the Gaussian trade-off
  curve through (ε, δ), a stronger claim that DP-SGD's curve is close to, and certifies more from fewer guesses
  (ceiling 2.58 from the 16 "in" guesses vs 2.32 from all 32 at m = 128; 4.99 vs 3.73 at m = 512, k = 64).

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

from toolkit.audit.bound import (_tail_bounds, count_correct, epsilon_ceiling, epsilon_lower_bound, guess_membership,
                                 one_run_p_value)
from toolkit.audit.canaries import CANARY_ANSWERS, canary_losses, check_answers_known, make_canaries, membership_coins
from toolkit.audit.fdp import count_in_guesses, fdp_epsilon_ceiling, fdp_epsilon_lower_bound
from toolkit.audit.figure import audit_figure, audit_table
from toolkit.audit.run import AUDIT_DEFAULTS, AuditResult, run_audit

__all__ = ["AUDIT_DEFAULTS", "CANARY_ANSWERS", "AuditResult", "one_run_p_value", "epsilon_lower_bound",
           "epsilon_ceiling", "guess_membership", "count_correct", "make_canaries", "membership_coins",
           "check_answers_known", "canary_losses", "run_audit", "audit_table", "audit_figure",
           "fdp_epsilon_lower_bound", "fdp_epsilon_ceiling", "count_in_guesses"]

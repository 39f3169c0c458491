"""The built-in sweeps (:data:`NAMED_SWEEPS`), quick mode (``$DUALPRIV_QUICK``) and the LoRA-rank control.

Contract: :func:`named_sweep` returns a fresh :class:`~toolkit.sweeps.plan.Sweep` (never a shared object), shrunk
by :meth:`~toolkit.sweeps.plan.Sweep.quick_version` when quick mode is on. :func:`matched_lora_rank` and
:func:`lora_rank_arms` build models to count parameters (seconds, cached per process) but train nothing.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Callable

from toolkit.config import overlay
from toolkit.models import apply_trainable, build_model
from toolkit.sweeps.plan import Sweep, check_fields, preset_patches
from toolkit.vocabulary import METHODS

QUICK_ENV = "DUALPRIV_QUICK"
EPSILONS = (0.5, 1.0, 3.0, 8.0, math.inf)

# The recipe measured on the embedded task (shared/MEASURED.md): warm-started tiny model, parity task on the
# private split (700 records, one per source image), expected batch 128, 20 epochs, C = 1, δ = 1e-5.
FULL_BASE = dict(preset="tiny", task="parity", expected_batch_size=128, epochs=20.0, delta=1e-5,
                 max_grad_norm=1.0, trainable="lora+head", lora_rank=8)


def is_quick() -> bool:
    """True when ``$DUALPRIV_QUICK`` is set to 1/true/yes/on (notebooks and CI shrink steps, grids and limits)."""
    return os.environ.get(QUICK_ENV, "").strip().lower() in ("1", "true", "yes", "on")


# ----------------------------------------------------------------------------------- LoRA rank vs pruning

@functools.lru_cache(maxsize=None)
def trainable_count(preset: str, trainable: str, lora_rank: int) -> int:
    """Trainable parameters of ``preset`` in ``trainable`` mode at ``lora_rank`` (built and counted, no training)."""
    return int(apply_trainable(build_model(preset), trainable, lora_rank))


def matched_lora_rank(preset: str, trainable: str, rank: int, grad_prune_ratio: float) -> dict:
    """The LoRA rank whose trainable count best matches ``rank`` with update pruning at ``grad_prune_ratio``.

    With global update pruning a step updates U = round((1 - p) · N(r)) coordinates, N(r) the trainable count
    at rank r. N is affine in r: N(r) = N_fixed + r · N_per_rank (projector and head are fixed; every LoRA pair
    on a d_in x d_out linear adds r · (d_in + d_out)); both terms are measured by building the model at two ranks.
    The matched rank r' >= 1 minimises |N(r') - U|; it is *not* round(r · (1 - p)), because the fixed part is
    pruned too. ``r_prime`` is None when even rank 1 updates more than U (the fixed part alone exceeds U).

    Returns dict(rank, grad_prune_ratio, updated_params=U, n_fixed, n_per_rank, r_prime, r_prime_params,
    mismatch (relative)). Raises ``ValueError`` unless ``0 < grad_prune_ratio < 1``.
    """
    if isinstance(grad_prune_ratio, bool) or not isinstance(grad_prune_ratio, (int, float)) \
            or not 0 < grad_prune_ratio < 1:
        raise ValueError(f"grad_prune_ratio must be in (0, 1), got {grad_prune_ratio!r}")
    n1, n2 = trainable_count(preset, trainable, 1), trainable_count(preset, trainable, 2)
    per_rank, fixed = n2 - n1, n1 - (n2 - n1)
    target = round((1 - grad_prune_ratio) * (fixed + rank * per_rank))
    ideal = (target - fixed) / per_rank if per_rank else 0
    candidates = [r for r in {math.floor(ideal), math.ceil(ideal)} if 1 <= r <= rank]
    r_prime = min(candidates, key=lambda r: (abs(fixed + r * per_rank - target), r)) if candidates else None
    if r_prime is None and ideal > rank:
        r_prime = rank
    params = None if r_prime is None else fixed + r_prime * per_rank
    return dict(rank=rank, grad_prune_ratio=grad_prune_ratio, updated_params=target, n_fixed=fixed,
                n_per_rank=per_rank, r_prime=r_prime, r_prime_params=params,
                mismatch=None if params is None else (params - target) / target)


def lora_rank_arms(preset: str = "tiny", trainable: str = "lora+head", rank: int = 8,
                   ratios=(0.1, 0.2, 0.3), max_mismatch: float = 0.05) -> list[dict]:
    """Bundled-axis values for the ``lora-rank`` sweep: the reference (rank r, no pruning), and for each ratio p
    the pair "rank r + update pruning p" vs "rank r' without pruning" at (nearly) equal updated parameters
    (see :func:`matched_lora_rank`). A ratio whose best match is off by more than ``max_mismatch`` gives no
    pair (documented, not silently approximated)."""
    full = trainable_count(preset, trainable, rank)
    arms = [dict(label=f"r={rank}, no pruning", lora_rank=rank, grad_prune_ratio=0.0,
                 tags=dict(pair="reference", arm_kind="reference", updated_params_target=full))]
    for p in ratios:
        m = matched_lora_rank(preset, trainable, rank, p)
        if m["r_prime"] is None or abs(m["mismatch"]) > max_mismatch:
            continue
        pair = f"{(1 - p) * 100:.0f}% updated"
        arms.append(dict(label=f"r={rank}, prune {p:g}", lora_rank=rank, grad_prune_ratio=p,
                         tags=dict(pair=pair, arm_kind="update pruning", updated_params_target=m["updated_params"])))
        arms.append(dict(label=f"r={m['r_prime']}, no pruning", lora_rank=m["r_prime"], grad_prune_ratio=0.0,
                         tags=dict(pair=pair, arm_kind="lower rank", updated_params_target=m["r_prime_params"])))
    return arms


# ------------------------------------------------------------------------------------------- named sweeps

def _privacy_utility(preset: str) -> Sweep:
    return Sweep(
        "privacy-utility", base=dict(FULL_BASE, preset=preset),
        grid=dict(method=list(METHODS), epsilon=list(EPSILONS)), seeds=[0, 1, 2],
        description="Accuracy of the four methods across ε (one record = one source image); non-private once, "
                    "at ε = ∞ (N1).",
        quick=dict(grid=dict(epsilon=[1.0, math.inf])),
    )


def _ablation(preset: str) -> Sweep:
    return Sweep(
        "ablation", base=dict(FULL_BASE, preset=preset, method="dual-priv", epsilon=3.0),
        grid=dict(token_strategy=["dual-priv", "dual-priv-random"], contextual_tokens=[None, 0],
                  fusion_noise_std=["matched", None], grad_prune_ratio=[0.2, 0.0]),
        seeds=[0, 1, 2],
        description="Dual-Priv at ε = 3 with each mechanism on/off: [CLS]-attention vs random selection (same "
                    "layout), contextual fusion (default k vs 0), fusion noise ('matched' vs off; heuristic, "
                    "outside the DP guarantee), update pruning (0.2 vs 0). Noise without fused tokens is skipped "
                    "(R2), so 12 of the 16 combinations run.",
        # quick: selection x update pruning only (fusion and matched noise on), 4 cells
        quick=dict(grid=dict(contextual_tokens=[None], fusion_noise_std=["matched"])),
    )


def _budget(preset: str) -> Sweep:
    n = preset_patches(preset) or 64
    keeps = [16, 24, 32, 48, 64] if n <= 64 else [32, 64, 128, 192, 288, 576]
    return Sweep(
        "budget", base=dict(FULL_BASE, preset=preset, method="dual-priv", epsilon=3.0, token_prune_ratio=None),
        grid=dict(token_strategy=["dual-priv", "dual-priv-random", "random", "pool"], keep_tokens=keeps),
        seeds=[0, 1, 2],
        description=f"Accuracy vs visual tokens fed to the LLM ({n} patches in), per selection strategy, "
                    "Dual-Priv at ε = 3.",
        quick=dict(grid=dict(token_strategy=["dual-priv", "random"], keep_tokens=[keeps[0], keeps[-1]])),
    )


def _lora_rank(preset: str) -> Sweep:
    trainable = FULL_BASE["trainable"]
    return Sweep(
        "lora-rank", base=dict({k: v for k, v in FULL_BASE.items() if k != "lora_rank"}, preset=preset,
                                method="dual-priv", epsilon=3.0, pruned_state="freeze"),
        grid=dict(arm=lora_rank_arms(preset, trainable, 8)), seeds=[0, 1, 2],
        description="LoRA rank 8 with update pruning p vs a lower rank r' without pruning, at equal updated "
                    "parameters per step (r' from measured trainable counts, see matched_lora_rank). "
                    "pruned_state='freeze', so a pruned coordinate does not move by Adam momentum either: "
                    "exactly (1 - p) of the trainable coordinates change per step.",
        quick=dict(grid=dict(arm=lora_rank_arms(preset, trainable, 8, ratios=(0.2,)))),
    )


# The study's DP-SGD: ghost-fp32's clipped sum in ONE backward (book-keeping; the same clipped sum as hooks and
# as Opacus' ghost clipping). Tiny preset, batch 128, 1 thread (benchmarks/step_cost.py --cold, 2026-12-07):
# 0.73 s a step against 1.28 s with Opacus' two-pass ghost clipping and 0.82 s with hooks. Up to the eighth
# session the study ran "ghost"; its finished cells keep that in their rows.
STUDY_DP_SGD = dict(method="dp-sgd", grad_sample_mode="ghost-fp32-bk")


def update_mask_arms() -> list[dict]:
    """Bundled-axis values of the ``update-masks`` tuning sweep (issue 14): every method gets the same optimizer
    options (learning rate, DP-AdamBC, FFA-LoRA), and Dual-Priv every way of choosing where the update goes.

    DP-SGD runs as :data:`STUDY_DP_SGD` (one-pass book-keeping), which is why the equal-compute view is judged
    by analytic FLOPs, not by measured times. The batch/epoch arms spend Dual-Priv's cheaper steps (16 of 64
    visual tokens: 2.8x fewer FLOPs than DP-SGD's step) on 2-3x the examples at the same ε; those over DP-SGD's
    FLOPs are reported but do not qualify for that view. :mod:`toolkit.sweeps.study` picks the winners."""
    def arm(label, **fields):
        return dict(label=label, **fields)

    dp_sgd = STUDY_DP_SGD
    return [
        arm("DP-SGD", **dp_sgd),
        arm("DP-SGD, lr 1e-2", **dp_sgd, lr=1e-2),
        arm("DP-SGD, lr 2e-3", **dp_sgd, lr=2e-3),
        arm("DP-SGD + DP-AdamBC", **dp_sgd, optimizer="dp-adambc"),
        arm("DP-SGD, FFA-LoRA", **dp_sgd, lora_variant="ffa"),
        arm("Dual-Priv (paper: noisy mask, prune 0.2)", method="dual-priv"),
        arm("Dual-Priv (paper), lr 1e-2", method="dual-priv", lr=1e-2),
        arm("Dual-Priv (paper), lr 2e-3", method="dual-priv", lr=2e-3),
        arm("Dual-Priv, no update pruning", method="dual-priv", grad_prune_ratio=0.0),
        arm("Dual-Priv, noisy mask, prune 0.8", method="dual-priv", grad_prune_ratio=0.8),
        arm("Dual-Priv, past-noisy mask, prune 0.5", method="dual-priv", update_mask="past-noisy",
            grad_prune_ratio=0.5),
        arm("Dual-Priv, public mask, prune 0.5", method="dual-priv", update_mask="public", grad_prune_ratio=0.5),
        arm("Dual-Priv, random mask, prune 0.5", method="dual-priv", update_mask="random", grad_prune_ratio=0.5),
        arm("Dual-Priv, FFA-LoRA", method="dual-priv", lora_variant="ffa"),
        arm("Dual-Priv + DP-AdamBC", method="dual-priv", optimizer="dp-adambc"),
        arm("Dual-Priv, batch 256, 40 epochs", method="dual-priv", expected_batch_size=256, epochs=40.0),
        arm("Dual-Priv, batch 384, 60 epochs", method="dual-priv", expected_batch_size=384, epochs=60.0),
        arm("Dual-Priv, batch 128, 60 epochs", method="dual-priv", epochs=60.0),
        # lr 1e-2 won for both methods at the edge of the first grid: extend it, and give the strongest options
        # the better learning rate too (a fair comparison tunes each side as well as the other)
        arm("DP-SGD, lr 2e-2", **dp_sgd, lr=2e-2),
        arm("DP-SGD + DP-AdamBC, lr 1e-2", **dp_sgd, optimizer="dp-adambc", lr=1e-2),
        arm("Dual-Priv (paper), lr 2e-2", method="dual-priv", lr=2e-2),
        arm("Dual-Priv + DP-AdamBC, lr 1e-2", method="dual-priv", optimizer="dp-adambc", lr=1e-2),
        arm("Dual-Priv, past-noisy mask, prune 0.5, lr 1e-2", method="dual-priv", update_mask="past-noisy",
            grad_prune_ratio=0.5, lr=1e-2),
        arm("Dual-Priv, batch 256, 40 epochs, lr 1e-2", method="dual-priv", expected_batch_size=256, epochs=40.0,
            lr=1e-2),
    ]


def _validation_sweep(name: str, preset: str, arms: list[dict], quick_arms: list[dict], description: str) -> Sweep:
    """The shape the study's validation sweeps share: the study recipe at ε = 3, scored on the VALIDATION split,
    seeds 0-1, one bundled ``arm`` axis (``quick_arms`` in quick mode)."""
    return Sweep(name, base=dict(FULL_BASE, preset=preset, epsilon=3.0, eval_split="validation"),
                 grid=dict(arm=arms), seeds=[0, 1], description=description, quick=dict(grid=dict(arm=quick_arms)))


def _update_masks(preset: str) -> Sweep:
    arms = update_mask_arms()
    return _validation_sweep(
        "update-masks", preset, arms, [arms[0], arms[5], arms[10]],
        "Tuning at ε = 3, scored on the VALIDATION split (report on test only for the configurations chosen here, "
        "toolkit.sweeps.study): DP-SGD and Dual-Priv with the same optimizer options, Dual-Priv with the paper's "
        "post-noise mask, masks fixed before the noise (past-noisy, public, random), FFA-LoRA, DP-AdamBC, and "
        "Dual-Priv spending its cheaper steps on more examples.")


def dual_priv_budget_arms(preset: str = "tiny") -> list[dict]:
    """Bundled-axis values of ``dual-priv-budgets``: the update keep fraction from 0.05 to 1.0 with the paper's
    post-noise mask and with the past-noisy pre-noise mask, and the visual-token budget from 8 to all patches."""
    arms = []
    for keep in (0.05, 0.1, 0.2, 0.5, 0.8, 1.0):
        for mask in ("noisy", "past-noisy"):
            if keep == 1.0 and mask == "past-noisy":
                continue   # keeping everything: no mask at all, the same run as "noisy" at 1.0
            arms.append(dict(label=f"keep {keep:g} of the update, {mask} mask", method="dual-priv",
                             update_mask=mask, grad_prune_ratio=round(1 - keep, 4),
                             tags=dict(update_keep=keep, visual_tokens_kept=16)))
    n = preset_patches(preset) or 64
    for keep_tokens in (8, 16, 32, n):
        arms.append(dict(label=f"{keep_tokens} of {n} visual tokens", method="dual-priv", keep_tokens=keep_tokens,
                         token_prune_ratio=None, tags=dict(update_keep=0.8, visual_tokens_kept=keep_tokens)))
    return arms


def _dual_priv_budgets(preset: str) -> Sweep:
    arms = dual_priv_budget_arms(preset)
    return _validation_sweep(
        "dual-priv-budgets", preset, arms, arms[:2],
        "Dual-Priv at ε = 3 on the VALIDATION split: the fraction of the update kept (0.05 to 1.0; the paper's "
        "post-noise mask and the past-noisy pre-noise mask) and the visual tokens kept (8 to all).")


def noised_dimension_arms(preset: str = "tiny", ranks=(2, 4, 8, 16, 32)) -> list[dict]:
    """Bundled-axis values of ``dp-lora-ranks``: DP-SGD and Dual-Priv (each at lr 1e-2, the better learning rate
    of both in the ``update-masks`` tuning) at each LoRA rank. The rank sets how many coordinates get noise: on
    the tiny preset with ``lora+head``, rank 2 trains 0.76x and rank 32 1.96x the coordinates of rank 8 (the
    projector and the LM head are trained at every rank)."""
    reference = trainable_count(preset, FULL_BASE["trainable"], 8)
    arms = []
    for rank in ranks:
        noised = trainable_count(preset, FULL_BASE["trainable"], rank)
        for label, fields in (("DP-SGD", STUDY_DP_SGD),
                              ("Dual-Priv", dict(method="dual-priv"))):
            arms.append(dict(label=f"{label}, LoRA rank {rank}", **fields, lr=1e-2, lora_rank=rank,
                             tags=dict(lora_rank=rank, trainable_params=noised,
                                       vs_rank_8=round(noised / reference, 3))))
    return arms


def _dp_lora_ranks(preset: str) -> Sweep:
    return _validation_sweep(
        "dp-lora-ranks", preset, noised_dimension_arms(preset), noised_dimension_arms(preset, ranks=(2,)),
        "DP-SGD and Dual-Priv at ε = 3 on the VALIDATION split at LoRA rank 2 to 32: fewer trained coordinates, "
        "less noise in total, less capacity.")


NAMED_SWEEPS: dict[str, Callable[[str], Sweep]] = {
    "update-masks": _update_masks,
    "dual-priv-budgets": _dual_priv_budgets,
    "dp-lora-ranks": _dp_lora_ranks,
    "privacy-utility": _privacy_utility,
    "ablation": _ablation,
    "budget": _budget,
    "lora-rank": _lora_rank,
}


def named_sweep(name: str, quick: bool | None = None, preset: str = "tiny", **base) -> Sweep:
    """A built-in sweep (:data:`NAMED_SWEEPS`): ``privacy-utility``, ``ablation``, ``budget``, ``lora-rank``,
    ``update-masks``, ``dual-priv-budgets``, ``dp-lora-ranks``.

    Args:
        quick: shrink it for CI (:meth:`Sweep.quick_version`); default: :func:`is_quick`.
        preset: the model preset (``tiny``; ``llava576`` for LLaVA-1.5's 576 visual tokens).
        base: extra ``TrainConfig`` fields applied on top (after the quick settings).

    Raises ``ValueError`` for an unknown name or an override that is not a ``TrainConfig`` field.
    """
    if name not in NAMED_SWEEPS:
        raise ValueError(f"unknown named sweep {name!r}; choose one of {sorted(NAMED_SWEEPS)}")
    sweep = NAMED_SWEEPS[name](preset)
    if quick if quick is not None else is_quick():
        sweep = sweep.quick_version()
    if base:
        check_fields(base, "named_sweep overrides")
        sweep = dataclasses.replace(sweep, base=overlay(sweep.base, base))
    if not sweep.base.get("train_data") and "release_cost_stats" not in base:
        # The embedded digits are public: a built-in study's step time and memory are its results, not a
        # function of anyone's secret batch. On your own data (train_data=...) they stay withheld by default.
        sweep = dataclasses.replace(sweep, base={**sweep.base, "release_cost_stats": True})
    return sweep

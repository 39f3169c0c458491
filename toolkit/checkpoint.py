"""Save a run and resume it without ever spending more privacy than the run reports.

A checkpoint holds the trained weights, the optimizer's state (for private methods: the accountant history and
the noise generator), the sampler's state, the run's **privacy plan** (method, target ε, δ, σ, q, planned
steps, accountant) and its **segments** so far (each one's σ, q, steps, δ and opt-outs such as a ``noise_seed``,
:mod:`toolkit.privacy.release`), so every later segment reports a guarantee lost in an earlier one. It is SECRET: the generator states let anyone re-create the noise and the Poisson batches.
Keep it with the private data; release only an export (:mod:`toolkit.export`).

Resuming (:func:`resume_privacy`) follows one rule: the privacy plan comes from the checkpoint. A config that
asks for another ε, δ, sampling rate, step count or accountant is refused with the differences named, unless
``resume_new_budget=True``: then the config's ε is a new *total* budget, σ for the remaining steps is calibrated
so that the composition of the steps already taken and those to come stays within it
(:func:`toolkit.privacy.calibrate_continuation`), and the reported ε is that composition.

Example::

    >>> from toolkit.checkpoint import PrivacyPlan
    >>> PrivacyPlan("dp-sgd", 3.0, 1e-5, 1.1, 0.1, 100, "prv").differences(
    ...     PrivacyPlan("dp-sgd", 8.0, 1e-5, 1.1, 0.1, 100, "prv"))
    ['epsilon: checkpoint 3, this config 8']
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from toolkit.privacy import calibrate_continuation, history_epsilon
from toolkit.vocabulary import format_epsilon

CHECKPOINT_VERSION = 2


@dataclass(frozen=True)
class PrivacyPlan:
    """What a private run promised: the accountant composes ``planned_steps`` steps of (σ, q) to ≤ ε at δ."""

    method: str
    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    planned_steps: int
    accountant: str

    def differences(self, other: "PrivacyPlan") -> list[str]:
        """The fields where ``other`` (this config) asks for something else than ``self`` (the checkpoint)."""
        out = []
        for name in ("method", "epsilon", "delta", "sample_rate", "planned_steps", "accountant"):
            mine, theirs = getattr(self, name), getattr(other, name)
            same = math.isclose(mine, theirs, rel_tol=1e-12) if isinstance(mine, float) else mine == theirs
            if not same:
                show = format_epsilon if name == "epsilon" else (lambda v: f"{v:g}" if isinstance(v, float) else str(v))
                out.append(f"{'steps' if name == 'planned_steps' else name}: checkpoint {show(mine)}, "
                           f"this config {show(theirs)}")
        return out


@dataclass
class Checkpoint:
    config: dict
    step: int
    trainable: dict
    optimizer: dict
    sampler: dict | None
    plan: PrivacyPlan | None
    segments: list = dataclasses.field(default_factory=list)  # the run's life so far (toolkit.privacy.release)


def save_checkpoint(path: str | os.PathLike, *, config: dict, step: int, module: nn.Module, optimizer,
                    sampler, plan: PrivacyPlan | None, segments: list | None = None) -> Path:
    """Write the checkpoint atomically (a crash never leaves a half-written file under ``path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = dict(version=CHECKPOINT_VERSION, config=config, step=int(step),
                 trainable={n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad},
                 optimizer=optimizer.state_dict(),
                 sampler=sampler.state_dict() if hasattr(sampler, "state_dict") else None,
                 plan=dataclasses.asdict(plan) if plan is not None else None, segments=list(segments or []))
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)
    return path


def check_checkpoint_file(path: str | os.PathLike) -> Path:
    """The checkpoint file ``path`` names (not its contents: see :func:`load_checkpoint`)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {str(path)!r} is a folder: resume_from names the checkpoint file a run "
                         "wrote (its checkpoint_path)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    return path


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    path = check_checkpoint_file(path)
    try:
        state = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as err:  # torch raises several types for a file that is not a checkpoint
        raise ValueError(f"{str(path)!r} is not a toolkit checkpoint ({err.__class__.__name__})") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{str(path)!r} is not a toolkit checkpoint of version {CHECKPOINT_VERSION}")
    plan = PrivacyPlan(**state["plan"]) if state.get("plan") else None
    return Checkpoint(state["config"], state["step"], state["trainable"], state["optimizer"], state.get("sampler"),
                      plan, state.get("segments") or [])


def restore_trainable(module: nn.Module, checkpoint: Checkpoint) -> None:
    """Copy the checkpoint's trained weights into ``module``; every trainable parameter must be covered."""
    named = {n: p for n, p in module.named_parameters() if p.requires_grad}
    unknown = sorted(set(checkpoint.trainable) - set(named))
    missing = sorted(set(named) - set(checkpoint.trainable))
    if unknown or missing:
        raise ValueError(f"the checkpoint's trained weights do not match this model (unknown: {unknown[:3]}, "
                         f"missing: {missing[:3]}): was it made with another model or trainable mode?")
    with torch.no_grad():
        for name, value in checkpoint.trainable.items():
            named[name].copy_(value.to(named[name].device, named[name].dtype))


def resume_privacy(checkpoint: Checkpoint, requested: PrivacyPlan | None, new_budget: bool,
                   history: list) -> PrivacyPlan | None:
    """The privacy plan a resumed run follows (see the module docstring). ``requested`` is the plan this config
    would have as a fresh run (``None`` for non-private), ``history`` the checkpoint's accountant history.

    Raises ``ValueError`` naming every difference when the config departs from the checkpoint's plan without
    ``new_budget``, and :class:`toolkit.privacy.PrivacyBudgetError` when a new budget is already spent.
    """
    saved = checkpoint.plan
    if requested is None or saved is None:
        if requested is not None:
            raise ValueError("checkpoint holds no DP-SGD state (no accountant history): it was a non-private "
                             "run and cannot be resumed as a private one")
        if saved is not None:
            raise ValueError(f"checkpoint is a private {saved.method} run: resume it with method={saved.method!r}")
        return None
    if saved.method != requested.method:
        raise ValueError(f"checkpoint is a {saved.method} run, this config is {requested.method}: "
                         "resume with the same method")
    if checkpoint.step >= requested.planned_steps:
        raise ValueError(f"the checkpoint already took {checkpoint.step} steps; this config plans "
                         f"{requested.planned_steps}: nothing left to run")
    if not new_budget:
        differences = saved.differences(requested)
        if differences:
            raise ValueError("a resumed run continues the checkpoint's privacy plan, but this config differs ("
                             + "; ".join(differences) + "). Use the checkpoint's values, or set "
                             "resume_new_budget=True to give a new total epsilon for the whole run")
        return saved
    if not math.isclose(saved.sample_rate, requested.sample_rate, rel_tol=1e-12):
        raise ValueError(f"a new budget keeps the sampling rate: checkpoint q={saved.sample_rate:g}, this config "
                         f"q={requested.sample_rate:g} (same expected_batch_size and dataset_size)")
    remaining = requested.planned_steps - checkpoint.step
    sigma = calibrate_continuation(history, requested.epsilon, requested.delta, requested.sample_rate, remaining,
                                   requested.accountant)
    return dataclasses.replace(requested, noise_multiplier=sigma)


def check_plan_within_target(history: list, plan: PrivacyPlan, steps_to_run: int) -> float:
    """ε after the past ``history`` plus ``steps_to_run`` steps of ``plan`` (at ``plan.delta``); refuses a plan
    that would end above its target, before any step runs (the last line of defence of every private run)."""
    if plan.noise_multiplier == 0:
        return math.inf
    future = list(history) + ([(plan.noise_multiplier, plan.sample_rate, steps_to_run)] if steps_to_run else [])
    final = history_epsilon(future, plan.delta, plan.accountant) if future else 0.0
    if final > plan.epsilon:
        raise ValueError(f"this run would end at epsilon={final:.4f}, above its target {format_epsilon(plan.epsilon)}")
    return final

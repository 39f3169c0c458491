"""One training entry point for every method: non-private, DP-SGD, Dual-Priv and DP-ZO.

``train(config)`` reads top to bottom in three parts:

1. :func:`setup`: the (warm-started) model and what trains, the data (one record per source image), the visual
   tokens of every record through mechanism 1's pruner, the privacy plan (σ calibrated for q and the planned
   steps, or taken from a checkpoint), the method's optimizer (:mod:`toolkit.optimizers`) and the sampler.
2. :func:`run_steps`: one step per Poisson batch (an empty batch still adds noise and is accounted); a history row
   per step.
3. :func:`finish`: evaluate on the held-out split, checkpoint if asked, report.

Example (a few seconds on a CPU)::

    >>> from toolkit.train import TrainConfig, train
    >>> result = train(TrainConfig(method="dual-priv", epsilon=3.0, steps=3, train_limit=64, eval_limit=32,
    ...                            warm_start_steps=0, progress=False))
    >>> round(result.epsilon_spent, 2) <= 3.0
    True

Your data: ``TrainConfig(train_data=..., eval_data=..., image_folder=...)`` trains on a LLaVA JSON/JSONL file
(:mod:`toolkit.userdata`) instead of the embedded task, evaluates by ranking a closed set of answers or by
generating (:mod:`toolkit.evaluation`), and ``output_dir`` / :meth:`TrainResult.save` exports the model
(:mod:`toolkit.export`).

Privacy unit: one training record. The embedded private split has one record per source image, so the
guarantee is per image; a user data set is refused unless it has the same property (one image per record,
and one record per ``user_id`` when records carry one).

What leaves a private run: the model, ε spent per step, and the public config. The per-step mean loss and the
realised Poisson batch size are functions of the private batch that ε does not cover (the loss has unbounded
sensitivity), so they are kept out of the history, the progress bar and the callback unless
``release_training_stats=True``; so are the step time and peak memory (they grow with the secret batch size)
unless ``release_cost_stats=True``. :attr:`TrainResult.released_stats` lists what was released, and a resumed
run carries every earlier segment's opt-outs (:mod:`toolkit.privacy.release`).
"""
from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from tqdm.auto import tqdm

from toolkit.checkpoint import (PrivacyPlan, check_plan_within_target, load_checkpoint, restore_trainable,
                                resume_privacy, save_checkpoint)
from toolkit.config import OPTIMIZERS, TrainConfig, planned_steps, resolve_device
from toolkit.data import Collator, VQADataset, make_vqa
from toolkit.distributed import (DistributedContext, broadcast_trainable, check_replicas_identical, context,
                                 init_from_env, local_device, share, shared_secret_generator)
from toolkit.evaluation import answer_records, choose_eval_mode
from toolkit.export import save_trained
from toolkit.feature_cache import cached_features
from toolkit.features import encode_records, make_pruner_for
from toolkit.forward import LlavaLM, answer_losses
from toolkit.image_duplicates import report_overlap
from toolkit.methods import get_method
from toolkit.metering import StepTimer, live_training_tensors, measure_peak
from toolkit.models import apply_trainable, enable_activation_checkpointing
from toolkit.optimizers import make_optimizer
from toolkit.precision import resolve_dtype
from toolkit.privacy import FixedBatchSampler, PoissonSampler, calibrate_noise, check_sampling
from toolkit.privacy.curve import EpsilonCurve
from toolkit.privacy.rules import check_private_run
from toolkit.secret_random import secret_generator
from toolkit.privacy.release import (COST_STATS, TRAINING_STATS, WITHHELD, checkpoint_segments,
                                     outside_the_guarantee, released_stats, releases_cost_stats,
                                     releases_training_stats, segment_record)
from toolkit.privacy.user_level import UserLevelRun
from toolkit.stats import answers_verdict
from toolkit.tokens import matched_fusion_sigma
from toolkit.vocabulary import METHODS, PRIVATE_METHODS, format_epsilon
from toolkit.userdata import load_llava_json
from toolkit.validation import check_output_dir
from toolkit.warmstart import starting_model

__all__ = ["METHODS", "PRIVATE_METHODS", "OPTIMIZERS", "TrainConfig", "TrainResult", "TrainingCancelled", "train",
           "load_bundle", "save_result", "TRAINING_STATS", "COST_STATS", "outside_the_guarantee"]


class TrainingCancelled(RuntimeError):
    """Raised inside :func:`train` when the callback asks to stop; the partial result is attached."""


@dataclass
class TrainResult:
    """What a run produced. ``summary()`` is the JSON-ready record (the CLI writes it); ``bundle`` the model."""

    config: TrainConfig
    history: pd.DataFrame
    accuracy: float
    epsilon_spent: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    peak_memory_mb: float
    memory_method: str
    step_time_s: float
    trainable_params: int
    visual_tokens: int
    visual_tokens_in: int
    wall_time_s: float
    cancelled: bool = False
    released_stats: tuple = ()
    extra: dict = field(default_factory=dict)
    bundle: object = field(default=None, repr=False)
    eval_answers: object = field(default=None, repr=False)  # toolkit.evaluation.Answers on the eval set

    def save(self, path, export_format: str | None = None):
        """Export the trained model, its tokenizer, what prediction needs and a model card to the new folder
        ``path`` (see :func:`toolkit.export.save_trained`); ``export_format`` defaults to the config's."""
        return save_trained(self, path, export_format or self.config.export_format)

    def summary(self) -> dict:
        c = self.config
        return dict(
            method=c.method, epsilon=c.epsilon if c.private else math.inf, delta=c.delta,
            epsilon_spent=self.epsilon_spent, noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate,
            steps=self.steps, accuracy=self.accuracy, peak_memory_mb=self.peak_memory_mb,
            memory_method=self.memory_method, step_time_s=self.step_time_s, visual_tokens=self.visual_tokens,
            visual_tokens_in=self.visual_tokens_in, trainable_params=self.trainable_params,
            wall_time_s=self.wall_time_s, cancelled=self.cancelled, token_strategy=c.token_strategy,
            grad_prune_ratio=c.grad_prune_ratio, seed=c.seed,
            task=None if c.train_data else c.task,   # issue 22: a user-data run trained on no embedded task
            released_training_stats=list(self.released_stats),
            outside_the_guarantee=outside_the_guarantee(c, self.released_stats,
                                                        self.extra.get("privacy_segments", ())),
            config=c.to_dict(), **self.extra,
        )


# ------------------------------------------------------------------------------------------------ setup

@dataclass
class Run:
    """Everything :func:`run_steps` and :func:`finish` need, built by :func:`setup`."""

    config: TrainConfig
    bundle: object
    device: torch.device
    lm: LlavaLM
    optimizer: object
    sampler: object
    train_set: object
    eval_set: object
    eval_mode: str
    candidates: tuple
    train_features: torch.Tensor
    eval_features: torch.Tensor
    collator: Collator
    eval_collator: Collator
    pruner: object
    n_records: int
    trainable_params: int
    sample_rate: float
    steps: int
    start_step: int
    plan: PrivacyPlan | None
    epsilon_curve: EpsilonCurve | None
    fusion_sigma: float
    fusion_generator: torch.Generator
    started: float
    dist: DistributedContext = field(default_factory=context)   # data-parallel rank (toolkit.distributed)
    past_segments: list = field(default_factory=list)  # a resumed run's earlier segments (toolkit.privacy.release)


def load_bundle(config: TrainConfig):
    """The model a run starts from: a local directory, or the preset's cached public warm start."""
    return starting_model(config.model_dir, config.preset, config.warm_start_steps, progress=config.progress)


def privacy_plan(c: TrainConfig, sample_rate: float, steps: int) -> PrivacyPlan | None:
    """σ calibrated so that ``steps`` Poisson steps at ``sample_rate`` spend at most ε (None: non-private)."""
    if not c.private:
        return None
    sigma = calibrate_noise(c.epsilon, c.delta, sample_rate, steps, accountant=c.accountant) \
        if math.isfinite(c.epsilon) else 0.0
    return PrivacyPlan(c.method, float(c.epsilon), float(c.delta), sigma, sample_rate, steps, c.accountant)


def make_sampler(c: TrainConfig, n_records: int, n_held: int, sample_rate: float,
                 dist: DistributedContext | None = None):
    # Which records join a step is part of the secret randomness: Poisson batches use a secret generator.
    # Data-parallel ranks all draw the same global batch (a secret seed shared from rank 0) and keep their share.
    if not c.private and c.sampling == "fixed":
        return FixedBatchSampler(n_held, min(c.expected_batch_size, n_held), seed=c.seed)
    if dist is not None and dist.enabled:
        generator = shared_secret_generator(c.noise_seed, 1, dist)
    else:
        generator = secret_generator(c.noise_seed, stream=1)
    if c.sampling == "poisson":  # secure mode re-draws the state per batch (not data-parallel: ranks must agree)
        return PoissonSampler(n_records, sample_rate, generator=generator,
                              secure=c.secure_mode and not (dist is not None and dist.enabled))
    # opted-in fixed batches: which records share a batch is secret too, never drawn from the public seed
    return FixedBatchSampler(n_held, min(c.expected_batch_size, n_held), generator=generator)


def user_datasets(c: TrainConfig, train_set: VQADataset | None, eval_set: VQADataset | None):
    """The config's LLaVA-JSON files as data sets (None where the embedded task is used or a set was given).

    A training file must keep one image per record (the privacy unit, see :mod:`toolkit.userdata`); an
    evaluation file may share images between questions. Training on a file without an evaluation file
    evaluates nothing (the embedded test split would be meaningless for your model)."""
    if train_set is None and c.train_data:
        train_set = load_llava_json(c.train_data, c.image_folder, limit=c.train_limit,
                                    several_per_user=c.privacy_unit == "user")
    if eval_set is None and c.eval_data:
        eval_set = load_llava_json(c.eval_data, c.image_folder, privacy_unit=False, limit=c.eval_limit)
    if eval_set is None and train_set is not None and c.train_data:
        eval_set = VQADataset([], name="none")
    if c.train_data and c.eval_data:  # an evaluation picture that is a training one is warned about, by ids
        report_overlap(train_set.records, eval_set.records)
    return train_set, eval_set


def setup(c: TrainConfig, train_set: VQADataset | None = None, eval_set: VQADataset | None = None) -> Run:
    """Build the model, the data and features, the privacy plan, the optimizer and the sampler (no step yet).

    ``train_set`` / ``eval_set``: in-memory data sets used instead of the config's embedded task (one record per
    source image: the privacy unit)."""
    started = time.perf_counter()
    check_sampling(c.private, c.sampling, c.allow_fixed_batches)
    if c.output_dir:  # before any work: a run must not end unable to save
        check_output_dir(c.output_dir, "output_dir")
    checkpoint = load_checkpoint(c.resume_from) if c.resume_from else None
    # a user's data is validated before the (possibly slow) model load
    train_set, eval_set = user_datasets(c, train_set, eval_set)

    # 1. model, what trains, and the data (one record per source image)
    bundle = load_bundle(c)
    dist = init_from_env(resolve_device(c).type)  # torchrun: join the process group (toolkit.distributed)
    device = local_device(resolve_device(c), dist)
    bundle.model.to(device)
    torch.manual_seed(c.seed)
    trainable_params = apply_trainable(bundle, c.trainable, c.lora_rank, lora_variant=c.lora_variant)
    # scale (issue 11): one dtype for frozen and trainable parts (after LoRA injection, so adapters get it too);
    # DP clipping and noise stay in >= fp32 whatever it is (toolkit.privacy.update_pruning)
    bundle.model.to(resolve_dtype(c.dtype, device))
    if c.activation_checkpointing and get_method(c.method).backward:  # no backward (DP-ZO): nothing to recompute
        enable_activation_checkpointing(bundle)
    broadcast_trainable(bundle.model, dist)  # every rank starts from rank 0's weights
    if train_set is None:
        train_set = make_vqa(c.task, c.train_split, bundle.image_size, limit=c.train_limit)
    if eval_set is None:
        eval_set = make_vqa(c.task, c.eval_split, bundle.image_size, limit=c.eval_limit)
    users = UserLevelRun(c, train_set, dist.world_size) if c.privacy_unit == "user" else None   # issue 22
    n_records = c.dataset_size or len(train_set) if users is None else users.n_users
    if users is None and n_records < len(train_set):
        raise ValueError(f"dataset_size {n_records} is smaller than the training set ({len(train_set)} records)")
    eval_mode, candidates = choose_eval_mode(c.eval_mode, [r.answer for r in eval_set],
                                             eval_set.candidates if eval_set.candidates_declared else None)

    # 2. mechanism 1: visual tokens per example, computed once with the frozen tower (cached for file-backed data)
    pruner = make_pruner_for(bundle, c)
    eval_pruner = pruner if c.prune_at_eval else make_pruner_for(bundle, c, "none")
    train_features = cached_features(bundle, pruner, train_set.records, use_cache=c.feature_cache)
    eval_features = cached_features(bundle, eval_pruner, eval_set.records, use_cache=c.feature_cache)
    collator = Collator(bundle.tokenizer, pruner.n_out, bundle.image_token_id, bundle.prompt_template)
    eval_collator = Collator(bundle.tokenizer, eval_pruner.n_out, bundle.image_token_id, bundle.prompt_template)
    lm = LlavaLM(bundle).bind_collator(collator).train()

    # 3. the privacy plan: the sampling rate comes from the declared dataset size; a resumed run keeps its plan
    sample_rate = check_private_run(c, n_records)  # δ < 1/N, batch ≤ N (toolkit.privacy.rules)
    steps = planned_steps(c, sample_rate)
    plan = privacy_plan(c, sample_rate, steps)
    start_step, history = 0, []
    if checkpoint is not None:
        history = (checkpoint.optimizer.get("accountant") or {}).get("history", [])
        plan = resume_privacy(checkpoint, plan, c.resume_new_budget, history)
        start_step = checkpoint.step
    if plan is not None:
        check_plan_within_target(history, plan, steps - start_step)
    noise_multiplier = plan.noise_multiplier if plan else 0.0

    public = public_gradients(c, bundle, lm, collator, pruner) if c.update_mask == "public" else None
    optimizer = make_optimizer(c, lm, noise_multiplier, sample_rate, public_gradients=public)
    sampler = make_sampler(c, n_records, len(train_set), sample_rate, dist) if users is None else \
        users.sampler(sample_rate, secret_generator(c.noise_seed, stream=1))
    if users is not None:
        users.attach(optimizer, sampler)
    if checkpoint is not None:
        restore_trainable(lm, checkpoint)
        optimizer.load_state_dict(checkpoint.optimizer)
        if checkpoint.sampler is not None and hasattr(sampler, "load_state_dict"):
            sampler.load_state_dict(checkpoint.sampler)
        else:
            sampler.skip(start_step)
    # ε per step from a curve computed once; a resumed run with a composed history asks the accountant instead.
    curve = EpsilonCurve(noise_multiplier, sample_rate, steps, plan.delta, accountant=c.accountant) \
        if plan is not None and noise_multiplier > 0 and not history else None

    fusion_sigma = 0.0
    if c.fusion_noise_std == "matched":
        fusion_sigma = matched_fusion_sigma(noise_multiplier, c.max_grad_norm, c.expected_batch_size)
    elif c.fusion_noise_std:
        fusion_sigma = float(c.fusion_noise_std)
    past = checkpoint_segments(checkpoint.segments, checkpoint.config, checkpoint.plan, checkpoint.step) \
        if checkpoint is not None else []
    return Run(c, bundle, device, lm, optimizer, sampler, train_set, eval_set, eval_mode, candidates,
               train_features, eval_features,
               collator, eval_collator, pruner, n_records, trainable_params, sample_rate, steps, start_step, plan,
               curve, fusion_sigma, secret_generator(c.noise_seed, stream=2), started, dist, past)


def public_gradients(c: TrainConfig, bundle, lm: LlavaLM, collator: Collator, pruner,
                     n_records: int = 256) -> list[torch.Tensor]:
    """Mean gradient of the trainable parameters on the task's *public* split (the warm start's data, never the
    private one): what the ``public`` update mask ranks. No privacy cost."""
    public = make_vqa(c.task, "public", bundle.image_size, limit=n_records)
    features = encode_records(bundle, pruner, public.records).to(next(lm.parameters()).device)
    batch = {k: v.to(features.device) for k, v in collator(public.records).items()}
    params = [p for p in lm.parameters() if p.requires_grad]
    lm.zero_grad(set_to_none=True)
    answer_losses(lm, features, batch).mean().backward()
    grads = [p.grad.detach().clone() for p in params]
    lm.zero_grad(set_to_none=True)
    return grads


# ------------------------------------------------------------------------------------------------ steps

def batch_losses(run: Run, idx: torch.Tensor) -> torch.Tensor:
    """Per-example losses ``[B]`` of the records ``idx``, forwarded through the optimizer's module (the LM head
    runs at the answer positions only: :func:`toolkit.forward.answer_losses`)."""
    batch = {k: v.to(run.device) for k, v in run.collator([run.train_set[i] for i in idx.tolist()]).items()}
    features = run.train_features[idx.to(run.train_features.device)].to(run.device)
    noise = None
    if run.fusion_sigma > 0 and run.pruner.n_contextual > 0:  # heuristic, outside the DP guarantee
        noise = run.pruner.fusion_noise(len(idx), generator=run.fusion_generator, sigma=run.fusion_sigma)
        noise = noise.to(run.device)
    return answer_losses(run.optimizer.module, features, batch, fusion_noise=noise)


def physical_chunks(idx: torch.Tensor, max_physical_batch_size: int | None) -> list[torch.Tensor]:
    """The logical batch ``idx`` in consecutive chunks of at most ``max_physical_batch_size`` records (one chunk
    when None). Chunking changes memory only: the update is the logical batch's (:mod:`toolkit.optimizers`)."""
    if max_physical_batch_size is None or len(idx) <= max_physical_batch_size:
        return [idx]
    return list(idx.split(max_physical_batch_size))


def one_step(run: Run, idx: torch.Tensor) -> float:
    """One optimizer step on the records ``idx``; an empty Poisson batch is still a (noised, accounted) step."""
    idx = idx[idx < len(run.train_set)]  # a declared size above the records held samples "absent" records
    if len(idx) == 0:
        run.optimizer.empty_step()
        return float("nan")
    idx = share(idx, run.dist)  # data-parallel: this rank's share of the global batch
    if len(idx) == 0:
        run.optimizer.empty_step()  # another rank holds the whole batch: this one contributes a zero sum
        return float("nan")
    if getattr(run.optimizer, "group_rows", None) is not None:   # issue 22: which user each row belongs to
        run.optimizer.group_rows.set_records(idx)
    chunks = physical_chunks(idx, run.config.max_physical_batch_size)
    if len(chunks) == 1:
        return run.optimizer.step(lambda: batch_losses(run, idx))
    return run.optimizer.step([functools.partial(batch_losses, run, chunk) for chunk in chunks])


def epsilon_now(run: Run) -> float:
    """ε spent so far: the accountant's history is the truth; the precomputed curve is the same analysis."""
    accountant = run.optimizer.accountant
    if accountant is None:
        return math.inf
    history = list(accountant.history)
    if run.epsilon_curve is not None and len(history) == 1 and history[0][2] <= run.steps \
            and tuple(history[0][:2]) == (run.plan.noise_multiplier, run.sample_rate):
        return run.epsilon_curve(int(history[0][2]))
    return run.optimizer.epsilon(run.plan.delta)


def run_steps(run: Run, callback: Callable[[dict], bool | None] | None):
    """The loop: returns (history rows, step timer, peak memory of a warm step, cancelled)."""
    c = run.config
    release, release_cost = releases_training_stats(c), releases_cost_stats(c)
    timer, rows, peak, cancelled = StepTimer(skip=1), [], None, False
    measure_at = run.start_step + min(2, run.steps - run.start_step - 1)  # a warm step (lazy allocations done)
    bar = tqdm(total=run.steps, initial=run.start_step, desc=f"{c.method} ε={format_epsilon(c.epsilon if c.private else None)}",
               disable=not c.progress)
    batches = run.sampler.batches(run.steps - run.start_step)
    for step, idx in zip(range(run.start_step, run.steps), batches):
        if step == measure_at and release_cost:  # withheld costs are not even measured
            box = {}
            baseline = live_training_tensors(run.lm, getattr(run.optimizer, "optimizer", None)) + [run.train_features]
            peak = measure_peak(lambda: box.setdefault("loss", one_step(run, idx)), baseline, device=run.device.type)
            loss = box["loss"]
            timer.times.append(float("nan"))  # profiled steps are slower: not timed
        else:
            loss = timer.time(lambda: one_step(run, idx))
        row = dict(step=step + 1, steps=run.steps, epsilon_spent=epsilon_now(run), lr=c.lr)
        if release_cost:
            row["step_time_s"] = timer.times[-1]
        if release:
            row.update(loss=loss, batch_size=int(len(idx)))
        if hasattr(run.optimizer, "last_kept_fraction"):
            row["kept_fraction"] = run.optimizer.last_kept_fraction
        rows.append(row)
        bar.update(1)
        bar.set_postfix(dict(loss=f"{loss:.3f}") if release else {}, eps=f"{row['epsilon_spent']:.2f}")
        if callback is not None and callback(row) is False:
            cancelled = True
            break
    bar.close()
    return rows, timer, peak, cancelled


# ------------------------------------------------------------------------------------------------ finish

def finish(run: Run, rows: list, timer: StepTimer, peak, cancelled: bool) -> TrainResult:
    """Evaluate, checkpoint if asked, and report."""
    c = run.config
    check_replicas_identical(run.lm, run.dist)
    answers = None
    if len(run.eval_set):
        answers = answer_records(run.lm, run.eval_features, run.eval_set.records, run.eval_collator,
                                 mode=run.eval_mode, candidates=run.candidates, max_new_tokens=c.max_new_tokens,
                                 batch_size=c.eval_batch_size)
    accuracy = answers.accuracy if answers is not None else None
    steps_done = run.start_step + len(rows)
    released = released_stats(c)
    segments = list(run.past_segments)
    if run.plan is not None and rows:
        segments.append(segment_record(c, run.plan, run.start_step + 1, steps_done, released))
    if c.checkpoint_path and run.dist.is_main:
        save_checkpoint(c.checkpoint_path, config=c.to_dict(), step=steps_done, module=run.lm,
                        optimizer=run.optimizer, sampler=run.sampler, plan=run.plan, segments=segments)
    timer.times = [t for t in timer.times if not math.isnan(t)]
    cost = releases_cost_stats(c)
    return TrainResult(
        config=c, history=pd.DataFrame(rows), accuracy=accuracy,
        epsilon_spent=epsilon_now(run) if c.private else math.inf,
        noise_multiplier=run.plan.noise_multiplier if run.plan else 0.0, sample_rate=run.sample_rate,
        steps=steps_done, peak_memory_mb=peak.peak_mb if peak else float("nan"),
        memory_method=(peak.method if peak else "not measured") if cost else WITHHELD,
        step_time_s=timer.median if cost else float("nan"),
        trainable_params=run.trainable_params, visual_tokens=run.pruner.n_out,
        visual_tokens_in=run.bundle.n_patches, wall_time_s=time.perf_counter() - run.started, cancelled=cancelled,
        released_stats=released, bundle=run.bundle, eval_answers=answers,
        extra=dict(fusion_noise_std=run.fusion_sigma, n_records=run.n_records, world_size=run.dist.world_size,
                   privacy_unit=run.train_set.privacy_unit, train_data=run.train_set.name,
                   eval_data=run.eval_set.name, eval_records=len(run.eval_set),
                   eval_mode=run.eval_mode if answers is not None else "none (no evaluation set)",
                   n_candidates=len(run.candidates), pruner=run.pruner.describe(),
                   privacy_segments=segments,
                   # is the accuracy distinguishable from chance and from always giving the commonest answer?
                   verdict=None if answers is None else answers_verdict(
                       answers.predictions, [r.answer for r in run.eval_set.records], answers.correct,
                       answers.candidates)),
    )


def train(config: TrainConfig, callback: Callable[[dict], bool | None] | None = None, *,
          train_set: VQADataset | None = None, eval_set: VQADataset | None = None) -> TrainResult:
    """Fine-tune with ``config.method`` and evaluate on the held-out split.

    ``callback(row)`` is called after every step with the history row (step, steps, epsilon_spent, lr, and
    step_time_s / loss / batch_size where released); returning ``False`` cancels the run cleanly: training
    stops, the model is still evaluated, and the result has ``cancelled=True``. ``train_set`` / ``eval_set``
    replace the embedded task's splits with data sets of your own (see :func:`setup`).
    """
    run = setup(config.resolved(), train_set, eval_set)
    rows, timer, peak, cancelled = run_steps(run, callback)
    result = finish(run, rows, timer, peak, cancelled)
    if run.config.output_dir and run.dist.is_main:  # data-parallel replicas are identical: rank 0 exports
        result.save(run.config.output_dir)
    return result


def save_result(result: TrainResult, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result.summary(), indent=2, default=str))

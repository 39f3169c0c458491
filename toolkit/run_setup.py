"""Building a run (:func:`setup`): the model, the data, mechanism 1's visual tokens, the privacy plan, the
optimizer and the sampler, in named stages, before any step is taken.

Each stage is one function returning one small record:

1. :func:`model_stage`: the (warm-started) model on its device, with what trains;
2. :func:`data_stage`: the training and evaluation sets, the privacy unit's count, the evaluation mode;
3. :func:`token_stage`: every record's pruned visual tokens (mechanism 1), computed once;
4. :func:`privacy_stage`: q from the declared size, σ for the planned steps (or a resumed run's plan);
5. :func:`optimizer_stage`: the method's optimizer and the secret sampler, a checkpoint's states restored.

A data set of your own is checked before the slow model load, and every config field was validated before
(:meth:`~toolkit.config.TrainConfig.resolved`). :mod:`toolkit.train` runs the steps and reports.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import torch

from toolkit.checkpoint import (PrivacyPlan, check_plan_within_target, load_checkpoint, restore_trainable,
                                resume_privacy)
from toolkit.config import TrainConfig, planned_steps, resolve_device
from toolkit.data import Collator, VQADataset, make_vqa
from toolkit.distributed import (DistributedContext, broadcast_trainable, context, init_from_env, local_device,
                                 shared_secret_generator)
from toolkit.evaluation import choose_eval_mode
from toolkit.feature_cache import cached_features
from toolkit.features import encode_records, make_pruner_for
from toolkit.forward import LlavaLM, answer_losses
from toolkit.image_duplicates import report_overlap
from toolkit.methods import get_method
from toolkit.models import apply_trainable, enable_activation_checkpointing
from toolkit.optimizers import make_optimizer
from toolkit.precision import cast_for_training, resolve_dtype
from toolkit.privacy import FixedBatchSampler, PoissonSampler, calibrate_noise, check_sampling
from toolkit.privacy.curve import EpsilonCurve
from toolkit.privacy.release import checkpoint_segments
from toolkit.privacy.rules import check_private_run, declared_units
from toolkit.privacy.user_level import UserLevelRun
from toolkit.secret_random import secret_generator
from toolkit.tokens import matched_fusion_sigma
from toolkit.userdata import load_llava_json
from toolkit.validation import check_output_dir
from toolkit.warmstart import run_curriculum, starting_model

__all__ = ["Run", "setup", "load_bundle", "make_sampler", "public_gradients", "privacy_plan"]


@dataclass
class ModelStage:
    """The (warm-started) model on its device, with what trains."""

    bundle: object
    device: torch.device
    dist: DistributedContext
    trainable_params: int


@dataclass
class DataStage:
    """The training and evaluation sets and who the privacy unit is."""

    train_set: VQADataset
    eval_set: VQADataset
    users: UserLevelRun | None        # user-level DP: users are sampled, not records
    n_records: int                    # the declared (public) count of privacy units
    eval_mode: str
    candidates: tuple


@dataclass
class TokenStage:
    """Mechanism 1: every record's visual tokens, computed once with the frozen tower."""

    pruner: object
    train_features: torch.Tensor
    eval_features: torch.Tensor
    collator: Collator
    eval_collator: Collator
    lm: LlavaLM


@dataclass
class PrivacyStage:
    """The sampling rate, the planned steps and σ; a resumed run's earlier segments and accounting history."""

    sample_rate: float
    steps: int
    plan: PrivacyPlan | None
    start_step: int
    history: list
    epsilon_curve: EpsilonCurve | None
    past_segments: list

    @property
    def noise_multiplier(self) -> float:
        return self.plan.noise_multiplier if self.plan else 0.0


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
    return starting_model(config.model_dir, config.preset, config.warm_start_steps, progress=config.progress,
                          curriculum=run_curriculum(config))


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
    if eval_set is None and c.eval_data and train_set is None and not c.train_data:
        raise ValueError(f"eval_data {c.eval_data!r} is given without train_data: the run would train on the "
                         f"embedded {c.task!r} task and score that model on your file. Give train_data too (or "
                         "score an exported model with toolkit.predict)")
    if eval_set is None and c.eval_data:
        eval_set = load_llava_json(c.eval_data, c.image_folder, privacy_unit=False, limit=c.eval_limit)
    if eval_set is None and train_set is not None and c.train_data:
        eval_set = VQADataset([], name="none")
    if c.train_data and c.eval_data:  # an evaluation picture that is a training one is warned about, by ids
        report_overlap(train_set.records, eval_set.records)
    return train_set, eval_set


def model_stage(c: TrainConfig) -> ModelStage:
    """Load the starting model, put it on this rank's device, make what trains trainable (LoRA, head)."""
    bundle = load_bundle(c)
    dist = init_from_env(resolve_device(c).type)  # torchrun: join the process group (toolkit.distributed)
    device = local_device(resolve_device(c), dist)
    bundle.model.to(device)
    torch.manual_seed(c.seed)
    trainable_params = apply_trainable(bundle, c.trainable, c.lora_rank, lora_variant=c.lora_variant)
    # after LoRA injection, so adapters get their dtype too; DP clipping and noise stay in >= fp32 whatever it is
    # (toolkit.privacy.update_pruning)
    cast_for_training(bundle.model, resolve_dtype(c.dtype, device), c.trainable_dtype)
    if c.activation_checkpointing and get_method(c.method).backward:  # no backward (DP-ZO): nothing to recompute
        enable_activation_checkpointing(bundle)
    broadcast_trainable(bundle.model, dist)  # every rank starts from rank 0's weights
    return ModelStage(bundle=bundle, device=device, dist=dist, trainable_params=trainable_params)


def data_stage(c: TrainConfig, model: ModelStage, train_set: VQADataset | None,
               eval_set: VQADataset | None) -> DataStage:
    """The embedded task's splits where no set of your own was given; the privacy unit's count; the eval mode."""
    if train_set is None and eval_set is None and c.train_split == c.eval_split:
        warnings.warn(f"train_split and eval_split are both {c.train_split!r}: the accuracy is measured on the "
                      "records the model trained on, so it says nothing about new data", stacklevel=3)
    if train_set is None:
        train_set = make_vqa(c.task, c.train_split, model.bundle.image_size, limit=c.train_limit)
    if eval_set is None:
        eval_set = make_vqa(c.task, c.eval_split, model.bundle.image_size, limit=c.eval_limit)
    users = UserLevelRun(c, train_set, model.dist.world_size) if c.privacy_unit == "user" else None
    n_records = declared_units(c.dataset_size, len(train_set)) if users is None else users.n_users
    eval_mode, candidates = choose_eval_mode(c.eval_mode, [r.answer for r in eval_set],
                                             eval_set.candidates if eval_set.candidates_declared else None)
    return DataStage(train_set=train_set, eval_set=eval_set, users=users, n_records=n_records,
                     eval_mode=eval_mode, candidates=candidates)


def token_stage(c: TrainConfig, bundle, data: DataStage) -> TokenStage:
    """Mechanism 1: prune every record's visual tokens once (cached for file-backed data); the LM that reads them."""
    pruner = make_pruner_for(bundle, c)
    eval_pruner = pruner if c.prune_at_eval else make_pruner_for(bundle, c, "none")
    collator = Collator(bundle.tokenizer, pruner.n_out, bundle.image_token_id, bundle.prompt_template)
    return TokenStage(
        pruner=pruner,
        train_features=cached_features(bundle, pruner, data.train_set.records, use_cache=c.feature_cache),
        eval_features=cached_features(bundle, eval_pruner, data.eval_set.records, use_cache=c.feature_cache),
        collator=collator,
        eval_collator=Collator(bundle.tokenizer, eval_pruner.n_out, bundle.image_token_id, bundle.prompt_template),
        lm=LlavaLM(bundle).bind_collator(collator).train())


def privacy_stage(c: TrainConfig, n_records: int, checkpoint) -> PrivacyStage:
    """The sampling rate from the declared size, σ for the planned steps; a resumed run keeps its plan."""
    sample_rate = check_private_run(c, n_records)  # δ < 1/N, batch ≤ N (toolkit.privacy.rules)
    steps = planned_steps(c, sample_rate)
    plan = privacy_plan(c, sample_rate, steps)
    start_step, history, past = 0, [], []
    if checkpoint is not None:
        history = (checkpoint.optimizer.get("accountant") or {}).get("history", [])
        plan = resume_privacy(checkpoint, plan, c.resume_new_budget, history)
        start_step = checkpoint.step
        past = checkpoint_segments(checkpoint.segments, checkpoint.config, checkpoint.plan, checkpoint.step)
    if plan is not None:
        check_plan_within_target(history, plan, steps - start_step)
    # ε per step from a curve computed once; a resumed run with a composed history asks the accountant instead.
    curve = EpsilonCurve(plan.noise_multiplier, sample_rate, steps, plan.delta, accountant=c.accountant) \
        if plan is not None and plan.noise_multiplier > 0 and not history else None
    return PrivacyStage(sample_rate=sample_rate, steps=steps, plan=plan, start_step=start_step, history=history,
                        epsilon_curve=curve, past_segments=past)


def optimizer_stage(c: TrainConfig, model: ModelStage, data: DataStage, tokens: TokenStage,
                    privacy: PrivacyStage, checkpoint):
    """The method's optimizer (:mod:`toolkit.optimizers`) and the sampler; a resumed run's states restored."""
    public = public_gradients(c, model.bundle, tokens.lm, tokens.collator, tokens.pruner) \
        if c.update_mask == "public" else None
    optimizer = make_optimizer(c, tokens.lm, privacy.noise_multiplier, privacy.sample_rate, public_gradients=public)
    if data.users is None:
        sampler = make_sampler(c, data.n_records, len(data.train_set), privacy.sample_rate, model.dist)
    else:
        sampler = data.users.sampler(privacy.sample_rate, secret_generator(c.noise_seed, stream=1))
        data.users.attach(optimizer, sampler)
    if checkpoint is not None:
        restore_trainable(tokens.lm, checkpoint)
        optimizer.load_state_dict(checkpoint.optimizer)
        if checkpoint.sampler is not None and hasattr(sampler, "load_state_dict"):
            sampler.load_state_dict(checkpoint.sampler)
        else:
            sampler.skip(privacy.start_step)
    return optimizer, sampler


def fusion_noise_sigma(c: TrainConfig, noise_multiplier: float) -> float:
    """σ of the noise added to fused contextual tokens (a heuristic outside the guarantee; 0: off)."""
    if c.fusion_noise_std == "matched":
        return matched_fusion_sigma(noise_multiplier, c.max_grad_norm, c.expected_batch_size)
    return float(c.fusion_noise_std or 0.0)


def setup(c: TrainConfig, train_set: VQADataset | None = None, eval_set: VQADataset | None = None) -> Run:
    """Build the model, the data and features, the privacy plan, the optimizer and the sampler (no step yet).

    ``train_set`` / ``eval_set``: in-memory data sets used instead of the config's embedded task (one record per
    source image: the privacy unit)."""
    started = time.perf_counter()
    check_sampling(c.private, c.sampling, c.allow_fixed_batches)
    if c.output_dir:  # before any work: a run must not end unable to save
        check_output_dir(c.output_dir, "output_dir")
    checkpoint = load_checkpoint(c.resume_from) if c.resume_from else None
    train_set, eval_set = user_datasets(c, train_set, eval_set)  # your data is checked before the slow model load
    model = model_stage(c)
    data = data_stage(c, model, train_set, eval_set)
    tokens = token_stage(c, model.bundle, data)
    privacy = privacy_stage(c, data.n_records, checkpoint)
    optimizer, sampler = optimizer_stage(c, model, data, tokens, privacy, checkpoint)
    return Run(
        config=c, bundle=model.bundle, device=model.device, dist=model.dist, lm=tokens.lm, optimizer=optimizer,
        sampler=sampler, train_set=data.train_set, eval_set=data.eval_set, eval_mode=data.eval_mode,
        candidates=data.candidates, train_features=tokens.train_features, eval_features=tokens.eval_features,
        collator=tokens.collator, eval_collator=tokens.eval_collator, pruner=tokens.pruner,
        n_records=data.n_records, trainable_params=model.trainable_params, sample_rate=privacy.sample_rate,
        steps=privacy.steps, start_step=privacy.start_step, plan=privacy.plan, epsilon_curve=privacy.epsilon_curve,
        fusion_sigma=fusion_noise_sigma(c, privacy.noise_multiplier),
        fusion_generator=secret_generator(c.noise_seed, stream=2), started=started,
        past_segments=privacy.past_segments)


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

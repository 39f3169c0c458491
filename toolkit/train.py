"""One training entry point for every method: non-private, DP-SGD, Dual-Priv and DP-ZO.

The loop reads top to bottom: load the (warm-started) model, choose what trains, encode every example with the
frozen tower and the token pruner (mechanism 1), then step with the method's optimizer: plain, Opacus DP-SGD
(with update pruning for Dual-Priv, mechanism 2), or DP zeroth-order. The accountant records every private
step; ``TrainResult.history`` has one row per step.

Example (a few seconds on a CPU)::

    >>> from toolkit.train import TrainConfig, train
    >>> result = train(TrainConfig(method="dual-priv", epsilon=3.0, steps=3, train_limit=64, eval_limit=32,
    ...                            warm_start_steps=0, progress=False))
    >>> round(result.epsilon_spent, 2) <= 3.0
    True

Privacy unit: one training record. The embedded private split has one record per source image, so the
guarantee is per image; a user data set needs the same property (or per-user accounting) for ε to mean that.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

METHODS = ("non-private", "dp-sgd", "dual-priv", "dp-zo")
PRIVATE_METHODS = ("dp-sgd", "dual-priv", "dp-zo")
OPTIMIZERS = ("adam", "adamw", "sgd")


class TrainingCancelled(RuntimeError):
    """Raised inside :func:`train` when the callback asks to stop; the partial result is attached."""


@dataclass
class TrainConfig:
    """Every knob of a run. ``None`` means "the method's default" (see :meth:`resolved`)."""

    method: str = "dual-priv"
    # model
    preset: str = "tiny"
    model_dir: str | None = None            # a local LLaVA directory instead of a preset (no warm start)
    warm_start_steps: int | None = None     # None: the preset's default public warm start; 0: none
    trainable: str = "lora+head"
    lora_rank: int = 8
    # data
    task: str = "parity"
    train_split: str = "private"
    eval_split: str = "test"
    train_limit: int | None = None
    eval_limit: int | None = None
    dataset_size: int | None = None         # declared (public) record count; default: the training set's size
    # privacy
    epsilon: float = 3.0                    # math.inf for no noise; ignored by non-private
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    sampling: str | None = None             # "poisson" (private default) or "fixed" (non-private default)
    allow_fixed_batches: bool = False       # opt in to fixed batches under DP (different accounting)
    grad_sample_mode: str = "hooks"
    # schedule
    steps: int | None = None
    epochs: float | None = None
    expected_batch_size: int = 64
    lr: float | None = None
    optimizer: str = "adam"
    seed: int = 0                           # model init, LoRA init, data order of non-private runs
    noise_seed: int | None = None           # DP noise + Poisson sampling; None = OS entropy (secret). A fixed
                                            # seed makes the noise re-creatable: reproducible, NOT private.
    # mechanism 1: visual tokens
    token_strategy: str | None = None       # None: "dual-priv" for method dual-priv, else "none"
    keep_tokens: int | None = None
    token_prune_ratio: float | None = None  # None with keep_tokens None: 0.75 for dual-priv
    token_layer: int | None = None
    contextual_tokens: int | None = None
    fusion_noise_std: float | str | None = None   # a σ, "matched" to the DP noise, or None/0 for off (heuristic)
    prune_at_eval: bool = True
    # mechanism 2: update pruning
    grad_prune_ratio: float | None = None   # None: 0.2 for dual-priv, else 0
    prune_scope: str = "global"
    pruned_state: str = "advance"
    # DP-ZO
    zo_mu: float = 1e-3
    # running
    eval_batch_size: int = 128
    device: str = "auto"                    # "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
    progress: bool = True
    checkpoint_path: str | None = None      # save model + accountant state here at the end
    resume_from: str | None = None          # continue a checkpointed run (ε keeps counting)

    def resolved(self) -> "TrainConfig":
        """A copy with every method default filled in and every field validated."""
        c = dataclasses.replace(self)
        if c.method not in METHODS:
            raise ValueError(f"unknown method {c.method!r}; choose one of {METHODS}")
        private = c.method in PRIVATE_METHODS
        if c.token_strategy is None:
            c.token_strategy = "dual-priv" if c.method == "dual-priv" else "none"
        if c.keep_tokens is None and c.token_prune_ratio is None and c.token_strategy != "none":
            c.token_prune_ratio = 0.75
        if c.grad_prune_ratio is None:
            c.grad_prune_ratio = 0.2 if c.method == "dual-priv" else 0.0
        if c.sampling is None:
            c.sampling = "poisson" if private else "fixed"
        if c.lr is None:
            c.lr = {"non-private": 1e-3, "dp-zo": 2e-3}.get(c.method, 5e-3)
        _check(c)
        return c

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check(c: TrainConfig) -> None:
    def bad(msg):
        raise ValueError(msg)

    if c.method in PRIVATE_METHODS:
        if not (isinstance(c.epsilon, (int, float)) and c.epsilon > 0):
            bad(f"epsilon must be > 0 (math.inf for no noise), got {c.epsilon!r}")
        if not (0 < c.delta < 1):
            bad(f"delta must be in (0, 1), got {c.delta!r}")
        if not (c.max_grad_norm > 0):
            bad(f"max_grad_norm must be > 0, got {c.max_grad_norm!r}")
    if c.steps is None and c.epochs is None:
        bad("give steps or epochs")
    if c.steps is not None and c.steps < 1:
        bad(f"steps must be >= 1, got {c.steps}")
    if c.epochs is not None and not c.epochs > 0:
        bad(f"epochs must be > 0, got {c.epochs}")
    if c.expected_batch_size < 1:
        bad(f"expected_batch_size must be >= 1, got {c.expected_batch_size}")
    if not c.lr > 0:
        bad(f"lr must be > 0, got {c.lr}")
    if c.optimizer not in OPTIMIZERS:
        bad(f"unknown optimizer {c.optimizer!r}; choose one of {OPTIMIZERS}")
    if not 0 <= c.grad_prune_ratio < 1:
        bad(f"grad_prune_ratio must be in [0, 1), got {c.grad_prune_ratio}")
    if c.token_prune_ratio is not None and not 0 <= c.token_prune_ratio < 1:
        bad(f"token_prune_ratio must be in [0, 1), got {c.token_prune_ratio}")
    if c.sampling not in ("poisson", "fixed"):
        bad(f"sampling must be 'poisson' or 'fixed', got {c.sampling!r}")
    if isinstance(c.fusion_noise_std, str) and c.fusion_noise_std != "matched":
        bad(f"fusion_noise_std must be a number, 'matched' or None, got {c.fusion_noise_std!r}")
    if c.device != "auto":
        try:
            device = torch.device(c.device)
        except RuntimeError as err:
            bad(f"device {c.device!r} is not a torch device ({err})")
        if device.type == "cuda" and not torch.cuda.is_available():
            bad(f"device {c.device!r} asked for, but torch sees no CUDA device")
    if isinstance(c.fusion_noise_std, (int, float)) and c.fusion_noise_std < 0:
        bad(f"fusion_noise_std must be >= 0, got {c.fusion_noise_std}")


@dataclass
class TrainResult:
    """What a run produced. ``summary()`` is the JSON-ready record (the CLI writes it)."""

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
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        c = self.config
        return dict(
            method=c.method, epsilon=c.epsilon if c.method in PRIVATE_METHODS else math.inf, delta=c.delta,
            epsilon_spent=self.epsilon_spent, noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate,
            steps=self.steps, accuracy=self.accuracy, peak_memory_mb=self.peak_memory_mb,
            memory_method=self.memory_method, step_time_s=self.step_time_s, visual_tokens=self.visual_tokens,
            visual_tokens_in=self.visual_tokens_in, trainable_params=self.trainable_params,
            wall_time_s=self.wall_time_s, cancelled=self.cancelled, token_strategy=c.token_strategy,
            grad_prune_ratio=c.grad_prune_ratio, seed=c.seed, task=c.task, config=c.to_dict(), **self.extra,
        )


# ------------------------------------------------------------------------------------------- building blocks

def load_bundle(config: TrainConfig):
    """The model a run starts from: a local directory, or the preset's cached public warm start."""
    from toolkit.models import build_model, load_model
    from toolkit.warmstart import warm_start

    if config.model_dir:
        return load_model(config.model_dir)
    if config.warm_start_steps == 0:
        return build_model(config.preset)
    return warm_start(config.preset, steps=config.warm_start_steps, progress=config.progress)


@torch.no_grad()
def encode_records(bundle, pruner, records, batch_size: int = 64) -> torch.Tensor:
    """Visual tokens fed to the LLM for each record: ``[N, pruner.n_out, d_vision]``.

    The tower is frozen and the pruner works per example, so each row depends on its own record only.
    """
    from toolkit.data import preprocess_images
    from toolkit.forward import tower_hidden_states

    chunks = []
    for start in range(0, len(records), batch_size):
        images = [r.image for r in records[start:start + batch_size]]
        pixels = preprocess_images(images, bundle.image_size, bundle.image_mean, bundle.image_std)
        chunks.append(pruner(tower_hidden_states(bundle, pixels)).features.float())
    return torch.cat(chunks) if chunks else torch.zeros(0)


def make_pruner_for(bundle, config: TrainConfig, strategy: str | None = None):
    from toolkit.tokens import make_pruner

    strategy = strategy or config.token_strategy
    if strategy == "none":
        return make_pruner("none", bundle)
    options = {}
    if config.contextual_tokens is not None:
        options["n_contextual"] = config.contextual_tokens
    return make_pruner(strategy, bundle, keep=config.keep_tokens, token_prune_ratio=config.token_prune_ratio,
                       layer=config.token_layer, **options)


def _optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr)
    return torch.optim.SGD(params, lr=config.lr, momentum=0.9)


@torch.no_grad()
def evaluate(lm, features: torch.Tensor, records, collator, candidates, batch_size: int = 128) -> float:
    """Accuracy by ranking the closed set of candidate answers (log-likelihood), see ``rank_candidates``."""
    from toolkit.forward import rank_candidates

    if len(records) == 0:
        return float("nan")
    tok = collator.tokenizer
    candidate_ids = [tok(" " + c, add_special_tokens=False)["input_ids"] for c in candidates]
    was_training = lm.training
    lm.eval()
    correct = 0
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        batch = collator(chunk)
        pred = rank_candidates(lm, features[start:start + batch_size], batch, candidate_ids)
        gold = torch.tensor([candidates.index(r.answer) if r.answer in candidates else -1 for r in chunk])
        correct += int((pred.cpu() == gold).sum())
    lm.train(was_training)
    return correct / len(records)


# ------------------------------------------------------------------------------------------------ the loop

def train(config: TrainConfig, callback: Callable[[dict], bool | None] | None = None) -> TrainResult:
    """Fine-tune with ``config.method`` and evaluate on the held-out split.

    ``callback(row)`` is called after every step with the history row (step, steps, loss, epsilon_spent, lr,
    step_time_s, batch_size); returning ``False`` cancels the run cleanly: training stops, the model is still
    evaluated, and the result has ``cancelled=True``.
    """
    from tqdm.auto import tqdm

    from toolkit.data import Collator, make_vqa
    from toolkit.forward import LlavaLM, per_example_loss
    from toolkit.metering import StepTimer, live_training_tensors, measure_peak
    from toolkit.models import apply_trainable
    from toolkit.privacy import FixedBatchSampler, PoissonSampler, calibrate_noise, check_sampling
    from toolkit.privacy.curve import EpsilonCurve
    from toolkit.tokens import matched_fusion_sigma

    c = config.resolved()
    started = time.perf_counter()
    private = c.method in PRIVATE_METHODS
    check_sampling(private, c.sampling, c.allow_fixed_batches)

    # 1. model, what trains, and the data (one record per source image)
    bundle = load_bundle(c)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if c.device == "auto" else torch.device(c.device)
    bundle.model.to(device)
    torch.manual_seed(c.seed)
    n_trainable = apply_trainable(bundle, c.trainable, c.lora_rank)
    train_set = make_vqa(c.task, c.train_split, bundle.image_size, limit=c.train_limit)
    eval_set = make_vqa(c.task, c.eval_split, bundle.image_size, limit=c.eval_limit)
    n_records = c.dataset_size or len(train_set)
    if n_records < len(train_set):
        raise ValueError(f"dataset_size {n_records} is smaller than the training set ({len(train_set)} records)")

    # 2. mechanism 1: visual tokens per example, computed once with the frozen tower
    pruner = make_pruner_for(bundle, c)
    train_feats = encode_records(bundle, pruner, train_set.records)
    eval_pruner = pruner if c.prune_at_eval else make_pruner_for(bundle, c, "none")
    eval_feats = encode_records(bundle, eval_pruner, eval_set.records)
    collator = Collator(bundle.tokenizer, pruner.n_out, bundle.image_token_id, bundle.prompt_template)
    eval_collator = Collator(bundle.tokenizer, eval_pruner.n_out, bundle.image_token_id, bundle.prompt_template)
    lm = LlavaLM(bundle).bind_collator(collator).train()
    params = [p for p in lm.parameters() if p.requires_grad]

    # 3. schedule and privacy calibration (the sampling rate comes from the declared dataset size)
    sample_rate = min(1.0, c.expected_batch_size / n_records)
    steps = c.steps if c.steps is not None else max(1, math.ceil(c.epochs / sample_rate))
    noise_multiplier = 0.0
    if private and math.isfinite(c.epsilon):
        noise_multiplier = calibrate_noise(c.epsilon, c.delta, sample_rate, steps, accountant=c.accountant)
    fusion_sigma = 0.0
    if c.fusion_noise_std == "matched":
        fusion_sigma = matched_fusion_sigma(noise_multiplier, c.max_grad_norm, c.expected_batch_size)
    elif c.fusion_noise_std:
        fusion_sigma = float(c.fusion_noise_std)
    noise_gen = torch.Generator().manual_seed(c.seed + 1)

    stepper = make_stepper(c, lm, params, noise_multiplier, sample_rate)
    start_step = 0
    if c.resume_from:
        start_step = _resume(c.resume_from, lm, stepper)
    forward_module = stepper.module

    curve = None
    if private and noise_multiplier > 0:
        curve = EpsilonCurve(noise_multiplier, sample_rate, steps, c.delta, accountant=c.accountant)

    def epsilon_now() -> float:
        # The accountant's history is the truth; the precomputed curve is the same analysis, evaluated once.
        accountant = stepper.accountant
        if accountant is None:
            return math.inf
        history = list(accountant.history)
        if curve is not None and len(history) == 1 and tuple(history[0][:2]) == (noise_multiplier, sample_rate) \
                and history[0][2] <= steps:
            return curve(int(history[0][2]))
        return stepper.epsilon(c.delta)

    # Which records join a step is part of the secret randomness: Poisson batches use the noise seed.
    sampler = (PoissonSampler(n_records, sample_rate, seed=c.noise_seed) if c.sampling == "poisson"
               else FixedBatchSampler(len(train_set), min(c.expected_batch_size, len(train_set)), seed=c.seed))
    if c.resume_from:
        _restore_sampler(c.resume_from, sampler, start_step)

    def batch_losses(idx: torch.Tensor) -> torch.Tensor:
        batch = {k: v.to(device) for k, v in collator([train_set[i] for i in idx.tolist()]).items()}
        feats = train_feats[idx.to(train_feats.device)]
        noise = None
        if fusion_sigma > 0 and pruner.n_contextual > 0:  # heuristic, outside the DP guarantee
            noise = pruner.fusion_noise(len(idx), generator=noise_gen, sigma=fusion_sigma).to(device)
        logits = forward_module(feats, batch["input_ids"], batch["attention_mask"], fusion_noise=noise)
        return per_example_loss(logits, batch["labels"])

    def one_step(idx: torch.Tensor) -> float:
        idx = idx[idx < len(train_set)]  # a declared size above the records held samples "absent" records
        return stepper.step((lambda: batch_losses(idx)) if len(idx) else None)

    # 4. the loop
    timer, rows, peak, cancelled = StepTimer(skip=1), [], None, False
    measure_at = start_step + min(2, steps - start_step - 1)  # a warm step: not the first (lazy allocations)
    bar = tqdm(total=steps, initial=start_step, desc=f"{c.method} ε={c.epsilon if private else '∞'}",
               disable=not c.progress)
    for step, idx in zip(range(start_step, steps), sampler.batches(steps - start_step)):
        if step == measure_at:
            box = {}
            baseline = live_training_tensors(lm, stepper.optimizer) + [train_feats]
            peak = measure_peak(lambda: box.setdefault("loss", one_step(idx)), baseline, device=device.type)
            loss = box["loss"]
            timer.times.append(float("nan"))  # profiled steps are slower: not timed
        else:
            loss = timer.time(lambda: one_step(idx))
        row = dict(step=step + 1, steps=steps, loss=loss, epsilon_spent=epsilon_now(), lr=c.lr,
                   step_time_s=timer.times[-1], batch_size=int(len(idx)))
        if stepper.engine is not None:
            row["kept_fraction"] = stepper.engine.last_kept_fraction
        rows.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", eps=f"{row['epsilon_spent']:.2f}")
        if callback is not None and callback(row) is False:
            cancelled = True
            break
    bar.close()

    # 5. evaluate, checkpoint, report
    accuracy = evaluate(lm, eval_feats, eval_set.records, eval_collator, eval_set.candidates, c.eval_batch_size)
    if c.checkpoint_path:
        _checkpoint(c.checkpoint_path, c, lm, stepper, sampler, step=start_step + len(rows))
    history = pd.DataFrame(rows)
    times = [t for t in timer.times if not math.isnan(t)]
    timer.times = times
    return TrainResult(
        config=c, history=history, accuracy=accuracy, epsilon_spent=epsilon_now() if private else math.inf,
        noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=start_step + len(rows),
        peak_memory_mb=peak.peak_mb if peak else float("nan"), memory_method=peak.method if peak else "not measured",
        step_time_s=timer.median, trainable_params=n_trainable, visual_tokens=pruner.n_out,
        visual_tokens_in=bundle.n_patches, wall_time_s=time.perf_counter() - started, cancelled=cancelled,
        extra=dict(fusion_noise_std=fusion_sigma, n_records=n_records),
    )


class Stepper:
    """One optimisation step of any method, given a closure that returns the batch's per-example losses.

    ``step(losses_fn)``: ``losses_fn()`` runs the forward through :attr:`module` and returns ``[B]`` losses; a
    ``None`` closure is an empty Poisson batch (private methods still add noise and the accountant advances).
    """

    def __init__(self, module, optimizer, engine=None, zo=None):
        self.lm, self.optimizer, self.engine, self.zo = module, optimizer, engine, zo

    @property
    def module(self):
        return self.engine.module if self.engine is not None else self.lm

    def step(self, losses_fn: Callable[[], torch.Tensor] | None) -> float:
        if self.engine is not None:
            if losses_fn is None:
                self.engine.empty_step()
                return float("nan")
            return float(self.engine.step(losses_fn()))
        if self.zo is not None:
            if losses_fn is None:
                self.zo.empty_step()
                return float("nan")
            with torch.no_grad():
                return float(self.zo.step(losses_fn))
        if losses_fn is None:
            return float("nan")
        losses = losses_fn()
        self.optimizer.zero_grad(set_to_none=True)
        losses.mean().backward()
        self.optimizer.step()
        return float(losses.mean().detach())

    @property
    def accountant(self):
        """The Opacus accountant of a private method (None for non-private)."""
        owner = self.engine if self.engine is not None else self.zo
        return getattr(owner, "accountant", None)

    def epsilon(self, delta: float) -> float:
        if self.engine is not None:
            return float(self.engine.epsilon(delta))
        if self.zo is not None:
            return float(self.zo.epsilon(delta))
        return math.inf


def make_stepper(c: TrainConfig, lm, params, noise_multiplier: float, sample_rate: float) -> Stepper:
    """The method's optimizer: plain, Opacus DP-SGD (+ update pruning), or DP zeroth-order."""
    from toolkit.privacy import make_private
    from toolkit.zo import DPZeroOrder

    optimizer = _optimizer(params, c)
    if c.method in ("dp-sgd", "dual-priv"):
        engine = make_private(lm, optimizer, noise_multiplier=noise_multiplier, max_grad_norm=c.max_grad_norm,
                              expected_batch_size=c.expected_batch_size, sample_rate=sample_rate,
                              accountant=c.accountant, grad_prune_ratio=c.grad_prune_ratio,
                              prune_scope=c.prune_scope, pruned_state=c.pruned_state,
                              grad_sample_mode=c.grad_sample_mode, noise_seed=c.noise_seed)
        return Stepper(lm, optimizer, engine=engine)
    if c.method == "dp-zo":
        zo = DPZeroOrder(params, lr=c.lr, mu=c.zo_mu, noise_multiplier=noise_multiplier,
                         max_grad_norm=c.max_grad_norm, expected_batch_size=c.expected_batch_size,
                         sample_rate=sample_rate, accountant=c.accountant, seed=c.seed,
                         noise_seed=c.noise_seed)
        return Stepper(lm, optimizer, zo=zo)
    if c.grad_prune_ratio > 0:
        raise ValueError("grad_prune_ratio needs a DP-SGD method: it prunes the noisy gradient")
    return Stepper(lm, optimizer)


def _trainable_state(lm) -> dict:
    return {n: p.detach().clone() for n, p in lm.named_parameters() if p.requires_grad}


def _checkpoint(path: str, c: TrainConfig, lm, stepper: "Stepper", sampler, step: int) -> None:
    """Weights, optimizer/accountant state and sampler state. It holds the noise generator's state, which is
    secret: share the model weights, never this file."""
    state = dict(config=c.to_dict(), step=step, trainable=_trainable_state(lm))
    if hasattr(sampler, "state_dict"):
        state["sampler"] = sampler.state_dict()
    if stepper.engine is not None:
        state["engine"] = stepper.engine.state_dict()
    elif stepper.zo is not None:
        state["zo"] = stepper.zo.state_dict()
    else:
        state["optimizer"] = stepper.optimizer.state_dict()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def _resume(path: str, lm, stepper: "Stepper") -> int:
    """Restore weights, optimizer and accountant history; a resumed run never under-reports ε."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    state = torch.load(path, weights_only=False, map_location="cpu")
    named = dict(lm.named_parameters())
    with torch.no_grad():
        for name, value in state["trainable"].items():
            if name not in named:
                raise ValueError(f"checkpoint parameter {name!r} is not in this model: different config?")
            named[name].copy_(value)
    if stepper.engine is not None:
        if "engine" not in state:
            raise ValueError("checkpoint holds no DP-SGD state (accountant history): it was not a DP-SGD run")
        stepper.engine.load_state_dict(state["engine"])
    elif stepper.zo is not None:
        if "zo" not in state:
            raise ValueError("checkpoint holds no DP-ZO state (accountant history): it was not a DP-ZO run")
        stepper.zo.load_state_dict(state["zo"])
    elif "optimizer" in state:
        stepper.optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


def _restore_sampler(path: str, sampler, start_step: int) -> None:
    state = torch.load(path, weights_only=False, map_location="cpu")
    if "sampler" in state and hasattr(sampler, "load_state_dict"):
        sampler.load_state_dict(state["sampler"])
    else:
        sampler.skip(start_step)


def save_result(result: TrainResult, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result.summary(), indent=2, default=str))

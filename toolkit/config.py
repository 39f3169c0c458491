"""``TrainConfig``: every knob of a run, its defaults per method, and its validation (before any work starts).

Example::

    >>> from toolkit.config import TrainConfig
    >>> c = TrainConfig(method="dual-priv", epsilon=3.0, steps=10).resolved()
    >>> c.token_strategy, c.token_prune_ratio, c.grad_prune_ratio, c.sampling
    ('dual-priv', 0.75, 0.2, 'poisson')
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from toolkit.models import check_activation_checkpointing
from toolkit.precision import DTYPES
from toolkit.validation import check_choice, check_fraction, check_int, check_number
from toolkit.vocabulary import METHODS, PRIVATE_METHODS

OPTIMIZERS = ("adam", "adamw", "sgd", "dp-adambc")
UPDATE_MASKS = ("noisy", "past-noisy", "public", "random")
LORA_VARIANTS = ("standard", "ffa")
EVAL_MODES = ("auto", "closed-set", "generate")
EXPORT_FORMATS = ("auto", "adapter", "merged")
DEFAULT_LR = {"non-private": 1e-3, "dp-zo": 2e-3, "dp-sgd": 5e-3, "dual-priv": 5e-3}


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
    lora_variant: str = "standard"          # "ffa": LoRA's A matrices frozen (FFA-LoRA): half the noised coordinates
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
    secure_mode: bool = False               # Opacus' floating-point-attack-resistant noise (slower)
    release_training_stats: bool = False    # private runs: release loss / realised batch size (outside ε)
    # schedule
    steps: int | None = None
    epochs: float | None = None
    expected_batch_size: int = 64
    lr: float | None = None
    optimizer: str = "adam"
    seed: int = 0                           # model init, LoRA init, data order of non-private runs
    noise_seed: int | None = None           # DP noise, Poisson sampling, fusion noise; None = OS entropy (secret).
                                            # A fixed seed makes them re-creatable: reproducible, NOT private.
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
    update_mask: str = "noisy"              # "noisy": the paper's mask after the noise; "past-noisy", "public",
                                            # "random": fixed before the noise (noise on kept coordinates only)
    # DP-ZO
    zo_mu: float = 1e-3
    # running
    eval_batch_size: int = 128
    device: str = "auto"                    # "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
    progress: bool = True
    checkpoint_path: str | None = None      # save model + accountant state here at the end
    resume_from: str | None = None          # continue a checkpointed run (ε keeps counting)
    resume_new_budget: bool = False         # resuming: spend up to this config's ε in total (σ recalibrated)
    # --- scale (issue 11): precision, physical batches, activation memory -------------------------------------
    dtype: str = "auto"                     # model dtype: "auto" (bfloat16 on CUDA, float32 on CPU), "float32",
                                            # "bfloat16"; DP clipping/noise always run in >= fp32 (toolkit.precision)
    max_physical_batch_size: int | None = None  # process each logical (Poisson) batch in chunks of at most this
                                            # many records: one noise draw, one step, one accountant step per batch
    activation_checkpointing: bool = False  # recompute the LM's layer activations in backward (less memory);
                                            # not with grad_sample_mode="functorch" (see toolkit.models)
    # --- your data in, your model out (toolkit.userdata, toolkit.evaluation, toolkit.export) ---
    train_data: str | None = None           # a LLaVA JSON/JSONL file to train on instead of the embedded task
    eval_data: str | None = None            # a LLaVA JSON/JSONL file to evaluate on (with train_data and no
                                            # eval_data, nothing is evaluated: accuracy None)
    image_folder: str | None = None         # where the files' image paths point (default: each file's folder)
    eval_mode: str = "auto"                 # "closed-set" (rank candidates), "generate" (free text) or "auto"
    max_new_tokens: int = 16                # longest generated answer ("generate" mode)
    feature_cache: bool = True              # keep the visual tokens of file-backed data in the cache dir
    output_dir: str | None = None           # export the trained model here (a new or empty folder)
    export_format: str = "auto"             # "adapter" (peft LoRA + base), "merged" (plain LLaVA), "auto":
                                            # adapter when LoRA trained, else merged
    # issue 22: the privacy unit (toolkit.privacy.user_level)
    privacy_unit: str = "record"            # "user": ε protects all records of one user_id (users Poisson-sampled,
                                            # expected_batch_size counts users, one clipped mean per user)
    user_records_per_step: int = 4          # K: at most this many records of a sampled user used per step

    @property
    def private(self) -> bool:
        return self.method in PRIVATE_METHODS

    def resolved(self) -> "TrainConfig":
        """A copy with every method default filled in and every field validated."""
        c = dataclasses.replace(self)
        check_choice("method", c.method, METHODS)
        if c.token_strategy is None:
            c.token_strategy = "dual-priv" if c.method == "dual-priv" else "none"
        if c.keep_tokens is None and c.token_prune_ratio is None and c.token_strategy != "none":
            c.token_prune_ratio = 0.75
        if c.grad_prune_ratio is None:
            c.grad_prune_ratio = 0.2 if c.method == "dual-priv" else 0.0
        if c.sampling is None:
            c.sampling = "poisson" if c.private else "fixed"
        if c.lr is None:
            c.lr = DEFAULT_LR[c.method]
        check_config(c)
        return c

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_config(c: TrainConfig) -> None:
    """Raise ``ValueError`` naming the first bad field of a resolved config."""
    if c.private:
        if not (isinstance(c.epsilon, (int, float)) and c.epsilon > 0):
            raise ValueError(f"epsilon must be > 0 (math.inf for no noise), got {c.epsilon!r}")
        if not (isinstance(c.delta, (int, float)) and 0 < c.delta < 1):
            raise ValueError(f"delta must be in (0, 1), got {c.delta!r}")
        check_number("max_grad_norm", c.max_grad_norm, minimum=0)
    if c.steps is None and c.epochs is None:
        raise ValueError("give steps or epochs")
    if c.steps is not None:
        check_int("steps", c.steps, minimum=1)
    if c.epochs is not None:
        check_number("epochs", c.epochs, minimum=0)
    check_int("expected_batch_size", c.expected_batch_size, minimum=1)
    for name in ("train_limit", "eval_limit", "dataset_size"):
        if getattr(c, name) is not None:
            check_int(name, getattr(c, name), minimum=1)
    check_int("eval_batch_size", c.eval_batch_size, minimum=1)
    check_number("lr", c.lr, minimum=0)
    check_choice("optimizer", c.optimizer, OPTIMIZERS)
    check_choice("update_mask", c.update_mask, UPDATE_MASKS)
    check_choice("lora_variant", c.lora_variant, LORA_VARIANTS)
    if c.update_mask == "public" and c.train_data:
        raise ValueError("update_mask='public' ranks gradients on the embedded task's public split; a data set of "
                         "your own has none: use 'past-noisy' or 'random'")
    if c.update_mask != "noisy" and c.grad_prune_ratio == 0:
        raise ValueError(f"update_mask={c.update_mask!r} needs grad_prune_ratio > 0 (the fraction it drops)")
    check_fraction("grad_prune_ratio", c.grad_prune_ratio)
    if c.token_prune_ratio is not None:
        check_fraction("token_prune_ratio", c.token_prune_ratio)
    check_choice("sampling", c.sampling, ("poisson", "fixed"))
    if isinstance(c.fusion_noise_std, str) and c.fusion_noise_std != "matched":
        raise ValueError(f"fusion_noise_std must be a number, 'matched' or None, got {c.fusion_noise_std!r}")
    if isinstance(c.fusion_noise_std, (int, float)):
        check_number("fusion_noise_std", c.fusion_noise_std, minimum=0, strict=False)
    check_scale_fields(c)
    if c.resume_new_budget and not c.resume_from:
        raise ValueError("resume_new_budget applies to a resumed run: give resume_from too")
    check_choice("eval_mode", c.eval_mode, EVAL_MODES)
    check_int("max_new_tokens", c.max_new_tokens, minimum=1)
    check_choice("export_format", c.export_format, EXPORT_FORMATS)
    check_choice("privacy_unit", c.privacy_unit, ("record", "user"))   # issue 22
    check_int("user_records_per_step", c.user_records_per_step, minimum=1)
    if c.privacy_unit == "user" and not c.train_data:
        raise ValueError("privacy_unit='user' needs train_data whose records carry a user_id (the embedded tasks "
                         "have one record per image and no users)")
    if c.export_format == "adapter" and not c.trainable.startswith("lora"):
        raise ValueError(f"export_format 'adapter' needs a LoRA trainable mode (lora, lora+head), got "
                         f"{c.trainable!r}: use 'merged'")
    if c.device != "auto":
        try:
            device = torch.device(c.device)
        except RuntimeError as err:
            raise ValueError(f"device {c.device!r} is not a torch device ({err})") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {c.device!r} asked for, but torch sees no CUDA device")


def check_scale_fields(c: TrainConfig) -> None:
    """The issue-11 block: dtype, physical batch size, activation checkpointing."""
    check_choice("dtype", c.dtype, DTYPES)
    if c.max_physical_batch_size is not None:
        check_int("max_physical_batch_size", c.max_physical_batch_size, minimum=1)
    if c.activation_checkpointing:
        check_activation_checkpointing(c.grad_sample_mode if c.method in ("dp-sgd", "dual-priv") else None)


def resolve_device(c: TrainConfig) -> torch.device:
    if c.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(c.device)


def planned_steps(c: TrainConfig, sample_rate: float) -> int:
    """``steps``, or ``ceil(epochs / q)`` (an epoch is 1/q Poisson steps in expectation)."""
    return c.steps if c.steps is not None else max(1, math.ceil(c.epochs / sample_rate))

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

from toolkit.data import SPLITS, TASKS
from toolkit.methods import get_method, method_names
from toolkit.models import PRESETS, TRAINABLE_MODES, check_activation_checkpointing
from toolkit.precision import DTYPES, TRAINABLE_DTYPES
from toolkit.privacy.accounting import ACCOUNTANTS
from toolkit.privacy.engine import FP32_GHOST_MODES, GRAD_SAMPLE_MODES
from toolkit.privacy.update_masks import PRUNE_SCOPES
from toolkit.privacy.update_pruning import PRUNED_STATES
from toolkit.schema import check_fields, from_dict, setting
from toolkit.tokens.registry import STRATEGIES
from toolkit.validation import check_fraction, check_number
from toolkit.vocabulary import parse_epsilon

OPTIMIZERS = ("adam", "adamw", "sgd", "dp-adambc")
UPDATE_MASKS = ("noisy", "past-noisy", "public", "random")
LORA_VARIANTS = ("standard", "ffa")
EVAL_MODES = ("auto", "closed-set", "generate")
EXPORT_FORMATS = ("auto", "adapter", "merged")
SAMPLINGS = ("poisson", "fixed")
PRIVACY_UNITS = ("record", "user")


@dataclass
class TrainConfig:
    """Every knob of a run. ``None`` means "the method's default" (see :meth:`resolved`). Each field carries its
    schema (group, help, choices, bounds) in its metadata: validation, CLI flags and their help come from it."""

    method: str = setting("dual-priv", group="method", help="training method", choices=method_names)
    # model
    preset: str = setting("tiny", group="model", help="built-in model preset (built from config)",
                          choices=lambda: tuple(PRESETS))
    model_dir: str | None = setting(None, group="model", help="a local LLaVA directory instead of a preset "
                                    "(no warm start)")
    warm_start_steps: int | None = setting(None, group="model", minimum=0, help="public warm-start steps; None: "
                                           "the preset's default, 0: none")
    trainable: str = setting("lora+head", group="model", help="what trains", choices=TRAINABLE_MODES)
    lora_rank: int = setting(8, group="model", help="LoRA rank", minimum=1)
    lora_variant: str = setting("standard", group="model", choices=LORA_VARIANTS,
                                help="'ffa': LoRA's A matrices frozen (FFA-LoRA): half the noised coordinates")
    # data
    task: str = setting("parity", group="data", help="embedded task", choices=lambda: tuple(TASKS))
    train_split: str = setting("private", group="data", help="embedded split to train on", choices=SPLITS)
    eval_split: str = setting("test", group="data", help="embedded split to evaluate on", choices=SPLITS)
    train_limit: int | None = setting(None, group="data", minimum=1, help="use only the first N training records")
    eval_limit: int | None = setting(None, group="data", minimum=1, help="use only the first N eval records")
    dataset_size: int | None = setting(None, group="data", minimum=1,
                                       help="declared (public) record count; default: the training set's size")
    # privacy
    epsilon: float = setting(3.0, group="privacy", minimum=0, strict=True, allow_inf=True,
                             help="target ε ('inf' for no noise); only for private methods")
    delta: float = setting(1e-5, group="privacy", minimum=0, maximum=1, strict=True, below_maximum=True,
                           help="target δ")
    max_grad_norm: float = setting(1.0, group="privacy", minimum=0, strict=True, help="clipping norm C")
    accountant: str = setting("prv", group="privacy", help="privacy accountant", choices=ACCOUNTANTS)
    sampling: str | None = setting(None, group="privacy", choices=SAMPLINGS,
                                   help="'poisson' (private default) or 'fixed' (non-private default)")
    allow_fixed_batches: bool = setting(False, group="privacy",
                                        help="opt in to fixed batches under DP (different accounting)")
    grad_sample_mode: str = setting("hooks", group="privacy", choices=GRAD_SAMPLE_MODES,
                                    help="how Opacus computes per-example gradients")
    secure_mode: bool = setting(False, group="privacy",
                                help="Opacus' floating-point-attack-resistant noise (slower)")
    release_training_stats: bool = setting(False, group="privacy",
                                           help="private runs: release loss / realised batch size (outside ε)")
    # schedule
    steps: int | None = setting(None, group="schedule", minimum=1, help="optimizer steps (or give epochs)")
    epochs: float | None = setting(None, group="schedule", minimum=0, strict=True,
                                   help="epochs (1/q Poisson steps each)")
    expected_batch_size: int = setting(64, group="schedule", minimum=1, help="expected (Poisson) batch size")
    lr: float | None = setting(None, group="schedule", minimum=0, strict=True,
                               help="learning rate; None: the method's default")
    optimizer: str = setting("adam", group="schedule", help="inner optimizer", choices=OPTIMIZERS)
    seed: int = setting(0, group="schedule", help="model init, LoRA init, data order of non-private runs")
    noise_seed: int | None = setting(None, group="schedule",
                                     help="DP noise, sampling and fusion noise seed; None = OS entropy (secret). "
                                          "A fixed seed makes them re-creatable: reproducible, NOT private")
    # mechanism 1: visual tokens
    token_strategy: str | None = setting(None, group="tokens", choices=lambda: tuple(STRATEGIES),
                                         help="visual token strategy; None: the method's default")
    keep_tokens: int | None = setting(None, group="tokens", minimum=1, help="visual tokens kept per image")
    token_prune_ratio: float | None = setting(None, group="tokens", minimum=0, maximum=1, below_maximum=True,
                                              help="share of visual tokens pruned (None with keep_tokens None: "
                                                   "0.75 for a pruning method)")
    token_layer: int | None = setting(None, group="tokens", help="vision layer whose attention scores tokens")
    contextual_tokens: int | None = setting(None, group="tokens", minimum=0,
                                            help="merged contextual tokens among those kept")
    fusion_noise_std: float | str | None = setting(None, group="tokens",
                                                   help="a σ, 'matched' to the DP noise, or None/0 for off")
    prune_at_eval: bool = setting(True, group="tokens", help="prune visual tokens at evaluation as in training")
    # mechanism 2: update pruning
    grad_prune_ratio: float | None = setting(None, group="update pruning", minimum=0, maximum=1,
                                             help="share of the update zeroed; None: the method's default")
    prune_scope: str = setting("global", group="update pruning", choices=PRUNE_SCOPES,
                               help="rank coordinates over all tensors or per tensor")
    pruned_state: str = setting("advance", group="update pruning", choices=PRUNED_STATES,
                                help="what the optimizer state of pruned coordinates does")
    update_mask: str = setting("noisy", group="update pruning", choices=UPDATE_MASKS,
                               help="'noisy': the paper's mask after the noise; 'past-noisy', 'public', 'random': "
                                    "fixed before the noise (noise on kept coordinates only)")
    # DP-ZO
    zo_mu: float = setting(1e-3, group="dp-zo", minimum=0, strict=True, help="DP-ZO perturbation size")
    # running
    eval_batch_size: int = setting(128, group="running", minimum=1, help="evaluation batch size")
    device: str = setting("auto", group="running", help="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1'")
    progress: bool = setting(True, group="running", help="progress bar")
    checkpoint_path: str | None = setting(None, group="running", help="save model + accountant state here")
    resume_from: str | None = setting(None, group="running", help="continue a checkpointed run (ε keeps counting)")
    resume_new_budget: bool = setting(False, group="running",
                                      help="resuming: spend up to this config's ε in total (σ recalibrated)")
    # scale: precision, physical batches, activation memory
    dtype: str = setting("auto", group="scale", choices=DTYPES,
                         help="model dtype ('auto': bf16 on CUDA, fp32 on CPU); DP clipping/noise always >= fp32")
    trainable_dtype: str = setting("float32", group="scale", choices=TRAINABLE_DTYPES,
                                   help="dtype of the trained weights and their optimizer state: 'float32' (beside a "
                                        "bf16 model: mixed precision) or 'model' (the model's dtype: less memory)")
    max_physical_batch_size: int | None = setting(None, group="scale", minimum=1,
                                                  help="process each logical batch in chunks of at most this many "
                                                       "records (one noise draw, one step per batch)")
    activation_checkpointing: bool = setting(False, group="scale",
                                             help="recompute the LM's layer activations in backward")
    # your data in, your model out
    train_data: str | None = setting(None, group="your data", help="a LLaVA JSON/JSONL file to train on")
    eval_data: str | None = setting(None, group="your data", help="a LLaVA JSON/JSONL file to evaluate on")
    image_folder: str | None = setting(None, group="your data",
                                       help="where the files' image paths point (default: each file's folder)")
    eval_mode: str = setting("auto", group="your data", choices=EVAL_MODES,
                             help="'closed-set' (rank candidates), 'generate' (free text) or 'auto'")
    max_new_tokens: int = setting(16, group="your data", minimum=1, help="longest generated answer")
    feature_cache: bool = setting(True, group="your data", help="cache visual tokens of file-backed data")
    output_dir: str | None = setting(None, group="your data", help="export the trained model here (new/empty)")
    export_format: str = setting("auto", group="your data", choices=EXPORT_FORMATS,
                                 help="'adapter' (peft LoRA + base), 'merged' (plain LLaVA), 'auto'")
    # what a private run releases beyond ε (toolkit.privacy.release, toolkit.privacy.rules)
    release_cost_stats: bool = setting(False, group="privacy",
                                       help="private runs: release per-step time and peak memory (functions of the "
                                            "secret batch size; then listed outside the guarantee)")
    allow_large_delta: bool = setting(False, group="privacy",
                                      help="accept delta >= 1/N (refused otherwise; marked in the card)")
    # the privacy unit (toolkit.privacy.user_level)
    privacy_unit: str = setting("record", group="privacy", choices=PRIVACY_UNITS,
                                help="'user': ε protects all records of one user_id (users Poisson-sampled, "
                                     "expected_batch_size counts users, one clipped mean per user)")
    user_records_per_step: int = setting(4, group="privacy", minimum=1,
                                         help="K: at most this many records of a sampled user used per step")

    @property
    def private(self) -> bool:
        return get_method(self.method).private

    def resolved(self, method_rules: bool = True) -> "TrainConfig":
        """A copy with every method default (from :mod:`toolkit.methods`) filled in and every field validated,
        before any model or data is loaded. ``method_rules=False`` leaves out :func:`method_rule` (a sweep
        skips such cells by name instead of failing)."""
        c = dataclasses.replace(self)
        method = get_method(c.method)
        if isinstance(c.epsilon, str):
            c.epsilon = parse_epsilon(c.epsilon)
        if c.token_strategy is None:
            c.token_strategy = method.default_token_strategy
        if c.keep_tokens is not None and c.token_prune_ratio is not None and c.token_strategy != "none":
            raise ValueError(f"both keep_tokens and token_prune_ratio are set (keep_tokens={c.keep_tokens}, "
                             f"token_prune_ratio={c.token_prune_ratio}): give one visual-token budget, leave the "
                             "other None")   # here, before a model loads; the pruner would refuse it only then
        if c.keep_tokens is None and c.token_prune_ratio is None and c.token_strategy != "none":
            c.token_prune_ratio = 0.75
        if c.grad_prune_ratio is None:
            c.grad_prune_ratio = method.default_grad_prune_ratio
        if c.sampling is None:
            c.sampling = method.default_sampling
        if c.lr is None:
            c.lr = method.default_lr
        check_config(c, method_rules=method_rules)
        return c

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, unknown: str = "error") -> "TrainConfig":
        """A config from a mapping of field values (a run JSON, a checkpoint, an export's metadata). Unknown keys
        are refused by name (``unknown="error"``), warned about (``"warn"``) or dropped (``"ignore"``)."""
        return from_dict(cls, data, unknown=unknown)


def method_rule(c: TrainConfig) -> str | None:
    """Why the method cannot run these settings (its :class:`toolkit.methods.Method` capabilities), or None."""
    method = get_method(c.method)
    if c.grad_prune_ratio and not method.can_prune_update:
        return (f"grad_prune_ratio needs a DP-SGD method: it prunes the noisy gradient, and {c.method} has no "
                "gradient vector to prune")
    if c.optimizer == "dp-adambc" and method.noise != "gradient":
        return f"optimizer='dp-adambc' corrects for DP-SGD's per-coordinate noise; {c.method} has none"
    return None


def check_config(c: TrainConfig, method_rules: bool = True) -> None:
    """Raise ``ValueError`` naming the first bad field of a resolved config: every field against its schema
    (choices, bounds), then the rules that tie fields together."""
    check_fields(c)
    if c.private and c.secure_mode and c.noise_seed is not None:
        raise ValueError("secure_mode draws every secret from fresh OS randomness: noise_seed must be None "
                         f"(got {c.noise_seed!r}; a seed would make the noise and batches re-creatable)")
    if c.steps is None and c.epochs is None:
        raise ValueError("give steps or epochs (e.g. --steps 100)")
    if c.steps is not None and c.epochs is not None:   # steps would win and epochs be ignored without a word
        raise ValueError(f"give steps or epochs, not both (steps={c.steps}, epochs={c.epochs:g})")
    if method_rules and (reason := method_rule(c)):
        raise ValueError(reason)
    if c.update_mask == "public" and c.train_data:
        raise ValueError("update_mask='public' ranks gradients on the embedded task's public split; a data set of "
                         "your own has none: use 'past-noisy' or 'random'")
    if c.update_mask != "noisy" and c.grad_prune_ratio == 0:
        raise ValueError(f"update_mask={c.update_mask!r} needs grad_prune_ratio > 0 (the fraction it drops)")
    check_fraction("grad_prune_ratio", c.grad_prune_ratio)
    if c.token_prune_ratio is not None:
        check_fraction("token_prune_ratio", c.token_prune_ratio)
    if isinstance(c.fusion_noise_std, str) and c.fusion_noise_std != "matched":
        raise ValueError(f"fusion_noise_std must be a number, 'matched' or None, got {c.fusion_noise_std!r}")
    if isinstance(c.fusion_noise_std, (int, float)):
        check_number("fusion_noise_std", c.fusion_noise_std, minimum=0, strict=False)
    check_scale_fields(c)
    if c.resume_new_budget and not c.resume_from:
        raise ValueError("resume_new_budget applies to a resumed run: give resume_from too")
    if c.privacy_unit == "user" and not c.train_data:
        raise ValueError("privacy_unit='user' needs train_data whose records carry a user_id (the embedded tasks "
                         "have one record per image and no users)")
    if c.grad_sample_mode in FP32_GHOST_MODES and c.trainable == "lm-full" and get_method(c.method).noise == "gradient":
        raise ValueError(f"grad_sample_mode={c.grad_sample_mode!r} clips trainable nn.Linear layers only; trainable='lm-full' "
                         "also trains the embeddings and norms: use lora, lora+head or projector, or "
                         "grad_sample_mode='hooks'")
    if c.export_format == "adapter" and not c.trainable.startswith("lora"):
        raise ValueError(f"export_format 'adapter' needs a LoRA trainable mode (lora, lora+head), got "
                         f"{c.trainable!r}: use 'merged'")
    if c.device != "auto":
        check_device(c.device)


def check_device(name: str) -> torch.device:
    """``name`` as a torch device this machine has (``ValueError`` naming it otherwise)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {name!r} is not a torch device ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device")
    return device


def check_scale_fields(c: TrainConfig) -> None:
    """Activation checkpointing needs a per-example gradient mode that recomputation does not break."""
    if c.activation_checkpointing:
        check_activation_checkpointing(c.grad_sample_mode if get_method(c.method).noise == "gradient" else None)


def resolve_device(c: TrainConfig) -> torch.device:
    if c.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(c.device)


RUN_LENGTHS = ("steps", "epochs")   # one of them sets a run's length; both together are refused


def overlay(base: dict, top: dict) -> dict:
    """``base``'s fields with ``top``'s on top (a config file under flags, a sweep's base under a grid point or an
    override); a run length that ``top`` sets replaces ``base``'s other one, which would otherwise be a refused
    pair (``steps`` and ``epochs``). ``top`` setting both is left to be refused."""
    merged = {**base, **top}
    for given, other in (RUN_LENGTHS, RUN_LENGTHS[::-1]):
        if top.get(given) is not None and other not in top:
            merged[other] = None
    return merged


def planned_steps(c: TrainConfig, sample_rate: float) -> int:
    """``steps``, or ``ceil(epochs / q)`` (an epoch is 1/q Poisson steps in expectation)."""
    return c.steps if c.steps is not None else max(1, math.ceil(c.epochs / sample_rate))

"""What trains: the trainable-parameter modes (:func:`apply_trainable`, LoRA via peft) and activation
checkpointing. The vision tower always stays frozen.

Example::

    >>> from toolkit.models import build_model
    >>> from toolkit.trainable import apply_trainable
    >>> apply_trainable(build_model("tiny"), "projector") > 0
    True
"""
from __future__ import annotations

from peft import LoraConfig, inject_adapter_in_model
from torch import nn

TRAINABLE_MODES = ("lora", "lora+head", "projector", "lm-full")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def apply_trainable(bundle, mode: str = "lora", lora_rank: int = 8, lora_alpha: int | None = None,
                    lora_variant: str = "standard") -> int:
    """Choose what trains; the vision tower always stays frozen. Returns the number of trainable parameters.

    Modes:
        ``lora``: LoRA adapters on every linear of the language model (the paper's choice) + the projector.
        ``lora_variant="ffa"`` freezes LoRA's A matrices (FFA-LoRA, Sun et al. 2024).
        ``lora+head``: as ``lora``, plus the LM head (the answer head; cheap on small vocabularies).
        ``projector``: the multimodal projector only.
        ``lm-full``: the projector and every language-model weight.

    The tower is frozen on purpose: Opacus refuses a trainable CLIP embeddings module, a trainable position
    embedding gets a silently wrong per-sample gradient, and the last layer is unused at ``vision_feature_layer=-2``.
    LoRA layers are injected in place (peft's ``inject_adapter_in_model``) so the LLaVA class keeps its API.
    """
    if mode not in TRAINABLE_MODES:
        raise ValueError(f"unknown trainable mode {mode!r}; choose one of {TRAINABLE_MODES}")
    if lora_rank < 1:
        raise ValueError(f"lora_rank must be >= 1, got {lora_rank}")
    model = bundle.model
    freeze_all(model)
    lm = model.model.language_model
    if mode.startswith("lora"):
        if not any("lora_A" in n for n, _ in lm.named_modules()):
            config = LoraConfig(
                r=lora_rank, lora_alpha=lora_alpha or 2 * lora_rank, lora_dropout=0.0,
                target_modules=list(LORA_TARGETS), bias="none",
            )
            inject_adapter_in_model(config, lm)
        if lora_variant not in ("standard", "ffa"):
            raise ValueError(f"unknown lora_variant {lora_variant!r}; choose 'standard' or 'ffa'")
        # FFA-LoRA: A stays at its random init and only B trains, halving the coordinates DP-SGD must noise.
        trained = "lora_B" if lora_variant == "ffa" else "lora_"
        for name, p in lm.named_parameters():
            p.requires_grad_(trained in name)
    elif mode == "lm-full":
        for p in lm.parameters():
            p.requires_grad_(True)
        for p in model.lm_head.parameters():
            p.requires_grad_(True)
    for p in model.model.multi_modal_projector.parameters():
        p.requires_grad_(True)
    if mode == "lora+head":
        for p in model.lm_head.parameters():
            p.requires_grad_(True)
    return count_trainable(model)


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------ activation memory

CHECKPOINTING_MODES = ("hooks", "ghost", "ghost-fp32", "ghost-fp32-bk", None)  # grad_sample_mode values (None: no per-example gradients)


def check_activation_checkpointing(grad_sample_mode: str | None) -> None:
    """Refuse activation checkpointing where per-example gradients would break.

    Measured (tests/test_scale.py): with re-entrant checkpointing Opacus' hooks see each layer's forward once
    (the first forward runs without grad and captures nothing; the recomputation in backward captures and is
    consumed by the backward hook), so ``hooks`` and ``ghost`` per-example gradients/norms equal micro-batch
    ones. ``functorch`` mode fails inside ``torch.func`` (``requires_grad_`` under a transform), and
    non-re-entrant checkpointing leaves a second capture behind (no per-example gradient): neither is offered.
    """
    if grad_sample_mode not in CHECKPOINTING_MODES:
        raise ValueError(f"activation_checkpointing does not work with grad_sample_mode={grad_sample_mode!r} "
                         "(torch.func cannot run the recomputation); use grad_sample_mode='hooks', 'ghost' or 'ghost-fp32'")


def enable_activation_checkpointing(bundle) -> None:
    """Recompute each language-model layer's activations during backward instead of keeping them.

    Re-entrant checkpointing (the only kind Opacus' hooks handle, see :func:`check_activation_checkpointing`);
    the input embeddings are made to require grad so the recomputed layers backpropagate into LoRA weights even
    when nothing before the LM trains.
    """
    lm = bundle.model.model.language_model
    lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    lm.enable_input_require_grads()

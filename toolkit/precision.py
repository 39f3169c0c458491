"""The dtype a run computes in: ``"auto"`` resolves to bfloat16 on CUDA and float32 on CPU.

``TrainConfig.dtype`` sets the dtype of the frozen model. ``TrainConfig.trainable_dtype`` sets that of what trains:
``"float32"`` (the default) keeps the trained weights, their gradients and their optimizer state in fp32 beside a
bf16 frozen model, as peft does for its adapters (a bf16 weight loses an update below 2^-8 of its size, Adam's
second moment would never decay, DP-ZO's perturb-and-restore would drift); ``"model"`` puts them in the model's
dtype (pure bf16: less memory, and the setting of the 7B memory rows measured before fp32 trained weights became
the default; with them Dual-Priv stays below DP-ZO, which pays fp32 copies of 576-token activations). Whatever
they are, the privacy-relevant arithmetic of DP-SGD (per-example norms, clipping factors, the clipped sum, the
noise and the noisy sum) runs in at least fp32 (:mod:`toolkit.privacy.update_pruning`), the DP-ZO scalars in fp64, and the loss
in at least fp32 (:func:`toolkit.forward.per_example_token_loss`).

Example::

    >>> import torch
    >>> from toolkit.precision import resolve_dtype
    >>> resolve_dtype("auto", torch.device("cpu"))
    torch.float32
    >>> resolve_dtype("bfloat16", torch.device("cpu"))
    torch.bfloat16
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    >>> _ = model[0].requires_grad_(False)
    >>> cast_for_training(model, torch.bfloat16, "float32")
    >>> [p.dtype for p in model.parameters()]
    [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from toolkit.compat import cpu_has_native_bf16

DTYPES = ("auto", "float32", "bfloat16")
TRAINABLE_DTYPES = ("float32", "model")
_BY_NAME = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class DtypeNotSupportedError(ValueError):
    """The device cannot compute in the dtype asked for."""


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype for ``name`` on ``device`` (``"auto"``: bfloat16 on CUDA, float32 elsewhere), checked
    to be usable there (:func:`check_dtype_supported`)."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {DTYPES}")
    if name == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" and cuda_has_native_bf16(device) else torch.float32
    else:
        dtype = _BY_NAME[name]
    check_dtype_supported(dtype, device)
    return dtype


def cuda_has_native_bf16(device: torch.device) -> bool:
    """Compute capability >= 8.0 (Ampere on): ``torch.cuda.is_bf16_supported()`` also says True where bf16 is only
    emulated (a T4 or V100), several times slower than fp32 there."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def check_dtype_supported(dtype: torch.dtype, device: torch.device) -> None:
    """Raise :class:`DtypeNotSupportedError` if ``device`` cannot run ``dtype``; warn when a CPU emulates bf16
    (correct, but several times slower than fp32)."""
    if dtype != torch.bfloat16:
        return
    if device.type == "cuda":
        if not cuda_has_native_bf16(device):
            raise DtypeNotSupportedError(
                f"dtype bfloat16 asked for, but the GPU {torch.cuda.get_device_name(device)} does not support it "
                "(compute capability < 8.0); use dtype='float32'")
        return
    try:
        a = torch.ones(4, 4, dtype=torch.bfloat16, device=device)
        (a @ a).sum().item()
    except RuntimeError as err:
        raise DtypeNotSupportedError(f"dtype bfloat16 does not run on {device} ({err}); use dtype='float32'") from None
    if device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn("this CPU has no native bfloat16 instructions (AVX512-BF16 / AMX): torch emulates them, "
                      "correctly but slowly; dtype='float32' is likely faster here", stacklevel=3)


def cast_for_training(model: nn.Module, dtype: torch.dtype, trainable_dtype: str = "float32") -> None:
    """Put ``model`` in ``dtype``; with ``trainable_dtype="float32"`` the trainable parameters, and every LoRA
    adapter weight (FFA-LoRA's frozen A too: peft feeds B in A's dtype), stay in at least fp32.

    Call it after choosing what trains (:func:`toolkit.trainable.apply_trainable`). Inputs reach the fp32 parts in
    their dtype: peft casts a LoRA layer's input, :class:`toolkit.forward.LlavaLM` the projector's and the head's."""
    if trainable_dtype not in TRAINABLE_DTYPES:
        raise ValueError(f"unknown trainable_dtype {trainable_dtype!r}; choose one of {TRAINABLE_DTYPES}")
    model.to(dtype)
    master = torch.promote_types(dtype, torch.float32)
    if trainable_dtype == "model" or master == dtype:
        return
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        adapter = any(part.startswith("lora_") for part in name.split("."))
        if own and (adapter or any(p.requires_grad for p in own)):
            for p in own:  # the module's own tensors only: a LoRA wrapper's frozen base layer stays in ``dtype``
                p.data = p.data.to(master)

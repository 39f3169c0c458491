"""Analytic FLOPs of one training step of the LLM part (projector + language model + LM head), per method.

Counted: matrix multiplications, at 2 FLOPs per multiply-add (what ``torch.utils.flop_counter.FlopCounterMode``
counts). Not counted: elementwise work (norms, activations, softmax, rotary, optimizer update), the embedding
lookup, and the frozen vision tower, whose features the toolkit computes once per example outside the step
(:func:`tower_forward_flops` gives its cost when it does run in the step, as in :mod:`toolkit.bench`).

Notation: batch B, sequence length T = n_v + t (n_v visual tokens fed to the LLM, t text tokens: prompt,
answer and end-of-sequence), hidden d, key/value width d_kv, MLP width m, L layers, vocabulary V, vision
width d_vis, LoRA rank r on every linear of the LM (q, k, v, o, gate, up, down), P trainable parameters.

Forward, F (per step, B sequences)::

    projector   2·B·n_v·(d_vis·d + d·d)
    per layer   2·B·T·(2·d·d + 2·d·d_kv + 3·d·m)        q, k, v, o, gate, up, down
              + 4·B·T²·d                                  QK^T and (softmax)·V, full T x T (as kernels compute)
              + 2·B·T·r·Σ(d_in + d_out)                    LoRA (A then B) on each adapted linear
    LM head     2·B·T·d·V

Backward, about 2F: the gradient with respect to every matmul's *input* is needed down to the projector
(trainable in every mode), which costs F again with attention counted twice (dQ, dK, dV, dP: 8·B·T²·d), minus
the projector's first input gradient (its input, the frozen features, needs none); plus the gradient with respect
to each *trainable* weight, which costs that matmul's forward again (W).

Methods::

    non-private   F + backward
    DP-SGD        F + backward + W + 4·B·P      Opacus hooks: the per-example weight-gradient einsums repeat W
    Dual-Priv     the same at its own (pruned) n_v                 (autograd still forms the summed gradient),
                                                                    then per-example norms (2·B·P) and the
                                                                    clipped sum (2·B·P). Update pruning is a
                                                                    top-k selection: no FLOPs counted.
    DP-ZO         2·F + 8·P                     two forwards (θ ± μz) and no backward; perturb, restore and
                                                the step along z are 4 multiply-adds per parameter.

The estimate of F + backward matches ``FlopCounterMode`` on the tiny model exactly up to the tolerance the test
states (eager attention; the CPU SDPA kernel is not in the counter's registry).

Example::

    >>> from toolkit.flops import estimate_step_flops
    >>> est = estimate_step_flops("dp-sgd", visual_tokens=64, text_tokens=14, batch_size=8, preset="tiny")
    >>> est["total"] > est["forward"] > 0
    True
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import pandas as pd

from toolkit.data import TASKS, Collator
from toolkit.methods import get_method
from toolkit.models import PRESETS, build_tokenizer, spec_patches

METHOD_NAMES = ("non-private", "dp-sgd", "dual-priv", "dp-zo")


@dataclass(frozen=True)
class ModelDims:
    """The shapes the FLOPs depend on."""

    hidden: int
    kv_hidden: int
    intermediate: int
    layers: int
    vocab: int
    vision_hidden: int
    vision_layers: int = 0
    vision_intermediate: int = 0
    n_patches: int = 0
    patch_size: int = 0
    has_cls: bool = True

    @classmethod
    def from_hf_config(cls, config, patch_size: int | None = None) -> "ModelDims":
        """From a ``LlavaConfig`` (``model.config``)."""
        text, vision = config.text_config, config.vision_config
        heads = text.num_attention_heads
        kv = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        patch = patch_size or vision.patch_size
        return cls(hidden=text.hidden_size, kv_hidden=kv * head_dim, intermediate=text.intermediate_size,
                   layers=text.num_hidden_layers, vocab=text.vocab_size, vision_hidden=vision.hidden_size,
                   vision_layers=vision.num_hidden_layers, vision_intermediate=vision.intermediate_size,
                   n_patches=(vision.image_size // patch) ** 2, patch_size=patch,
                   has_cls=getattr(vision, "model_type", "") == "clip_vision_model")


@functools.lru_cache(maxsize=None)
def preset_dims(preset: str) -> ModelDims:
    """Dims of a model preset (``toolkit.models.PRESETS``), from its spec and tokenizer, without building it."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    s = PRESETS[preset]
    return ModelDims(hidden=s["lm_hidden"], kv_hidden=s["lm_hidden"], intermediate=s["lm_intermediate"],
                     layers=s["lm_layers"], vocab=s.get("vocab_size", len(build_tokenizer())),
                     vision_hidden=s["vision_hidden"], vision_layers=s["vision_layers"],
                     vision_intermediate=s.get("vision_intermediate", s["vision_hidden"] * 2),
                     n_patches=spec_patches(s), patch_size=s["patch_size"],
                     has_cls=s["tower"] == "clip")


@functools.lru_cache(maxsize=None)
def text_length(task: str = "parity", template: str = "user : <image> {question} assistant :") -> int:
    """Text tokens of one record of an embedded task (prompt + answer + end), the image block excluded; the
    longest answer of the task's candidates is used."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}")
    question, _, _, candidates = TASKS[task]
    tok = build_tokenizer()
    collator = Collator(tok, 1, tok.convert_tokens_to_ids("<image>"), template)
    longest = max(len(collator.answer_ids(a)) for a in candidates)
    return len(collator.prompt_ids(question)) - 1 + longest


def _lm_linears(d: ModelDims) -> list[tuple[int, int]]:
    """(d_in, d_out) of the seven linears of one decoder layer."""
    h, kv, m = d.hidden, d.kv_hidden, d.intermediate
    return [(h, h), (h, kv), (h, kv), (h, h), (h, m), (h, m), (m, h)]


def trainable_params(dims: ModelDims, trainable: str = "lora+head", lora_rank: int = 8) -> int:
    """P for a trainable mode (``toolkit.models.TRAINABLE_MODES``), biases included where the model has them."""
    projector = dims.vision_hidden * dims.hidden + dims.hidden + dims.hidden * dims.hidden + dims.hidden
    head = dims.hidden * dims.vocab
    lora = dims.layers * lora_rank * sum(i + o for i, o in _lm_linears(dims))
    if trainable == "projector":
        return projector
    if trainable == "lora":
        return projector + lora
    if trainable == "lora+head":
        return projector + lora + head
    if trainable == "lm-full":
        norms = (2 * dims.layers + 1) * dims.hidden
        return projector + dims.layers * sum(i * o for i, o in _lm_linears(dims)) + norms + head + dims.vocab * dims.hidden
    raise ValueError(f"unknown trainable mode {trainable!r}")


def estimate_step_flops(method: str, visual_tokens: int, text_tokens: int, batch_size: int,
                        trainable: str = "lora+head", lora_rank: int = 8, preset: str = "tiny",
                        dims: ModelDims | None = None, tower_in_step: bool = False) -> dict:
    """FLOPs of one step (see the module docstring for every formula).

    Returns a dict: ``forward`` (F), ``backward``, ``weight_grad`` (W, part of backward), ``dp_overhead``
    (per-example gradients + norms + clipped sum; 0 unless DP-SGD/Dual-Priv), ``zo_extra`` (DP-ZO's second
    forward and its O(P) work), ``tower`` (0 unless ``tower_in_step``), ``total``, ``trainable_params``,
    ``sequence_length``.
    """
    if method not in METHOD_NAMES:
        raise ValueError(f"unknown method {method!r}; choose one of {METHOD_NAMES}")
    d = dims or preset_dims(preset)
    B, n_v, T, r = int(batch_size), int(visual_tokens), int(visual_tokens) + int(text_tokens), int(lora_rank)
    lora = trainable.startswith("lora")
    linears = _lm_linears(d)
    proj_1, proj_2 = 2 * B * n_v * d.vision_hidden * d.hidden, 2 * B * n_v * d.hidden * d.hidden
    lm_linear = d.layers * 2 * B * T * sum(i * o for i, o in linears)
    attention = d.layers * 4 * B * T * T * d.hidden
    lora_f = d.layers * 2 * B * T * r * sum(i + o for i, o in linears) if lora else 0
    head = 2 * B * T * d.hidden * d.vocab
    forward = proj_1 + proj_2 + lm_linear + attention + lora_f + head

    input_grad = proj_2 + lm_linear + 2 * attention + lora_f + head
    weight_grad = proj_1 + proj_2 + lora_f
    if trainable in ("lora+head", "lm-full"):
        weight_grad += head
    if trainable == "lm-full":
        weight_grad += lm_linear
    backward = input_grad + weight_grad
    P = trainable_params(d, trainable, r)

    dp_overhead = zo_extra = 0
    noise = get_method(method).noise
    if noise == "gradient":
        dp_overhead = weight_grad + 4 * B * P
        total = forward + backward + dp_overhead
    elif noise == "scalar":
        zo_extra = forward + 8 * P
        backward = weight_grad = 0
        total = forward + zo_extra
    else:
        total = forward + backward
    tower = tower_forward_flops(d, B) if tower_in_step else 0
    total += tower
    return dict(method=method, forward=forward, backward=backward, weight_grad=weight_grad, dp_overhead=dp_overhead,
                zo_extra=zo_extra, tower=tower, total=total, trainable_params=P, sequence_length=T,
                visual_tokens=n_v, batch_size=B)


def tower_forward_flops(dims: ModelDims, batch_size: int) -> int:
    """Forward FLOPs of a ViT tower on B images: patch embedding + every encoder layer (no gradient)."""
    N = dims.n_patches + int(dims.has_cls)
    dv, mv = dims.vision_hidden, dims.vision_intermediate
    embed = 2 * dims.n_patches * 3 * dims.patch_size ** 2 * dv
    layer = 2 * N * (4 * dv * dv + 2 * dv * mv) + 4 * N * N * dv
    return batch_size * (embed + dims.vision_layers * layer)


def flops_for_rows(df: pd.DataFrame, text_tokens: int | None = None) -> pd.DataFrame:
    """Add the estimate to each row of a sweep (or bench) DataFrame: columns ``gflops_step`` (total),
    ``gflops_forward``, ``gflops_backward``, ``gflops_dp_overhead``, ``gflops_zo_extra``.

    Uses the row's ``method``, ``visual_tokens``, ``expected_batch_size`` (or ``batch_size``), ``preset``,
    ``trainable``, ``lora_rank`` and ``task`` (text length from :func:`text_length`); missing columns fall back to
    tiny / lora+head / rank 8 / parity. The batch is the *expected* batch (Poisson batches vary around it).
    """
    rows = []
    for _, row in df.iterrows():
        batch = row.get("expected_batch_size", row.get("batch_size"))
        task = row.get("task") if isinstance(row.get("task"), str) else "parity"
        preset = row.get("preset") if isinstance(row.get("preset"), str) else "tiny"
        trainable = row.get("trainable") if isinstance(row.get("trainable"), str) else "lora+head"
        rank = row.get("lora_rank")
        est = estimate_step_flops(
            row["method"], int(row["visual_tokens"]),
            text_tokens if text_tokens is not None else text_length(task), int(batch), trainable=trainable,
            lora_rank=int(rank) if pd.notna(rank) else 8, preset=preset,
            tower_in_step=bool(row.get("tower_in_step", False)) if pd.notna(row.get("tower_in_step", False)) else False,
        )
        rows.append({f"gflops_{k}": est[k] / 1e9 for k in ("forward", "backward", "dp_overhead", "zo_extra",
                                                           "tower")} | {"gflops_step": est["total"] / 1e9})
    return pd.concat([df.reset_index(drop=True), pd.DataFrame(rows)], axis=1)


def flops_table(visual_tokens: dict | int, text_tokens: int, batch_size: int, preset: str = "tiny",
                trainable: str = "lora+head", lora_rank: int = 8) -> pd.DataFrame:
    """One row per method: the estimate at each method's visual tokens (a dict method -> n_v, or one int)."""
    rows = []
    for method in METHOD_NAMES:
        n_v = visual_tokens[method] if isinstance(visual_tokens, dict) else visual_tokens
        rows.append(estimate_step_flops(method, n_v, text_tokens, batch_size, trainable, lora_rank, preset))
    return pd.DataFrame(rows)


__all__ = ["ModelDims", "preset_dims", "text_length", "trainable_params", "estimate_step_flops",
           "tower_forward_flops", "flops_for_rows", "flops_table"]

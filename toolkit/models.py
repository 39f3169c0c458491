"""Build LLaVA-family models from the named presets, and the public face of the model modules.

Nothing here downloads anything. A preset is a transformers ``LlavaForConditionalGeneration`` built from a
config, with a byte-level tokenizer made on the spot (:mod:`toolkit.tokenizer`) and a real image processor and
chat template (:mod:`toolkit.processor`); ``load_model`` reads a directory the user provides (:mod:`toolkit.model_io`);
what trains is :mod:`toolkit.trainable`. Every name stays importable from here (``from toolkit.models import X``).

Example::

    >>> from toolkit.models import build_model
    >>> bundle = build_model("tiny")
    >>> bundle.n_patches, bundle.has_cls
    (64, True)
"""
from __future__ import annotations

import contextlib

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

from toolkit.bundle import LlavaBundle, ModelLoadError
from toolkit.model_io import (BUNDLE_FILE, WEIGHT_FILES, check_loading_info, has_lora, load_model, quiet_transformers,
                              save_model)
from toolkit.processor import preset_image_processor
from toolkit.tokenizer import (LLAVA15_TEMPLATE, PRESET_CHAT_TEMPLATE, PRESET_PROMPT_TEMPLATE, SPECIAL_TOKENS,
                               TOKENIZER_CORPUS, TOKENIZER_VOCAB_SIZE, build_tokenizer, chat_prompt_template)
from toolkit.trainable import (CHECKPOINTING_MODES, LORA_TARGETS, TRAINABLE_MODES, apply_trainable,
                               check_activation_checkpointing, count_trainable, enable_activation_checkpointing,
                               freeze_all)

__all__ = [
    "BUNDLE_FILE", "CHECKPOINTING_MODES", "LLAVA15_TEMPLATE", "LORA_TARGETS", "LlavaBundle", "ModelLoadError",
    "PRESETS", "PRESET_CHAT_TEMPLATE", "SPECIAL_TOKENS", "TOKENIZER_CORPUS", "TOKENIZER_VOCAB_SIZE",
    "TRAINABLE_MODES", "WEIGHT_FILES", "apply_trainable", "build_model", "build_tokenizer", "chat_prompt_template",
    "check_activation_checkpointing", "check_loading_info", "count_trainable", "enable_activation_checkpointing",
    "freeze_all", "has_lora", "load_model", "quiet_transformers", "save_model",
]

PRESETS: dict[str, dict] = {
    # Unit-test size: 32x32 canvas, 4x4 patches -> 64 visual tokens (+[CLS]).
    "tiny": dict(
        tower="clip", image_size=32, patch_size=4, vision_hidden=64, vision_layers=3, vision_heads=4,
        lm_hidden=128, lm_layers=2, lm_heads=4, lm_intermediate=256,
        description="CLIP 3x64 on a 32x32 canvas (64 patches + [CLS]), Llama 2x128",
    ),
    # LLaVA-1.5's token count: 24x24 = 576 patches, so 576 -> 64 pruning means what it means on the real model.
    "llava576": dict(
        tower="clip", image_size=96, patch_size=4, vision_hidden=64, vision_layers=3, vision_heads=4,
        lm_hidden=256, lm_layers=4, lm_heads=4, lm_intermediate=688,
        description="CLIP 3x64 on a 96x96 canvas (24x24 = 576 patches + [CLS], as LLaVA-1.5), Llama 4x256",
    ),
    # An encoder without [CLS] (SigLIP-style), for the strategies that must not rely on one.
    "tiny-siglip": dict(
        tower="siglip", image_size=32, patch_size=4, vision_hidden=64, vision_layers=3, vision_heads=4,
        lm_hidden=128, lm_layers=2, lm_heads=4, lm_intermediate=256,
        description="SigLIP 3x64 on a 32x32 canvas (64 patches, no [CLS]), Llama 2x128",
    ),
    # LLaVA-1.5-7B's real shapes with random weights, for memory and speed ONLY (never trained, ~7.06e9
    # parameters: ~14 GB in bf16). Build it on a GPU, or on the "meta" device for shape checks; on a CPU use
    # build_model(..., lm_layers=2, vision_layers=2) (the 7B widths, fewer layers) as benchmarks/paper_shape.py does.
    "llava-7b-shape": dict(
        tower="clip", image_size=336, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16,
        vision_intermediate=4096, lm_hidden=4096, lm_layers=32, lm_heads=32, lm_intermediate=11008,
        vocab_size=32000, max_positions=4096, rms_norm_eps=1e-5,
        image_mean=(0.48145466, 0.4578275, 0.40821073), image_std=(0.26862954, 0.26130258, 0.27577711),
        # the paper's setting (LoRA on the LM, 576 -> 64 tokens) with the lean defaults: LM layers recomputed in
        # backward, ghost clipping in fp32 (toolkit.privacy.ghost_fp32: no per-example gradient is ever held), and
        # SGD with momentum (one state tensor: Adam's second moment alone put Dual-Priv 0.39 % over DP-ZO at batch 4);
        # trained weights in fp32 as training keeps them (Dual-Priv / DP-ZO 0.9913 at batch 4, 0.9982 in pure bf16)
        bench=dict(trainable="lora", keep_tokens=64, activation_checkpointing=True, grad_sample_mode="ghost-fp32",
                   optimizer="sgd", trainable_dtype="float32"),
        shape_only=True,  # memory/speed only: never trained, never built at full depth by default (see build_model)
        description="LLaVA-1.5-7B shapes, random weights: CLIP ViT-L/14 at 336 px (576 patches + [CLS], 24x1024), "
                    "Llama 32x4096 (32 heads, MLP 11008, vocab 32000); memory/speed only",
    ),
}

def _vision_config(spec: dict):
    common = dict(
        hidden_size=spec["vision_hidden"], intermediate_size=spec.get("vision_intermediate", spec["vision_hidden"] * 2),
        num_hidden_layers=spec["vision_layers"], num_attention_heads=spec["vision_heads"],
        image_size=spec["image_size"], patch_size=spec["patch_size"], num_channels=3,
    )
    if spec["tower"] == "clip":
        return CLIPVisionConfig(projection_dim=spec["vision_hidden"], **common)
    if spec["tower"] == "siglip":
        return SiglipVisionConfig(**common)
    raise ValueError(f"unknown vision tower kind {spec['tower']!r}")


def spec_patches(spec: dict) -> int:
    """Patches a preset spec's vision tower yields per image (its visual tokens before pruning)."""
    return (spec["image_size"] // spec["patch_size"]) ** 2


def preset_spec(preset: str, lm_layers: int | None = None, vision_layers: int | None = None) -> dict:
    """The preset's spec with its depths overridden (same widths), checked: what :func:`build_model` builds."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    spec = dict(PRESETS[preset])
    if lm_layers is not None:
        if isinstance(lm_layers, bool) or not isinstance(lm_layers, int) or lm_layers < 1:
            raise ValueError(f"lm_layers must be an integer >= 1, got {lm_layers!r}")
        spec["lm_layers"] = lm_layers
    if vision_layers is not None:
        if isinstance(vision_layers, bool) or not isinstance(vision_layers, int) or vision_layers < 2:
            raise ValueError(f"vision_layers must be an integer >= 2 (features come from the second-to-last "
                             f"layer), got {vision_layers!r}")
        spec["vision_layers"] = vision_layers
    return spec


def build_model(preset: str = "tiny", seed: int = 0, *, dtype: torch.dtype | None = None,
                lm_layers: int | None = None, vision_layers: int | None = None,
                device: str | torch.device | None = None) -> LlavaBundle:
    """Build a randomly initialised LLaVA from a named preset (see ``PRESETS``), reproducible from ``seed``.

    ``dtype``: the parameters' dtype (default float32); the model is created directly in it, so a bf16 build
    never holds an fp32 copy. ``lm_layers`` / ``vision_layers`` override the preset's depths (same widths): a
    shallower real-width model for per-layer memory measurements (``vision_layers`` >= 2, since LLaVA takes
    features from the second-to-last layer). ``device="meta"`` builds shapes only (no memory, no values).
    """
    spec = preset_spec(preset, lm_layers, vision_layers)
    if spec.get("shape_only") and device is None and lm_layers is None and vision_layers is None:
        raise ValueError(
            f"preset {preset!r} is for memory/speed measurements at real scale (~7.06e9 parameters: 14 GB in bf16, "
            "28 GB in fp32): name a device explicitly (device='cuda', or 'meta' for shapes only) or build a "
            "shallower copy with lm_layers=/vision_layers=")
    tokenizer = build_tokenizer()
    text_config = LlamaConfig(
        vocab_size=spec.get("vocab_size", len(tokenizer)), hidden_size=spec["lm_hidden"],
        intermediate_size=spec["lm_intermediate"], num_hidden_layers=spec["lm_layers"],
        num_attention_heads=spec["lm_heads"], num_key_value_heads=spec["lm_heads"],
        max_position_embeddings=spec.get("max_positions", 2048), rms_norm_eps=spec.get("rms_norm_eps", 1e-6),
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    has_cls = spec["tower"] == "clip"
    config = LlavaConfig(
        vision_config=_vision_config(spec), text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        # LLaVA drops [CLS] before the projector ("default"); a tower without one keeps every token.
        vision_feature_select_strategy="default" if has_cls else "full",
        projector_hidden_act="gelu",
    )
    # SDPA everywhere: the [CLS] attention row is recomputed from q/k when needed (toolkit.tokens).
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or torch.float32)  # create in the target dtype: no fp32 copy of a bf16 model
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = LlavaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    mean, std = tuple(spec.get("image_mean", (0.5,) * 3)), tuple(spec.get("image_std", (0.5,) * 3))
    return LlavaBundle(
        model=model, tokenizer=tokenizer, preset=preset, image_size=spec["image_size"],
        patch_size=spec["patch_size"], has_cls=has_cls, info=dict(spec, preset=preset, seed=seed),
        image_mean=mean, image_std=std, prompt_template=PRESET_PROMPT_TEMPLATE, chat_template=PRESET_CHAT_TEMPLATE,
        image_processor=preset_image_processor(spec["image_size"], mean, std),
    )

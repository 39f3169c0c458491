"""Model folders: save a model with its processor (:func:`save_model`) and load a local LLaVA checkpoint or a saved
model back, offline and checked weight by weight (:func:`load_model`). Nothing here downloads anything.

A folder written here is a plain Hugging Face LLaVA folder: ``config.json`` + weights, the tokenizer,
``processor_config.json`` (image processor, image-token count) and ``chat_template.jinja``, so
``AutoProcessor.from_pretrained(folder)`` and ``LlavaForConditionalGeneration.from_pretrained(folder)`` load it;
``toolkit_bundle.json`` adds what only the toolkit uses (preset name, prompt template).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, LlavaForConditionalGeneration
from torch import nn

from toolkit.bundle import LlavaBundle, ModelLoadError
from toolkit.processor import load_image_processor, preset_image_processor, save_processor
from toolkit.quiet import quiet_transformers
from toolkit.tokenizer import (LLAVA15_CHAT_TEMPLATE, LLAVA15_TEMPLATE, PRESET_CHAT_TEMPLATE, PRESET_PROMPT_TEMPLATE,
                               read_chat_template, render_prompt_template)

BUNDLE_FILE = "toolkit_bundle.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def has_lora(model: nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def save_model(bundle: LlavaBundle, path: str | os.PathLike) -> Path:
    """Save model, tokenizer, processor and chat template so that :func:`load_model` (or plain transformers)
    restores them offline.

    A model carrying LoRA layers is refused: its weights are stored under names a plain LLaVA does not have.
    Save a trained model with :func:`toolkit.export.save_trained` (merged, or as a peft adapter).
    """
    if has_lora(bundle.model):
        raise ValueError("this model carries LoRA adapters: save_model would store weights that a plain LLaVA "
                         "cannot load; use toolkit.export.save_trained(bundle, dir) (merged or peft adapter)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    bundle.model.save_pretrained(path)
    if bundle.image_processor is not None:
        save_processor(bundle, path)  # tokenizer, processor_config.json, chat_template.jinja
    else:
        bundle.tokenizer.save_pretrained(path)
    meta = dict(
        preset=bundle.preset, image_size=bundle.image_size, patch_size=bundle.patch_size, has_cls=bundle.has_cls,
        image_mean=list(bundle.image_mean), image_std=list(bundle.image_std),
        prompt_template=bundle.prompt_template, info=bundle.info,
        image_processor=bundle.image_processor is not None,
    )
    (path / BUNDLE_FILE).write_text(json.dumps(meta, indent=2, default=str))
    return path


def check_loading_info(path: Path, info: dict) -> None:
    """Raise unless every weight of the model came from the checkpoint and every checkpoint weight was used."""
    missing, unexpected = sorted(info.get("missing_keys") or []), sorted(info.get("unexpected_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if any("lora_" in k or ".base_layer." in k for k in unexpected):
        raise ModelLoadError(f"{str(path)!r} holds LoRA weights saved unmerged, which a plain LLaVA cannot load "
                             f"(e.g. {unexpected[0]!r}); load a toolkit export with toolkit.export.load_trained")
    if missing:
        raise ModelLoadError(f"{str(path)!r} lacks {len(missing)} weight(s) of the model (e.g. {missing[0]!r}): "
                             "they would be left uninitialised")
    if unexpected or mismatched:
        example = unexpected[0] if unexpected else mismatched[0]
        raise ModelLoadError(f"{str(path)!r} holds weights the model does not expect (e.g. {example!r})")


def _read_config(path: Path):
    if not path.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"model path {str(path)!r} is not a directory")
    if not (path / "config.json").is_file():
        if (path / "adapter_config.json").is_file():   # a peft adapter export: its base is elsewhere
            raise ModelLoadError(f"{str(path)!r} is a LoRA adapter, not a whole model: load it with "
                                 "toolkit.export.load_trained(path), or with peft onto its base")
        raise ModelLoadError(f"{str(path)!r} has no config.json: not a transformers model directory")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as err:  # transformers raises several types for a broken config
        raise ModelLoadError(f"{str(path)!r}: config.json could not be read ({err})") from err
    if getattr(config, "model_type", None) != "llava":
        raise ModelLoadError(
            f"{str(path)!r} holds a {getattr(config, 'model_type', 'unknown')!r} model, not a LLaVA-family one "
            "(config.json model_type must be 'llava')"
        )
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ModelLoadError(f"{str(path)!r} has a LLaVA config.json but no weights (none of {', '.join(WEIGHT_FILES)})")
    return config


def load_model(path: str | os.PathLike, dtype: torch.dtype | None = None) -> LlavaBundle:
    """Load a LLaVA-family model from a local directory, never from a hub.

    Accepts a directory written by :func:`save_model` (or a merged :mod:`toolkit.export`) or a Hugging Face
    LLaVA checkpoint (``config.json`` with ``model_type`` ``llava``, weights, tokenizer files, a processor config
    and a chat template). A checkpoint is used with its own tokenizer, chat template (rendered into the toolkit's
    ``prompt_template``) and image processor (read by ``AutoProcessor``: :mod:`toolkit.processor`).

    Raises:
        ModelLoadError: the path does not exist, is not a directory, holds no LLaVA-family model or no weights,
            its weights do not cover the model exactly (a weight left uninitialised is an error, not a warning),
            or its processor is one the toolkit cannot honour (any-res tiling, video).
    """
    path = Path(path).expanduser()
    config = _read_config(path)
    image_size = int(config.vision_config.image_size)
    processor = load_image_processor(path, image_size)  # refused before the weights are read
    try:
        with quiet_transformers():
            model, info = LlavaForConditionalGeneration.from_pretrained(
                path, local_files_only=True, attn_implementation="sdpa", dtype=dtype, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise ModelLoadError(f"{str(path)!r}: the weights could not be loaded ({err.__class__.__name__}: "
                             f"{str(err).splitlines()[0]})") from None
    check_loading_info(path, info)
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise ModelLoadError(f"{str(path)!r}: the tokenizer could not be loaded ({err.__class__.__name__}: "
                             f"{str(err).splitlines()[0]})") from None
    model.eval()
    chat_template, source = read_chat_template(path, tokenizer)
    meta_file = path / BUNDLE_FILE
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        mean, std = tuple(meta["image_mean"]), tuple(meta["image_std"])
        if processor is None and not str(meta["preset"]).startswith("local:"):
            # saved before presets had a processor: the preset's own (identical pixels on its square canvases)
            processor = preset_image_processor(meta["image_size"], mean, std)
        if chat_template is None and meta["prompt_template"] == PRESET_PROMPT_TEMPLATE:
            chat_template = PRESET_CHAT_TEMPLATE
        return LlavaBundle(
            model=model, tokenizer=tokenizer, preset=meta["preset"], image_size=meta["image_size"],
            patch_size=meta["patch_size"], has_cls=meta["has_cls"], image_mean=mean, image_std=std,
            prompt_template=meta["prompt_template"], info=meta["info"], image_processor=processor,
            chat_template=chat_template,
        )
    vision = config.vision_config
    mean, std = CLIP_MEAN, CLIP_STD
    if processor is not None:
        mean, std = tuple(getattr(processor, "image_mean", mean)), tuple(getattr(processor, "image_std", std))
    if chat_template:
        template = render_prompt_template(chat_template, tokenizer, f"{str(path)!r}: the chat template ({source})")
    else:
        template, chat_template = LLAVA15_TEMPLATE, LLAVA15_CHAT_TEMPLATE
    return LlavaBundle(
        model=model, tokenizer=tokenizer, preset=f"local:{path.name}", image_size=image_size,
        patch_size=int(vision.patch_size), has_cls=getattr(vision, "model_type", "") == "clip_vision_model",
        image_mean=mean, image_std=std, prompt_template=template, image_processor=processor,
        chat_template=chat_template, info=dict(path=str(path), prompt_template_source=source),
    )

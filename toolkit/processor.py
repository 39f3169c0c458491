"""Images in: a model's image processor read through transformers itself, refused where the toolkit cannot honour
it, and the Hugging Face processor (tokenizer + image processor + chat template) saved with every model.

A local checkpoint's processor is read with ``AutoProcessor.from_pretrained(dir)`` (transformers 5's
``processor_config.json``, the older ``preprocessor_config.json``, either layout), so the pixels the toolkit feeds
are exactly the ones the checkpoint's own processor produces (tested to 1e-6 for CLIP- and SigLIP-style
processors). What the toolkit's forward cannot feed is refused by name, never approximated: LLaVA-NeXT /
OneVision any-res tiling (several crops per image), video processors, and any processor whose output is not the
vision tower's square input.

The embedded presets get a real processor too (:func:`preset_image_processor`): LLaVA-1.5's "pad" mode, i.e. a
photo is letterboxed to a square with the mean colour, then resized to the preset's input size (a square canvas
is only resized; nothing is cropped away and nothing is squashed).

Example::

    >>> from toolkit.processor import preset_image_processor
    >>> from PIL import Image
    >>> preset_image_processor(32, (0.5,) * 3, (0.5,) * 3)(images=[Image.new("RGB", (64, 16))],
    ...                                                     return_tensors="pt")["pixel_values"].shape
    torch.Size([1, 3, 32, 32])
"""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, LlavaProcessor
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

from toolkit.bundle import ModelLoadError
from toolkit.quiet import quiet_transformers

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
VIDEO_FILES = ("video_preprocessor_config.json",)
# Processors whose output the toolkit's forward (one square image per record) cannot take, and why.
REFUSED = {
    "LlavaNextProcessor": "LLaVA-NeXT any-res tiling (several crops per image)",
    "LlavaNextImageProcessor": "LLaVA-NeXT any-res tiling (several crops per image)",
    "LlavaNextImageProcessorPil": "LLaVA-NeXT any-res tiling (several crops per image)",
    "LlavaOnevisionProcessor": "LLaVA-OneVision any-res tiling (several crops per image)",
    "LlavaOnevisionImageProcessor": "LLaVA-OneVision any-res tiling (several crops per image)",
    "LlavaOnevisionImageProcessorPil": "LLaVA-OneVision any-res tiling (several crops per image)",
    "LlavaNextVideoProcessor": "a video processor (frames, not one image)",
}
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, as LLaVA-1.5 resizes


def preset_image_processor(image_size: int, image_mean, image_std) -> LlavaImageProcessorPil:
    """An embedded preset's image processor: letterbox to a square with the mean colour (LLaVA-1.5's "pad"), then
    a bicubic resize to ``image_size``, then ``(x / 255 - mean) / std``. A square image is only resized."""
    return LlavaImageProcessorPil(
        do_pad=True, do_resize=True, size={"shortest_edge": int(image_size)}, resample=BICUBIC,
        do_center_crop=True, crop_size={"height": int(image_size), "width": int(image_size)},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=[float(m) for m in image_mean], image_std=[float(s) for s in image_std], do_convert_rgb=True)


def _refusal(obj) -> str | None:
    name = type(obj).__name__
    if name in REFUSED:
        return f"{name}: {REFUSED[name]}"
    if getattr(obj, "image_grid_pinpoints", None):
        return f"{name}: any-res tiling (image_grid_pinpoints)"
    if "Video" in name or getattr(obj, "video_processor", None) is not None:
        return f"{name}: a video processor (frames, not one image)"
    return None


def check_supported(processor, path, image_size: int | None = None):
    """The image processor inside ``processor`` (a processor or an image processor), or ModelLoadError naming
    what the toolkit cannot honour. With ``image_size``, its output must be the tower's ``image_size`` square."""
    for obj in (processor, getattr(processor, "image_processor", None)):
        reason = _refusal(obj) if obj is not None else None
        if reason:
            raise ModelLoadError(f"{str(path)!r}: the checkpoint's processor is {reason}, which the toolkit cannot "
                                 "feed (one square image per record); it is refused rather than approximated")
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None and callable(getattr(processor, "preprocess", None)):
        image_processor = processor
    if image_processor is None:
        raise ModelLoadError(f"{str(path)!r}: {type(processor).__name__} has no image processor")
    if image_size is not None:
        probe = image_processor(images=[Image.new("RGB", (7, 5))], return_tensors="pt")["pixel_values"]
        if tuple(probe.shape[-3:]) != (3, image_size, image_size):
            raise ModelLoadError(
                f"{str(path)!r}: the image processor ({type(image_processor).__name__}) produces pixel values of "
                f"shape {list(probe.shape[-3:])}, but the vision tower takes [3, {image_size}, {image_size}]")
    return image_processor


def load_image_processor(path: str | Path, image_size: int | None = None):
    """The checkpoint's own image processor, read as ``AutoProcessor.from_pretrained(path)`` reads it, or None
    when the folder has no processor config. Refuses (ModelLoadError) what the toolkit cannot honour."""
    path = Path(path)
    if not any((path / name).is_file() for name in PROCESSOR_FILES):
        if any((path / name).is_file() for name in VIDEO_FILES):
            raise ModelLoadError(f"{str(path)!r} holds only a video processor ({VIDEO_FILES[0]}), which the toolkit "
                                 "cannot feed (one square image per record)")
        return None
    _refuse_by_config(path)
    try:
        with quiet_transformers():
            processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    except Exception:  # e.g. a processor class needing remote code (a toolkit export's pruned processor)
        processor = None
    if processor is None or getattr(processor, "image_processor", None) is None and not callable(
            getattr(processor, "preprocess", None)):
        try:
            with quiet_transformers():
                processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        except Exception as err:  # transformers raises several types for a broken config
            raise ModelLoadError(f"{str(path)!r}: the image processor could not be read ({err})") from None
    return check_supported(processor, path, image_size)


def _refuse_by_config(path: Path) -> None:
    """Refuse by the saved class names before transformers builds anything (a tiling processor loads fine)."""
    for name in PROCESSOR_FILES:
        file = path / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text())
        except ValueError as err:
            raise ModelLoadError(f"{str(path)!r}: {name} is not valid JSON ({err})") from None
        nested = data.get("image_processor") if isinstance(data.get("image_processor"), dict) else {}
        for cls in (data.get("processor_class"), data.get("image_processor_type"), nested.get("image_processor_type")):
            if cls in REFUSED:
                raise ModelLoadError(f"{str(path)!r}: the checkpoint's processor is {cls}: {REFUSED[cls]}, which the "
                                     "toolkit cannot feed (one square image per record); refused, not approximated")
        if data.get("image_grid_pinpoints") or nested.get("image_grid_pinpoints"):
            raise ModelLoadError(f"{str(path)!r}: the checkpoint's processor uses any-res tiling "
                                 "(image_grid_pinpoints), which the toolkit cannot feed; refused, not approximated")


def make_processor(bundle) -> LlavaProcessor:
    """The Hugging Face processor of ``bundle``: its tokenizer, image processor and chat template, with the number
    of ``<image>`` placeholders stock LLaVA expects (one per patch, plus [CLS] when the model feeds it)."""
    if bundle.image_processor is None:
        raise ValueError("this model has no image processor to save")
    config = bundle.model.config
    return LlavaProcessor(
        image_processor=bundle.image_processor, tokenizer=bundle.tokenizer, patch_size=bundle.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1 if bundle.has_cls else 0, chat_template=bundle.chat_template)


def save_processor(bundle, folder: str | Path) -> Path:
    """Write ``processor_config.json``, ``chat_template.jinja`` and the tokenizer files into ``folder``, so that
    ``AutoProcessor.from_pretrained(folder)`` gives the model's processor offline."""
    folder = Path(folder)
    make_processor(bundle).save_pretrained(folder)
    return folder


def describe_preprocessing(image_processor) -> str:
    """In words, how this image processor turns a photo into pixel values (for the model card and README)."""
    if image_processor is None:
        return "resized to a square (aspect ratio not kept), scaled to [0, 1], normalised"
    steps = []
    size = getattr(image_processor, "size", None) or {}
    crop = getattr(image_processor, "crop_size", None) or {}
    if getattr(image_processor, "do_pad", False):
        steps.append("letterboxed to a square with the mean colour (nothing cropped, nothing squashed)")
    if getattr(image_processor, "do_resize", False):
        if size.get("shortest_edge"):
            steps.append(f"resized (short side to {size['shortest_edge']} px, aspect ratio kept)")
        elif size.get("height"):
            steps.append(f"resized to {size['height']}x{size['width']} px (aspect ratio NOT kept)")
    if getattr(image_processor, "do_center_crop", False) and crop.get("height"):
        steps.append(f"centre-cropped to {crop['height']}x{crop['width']} px")
    if getattr(image_processor, "do_rescale", False):
        steps.append("scaled to [0, 1]")
    if getattr(image_processor, "do_normalize", False):
        mean = ", ".join(f"{m:.4g}" for m in image_processor.image_mean)
        std = ", ".join(f"{s:.4g}" for s in image_processor.image_std)
        steps.append(f"normalised with mean ({mean}) and std ({std})")
    return f"{type(image_processor).__name__}: " + ", then ".join(steps)

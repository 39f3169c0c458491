"""Build LLaVA-family models: tiny presets from config, local checkpoints, and trainable-parameter choices.

Nothing here downloads anything. A preset is a transformers ``LlavaForConditionalGeneration`` built from a
config, with a byte-level tokenizer made on the spot; ``load_model`` reads a directory the user provides
(a tiny model saved by :func:`save_model`, or a local copy of e.g. ``llava-1.5-7b-hf``).

Example::

    >>> from toolkit.models import build_model
    >>> bundle = build_model("tiny")
    >>> bundle.n_patches, bundle.has_cls
    (64, True)
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers import models as tokenizer_models
from transformers import (AutoConfig, AutoImageProcessor, AutoTokenizer, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, PreTrainedTokenizerFast, SiglipVisionConfig)
from transformers.utils import logging as hf_logging
from torch import nn

from toolkit.data import preprocess_images

# Public text the embedded byte-level tokenizer learns its merges from: the prompt template, every question and
# answer of the embedded data sets (toolkit.data; repeated so that their merges come first), numbers, and a few
# common English words. It only decides which strings are single tokens; any other text is still encoded, byte
# by byte (never <unk>). 384 entries = 256 bytes + 5 special tokens + 123 merges, the smallest size at which
# every embedded question word and answer is one token (tested); a larger vocabulary only widens the LM head.
TOKENIZER_CORPUS = (
    "user : <image> what digit is this ? assistant :",
    " is the digit even or odd ? what is the left digit ? what is the right digit ?",
    " what is the sum of the two digits ? which number is it ? yes no , . !",
) * 4 + (" " + " ".join(str(i) for i in range(100)),) * 2 + (
    " the a an of in on at to from with and or not is are was it this that which what where who how many",
    " left right top bottom middle center up down image picture photo colour color red green blue yellow",
    " black white grey gray dark light large small big one two three four five six seven eight nine ten",
)
TOKENIZER_VOCAB_SIZE = 384
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]

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
        # the paper's setting (LoRA on the LM, 576 -> 64 tokens) with the lean default: LM layers recomputed in
        # backward (ghost clipping is not offered: it sums clipped gradients in the parameter dtype, bf16 here)
        bench=dict(trainable="lora", keep_tokens=64, activation_checkpointing=True),
        shape_only=True,  # memory/speed only: never trained, never built at full depth by default (see build_model)
        description="LLaVA-1.5-7B shapes, random weights: CLIP ViT-L/14 at 336 px (576 patches + [CLS], 24x1024), "
                    "Llama 32x4096 (32 heads, MLP 11008, vocab 32000); memory/speed only",
    ),
}

TRAINABLE_MODES = ("lora", "lora+head", "projector", "lm-full")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ModelLoadError(ValueError):
    """A model directory is missing or does not hold a LLaVA-family model."""


@dataclass
class LlavaBundle:
    """A LLaVA model with everything needed to feed it: tokenizer, image geometry, placeholder id."""

    model: nn.Module
    tokenizer: object
    preset: str
    image_size: int
    patch_size: int
    has_cls: bool
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    prompt_template: str = "user : <image> {question} assistant :"
    info: dict = field(default_factory=dict)
    image_processor: object = None  # a local checkpoint's own (HF) image processor; None: resize + normalise

    def preprocess(self, images) -> torch.Tensor:
        """Pixel values ``[B, 3, H, W]`` for the vision tower: the checkpoint's own image processor when it has
        one (LLaVA-1.5: resize the short side, centre crop, CLIP mean/std), else a square resize + mean/std."""
        if self.image_processor is not None:
            rgb = [image.convert("RGB") for image in images]
            return self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]
        return preprocess_images(images, self.image_size, self.image_mean, self.image_std)

    @property
    def config(self):
        return self.model.config

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side

    @property
    def n_patches(self) -> int:
        rows, cols = self.grid
        return rows * cols

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    @property
    def vision_feature_layer(self) -> int:
        return int(self.model.config.vision_feature_layer)

    @property
    def n_vision_layers(self) -> int:
        return int(self.model.config.vision_config.num_hidden_layers)


def build_tokenizer():
    """A byte-level BPE tokenizer trained on the spot on :data:`TOKENIZER_CORPUS` (public text, no download).

    Byte-level means every string is encodable: a word the merges never saw is spelled in bytes, so a user's
    answer is never ``<unk>``. The merges make every embedded question word and answer (with its leading space,
    as the collator encodes answers) a single token. Training is deterministic: the same corpus gives the same
    vocabulary in every process (the warm-start cache relies on it).

    Example::

        >>> tok = build_tokenizer()
        >>> tok.convert_ids_to_tokens(tok(" odd", add_special_tokens=False)["input_ids"])
        ['Ġodd']
        >>> tok.decode(tok(" Schloß Neuschwanstein", add_special_tokens=False)["input_ids"])
        ' Schloß Neuschwanstein'
    """

    core = Tokenizer(tokenizer_models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE, min_frequency=1, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in the corpus or not
    )
    core.train_from_iterator(TOKENIZER_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=["<image>"],
    )


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


def build_model(preset: str = "tiny", seed: int = 0, *, dtype: torch.dtype | None = None,
                lm_layers: int | None = None, vision_layers: int | None = None,
                device: str | torch.device | None = None) -> LlavaBundle:
    """Build a randomly initialised LLaVA from a named preset (see ``PRESETS``), reproducible from ``seed``.

    ``dtype``: the parameters' dtype (default float32); the model is created directly in it, so a bf16 build
    never holds an fp32 copy. ``lm_layers`` / ``vision_layers`` override the preset's depths (same widths): a
    shallower real-width model for per-layer memory measurements (``vision_layers`` >= 2, since LLaVA takes
    features from the second-to-last layer). ``device="meta"`` builds shapes only (no memory, no values).
    """
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
    extra = {k: tuple(spec[k]) for k in ("image_mean", "image_std") if k in spec}
    return LlavaBundle(
        model=model, tokenizer=tokenizer, preset=preset, image_size=spec["image_size"],
        patch_size=spec["patch_size"], has_cls=has_cls, info=dict(spec, preset=preset, seed=seed), **extra,
    )


BUNDLE_FILE = "toolkit_bundle.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# LLaVA-1.5's prompt, used only when a local checkpoint has no chat template of its own.
LLAVA15_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"


def has_lora(model: nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def save_model(bundle: LlavaBundle, path: str | os.PathLike) -> Path:
    """Save model, tokenizer and image geometry so that :func:`load_model` restores them offline.

    A model carrying LoRA layers is refused: its weights are stored under names a plain LLaVA does not have.
    Save a trained model with :func:`toolkit.export.save_trained` (merged, or as a peft adapter).
    """
    if has_lora(bundle.model):
        raise ValueError("this model carries LoRA adapters: save_model would store weights that a plain LLaVA "
                         "cannot load; use toolkit.export.save_trained(bundle, dir) (merged or peft adapter)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    bundle.model.save_pretrained(path)
    bundle.tokenizer.save_pretrained(path)
    meta = dict(
        preset=bundle.preset, image_size=bundle.image_size, patch_size=bundle.patch_size, has_cls=bundle.has_cls,
        image_mean=list(bundle.image_mean), image_std=list(bundle.image_std),
        prompt_template=bundle.prompt_template, info=bundle.info,
        image_processor=bundle.image_processor is not None,
    )
    if bundle.image_processor is not None:
        bundle.image_processor.save_pretrained(path)
    (path / BUNDLE_FILE).write_text(json.dumps(meta, indent=2, default=str))
    return path


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' warnings (its missing/unexpected-weights table among them) while loading: the
    toolkit checks the loading report itself and raises instead."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


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


def load_model(path: str | os.PathLike, dtype: torch.dtype | None = None) -> LlavaBundle:
    """Load a LLaVA-family model from a local directory, never from a hub.

    Accepts a directory written by :func:`save_model` (or a merged :mod:`toolkit.export`) or a Hugging Face
    LLaVA checkpoint (``config.json`` with ``model_type`` ``llava``, weights, tokenizer files, and optionally a
    ``preprocessor_config.json`` and a chat template). A checkpoint is used with its own tokenizer, chat template
    (rendered into the toolkit's ``prompt_template``) and image processor (size, mean/std, crop).

    Raises:
        ModelLoadError: the path does not exist, is not a directory, holds no LLaVA-family model or no weights,
            or its weights do not cover the model exactly (a weight left uninitialised is an error, not a warning).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path {str(path)!r} does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"model path {str(path)!r} is not a directory")
    if not (path / "config.json").is_file():
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
    meta_file = path / BUNDLE_FILE
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        return LlavaBundle(
            model=model, tokenizer=tokenizer, preset=meta["preset"], image_size=meta["image_size"],
            patch_size=meta["patch_size"], has_cls=meta["has_cls"], image_mean=tuple(meta["image_mean"]),
            image_std=tuple(meta["image_std"]), prompt_template=meta["prompt_template"], info=meta["info"],
            image_processor=_image_processor(path) if meta.get("image_processor") else None,
        )
    vision = config.vision_config
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    processor = _image_processor(path)
    if processor is not None:
        mean, std = tuple(getattr(processor, "image_mean", mean)), tuple(getattr(processor, "image_std", std))
    template, source = chat_prompt_template(path, tokenizer)
    return LlavaBundle(
        model=model, tokenizer=tokenizer, preset=f"local:{path.name}", image_size=int(vision.image_size),
        patch_size=int(vision.patch_size), has_cls=getattr(vision, "model_type", "") == "clip_vision_model",
        image_mean=mean, image_std=std, prompt_template=template, image_processor=processor,
        info=dict(path=str(path), prompt_template_source=source),
    )


def _image_processor(path: Path):
    """The checkpoint's image processor (PIL backend: no torchvision needed), or None without a config."""
    if not (path / "preprocessor_config.json").is_file():
        return None
    try:
        with quiet_transformers():
            return AutoImageProcessor.from_pretrained(path, local_files_only=True, backend="pil")
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"{str(path)!r}: preprocessor_config.json could not be read ({err})") from None


def chat_prompt_template(path: Path, tokenizer) -> tuple[str, str]:
    """The checkpoint's chat template rendered for one user turn (image, then the question) and the assistant's
    reply prompt, as the toolkit's ``prompt_template`` (``<image>`` and ``{question}`` fields); and where it came
    from. LLaVA-1.5-hf's ``chat_template.json`` gives ``"USER: <image>\n{question} ASSISTANT:"``."""
    template, source = None, "default (LLaVA-1.5)"
    for name in ("chat_template.json", "chat_template.jinja"):
        file = path / name
        if file.is_file():
            text = file.read_text()
            template = json.loads(text).get("chat_template") if name.endswith(".json") else text
            source = name
            break
    if template is None and getattr(tokenizer, "chat_template", None):
        template, source = tokenizer.chat_template, "tokenizer_config.json"
    if not template:
        return LLAVA15_TEMPLATE, source
    sentinel = "\x00QUESTION\x00"
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sentinel}]}]
    try:
        rendered = tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                                 add_generation_prompt=True)
    except Exception as err:  # a template is arbitrary Jinja: any failure means "cannot use it"
        raise ModelLoadError(f"{str(path)!r}: the chat template ({source}) could not be rendered ({err})") from None
    if tokenizer.bos_token and rendered.startswith(tokenizer.bos_token):
        rendered = rendered[len(tokenizer.bos_token):]  # the collator adds BOS itself
    if rendered.count("<image>") != 1 or rendered.count(sentinel) != 1:
        raise ModelLoadError(f"{str(path)!r}: the chat template ({source}) does not render one '<image>' and the "
                             "question for a single user turn")
    # Braces in the rendered text are literal, except the question field.
    rendered = rendered.replace("{", "{{").replace("}", "}}").replace(sentinel, "{question}")
    return rendered.rstrip(" "), source


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def apply_trainable(bundle: LlavaBundle, mode: str = "lora", lora_rank: int = 8, lora_alpha: int | None = None,
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

CHECKPOINTING_MODES = ("hooks", "ghost", None)  # grad_sample_mode values (None: no per-example gradients)


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
                         "(torch.func cannot run the recomputation); use grad_sample_mode='hooks' or 'ghost'")


def enable_activation_checkpointing(bundle: LlavaBundle) -> None:
    """Recompute each language-model layer's activations during backward instead of keeping them.

    Re-entrant checkpointing (the only kind Opacus' hooks handle, see :func:`check_activation_checkpointing`);
    the input embeddings are made to require grad so the recomputed layers backpropagate into LoRA weights even
    when nothing before the LM trains.
    """
    lm = bundle.model.model.language_model
    lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    lm.enable_input_require_grads()

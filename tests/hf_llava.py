"""A tiny Hugging Face LLaVA saved the way hub checkpoints are (offline, from config, in about a second): a BPE
tokenizer trained on a few words that adds BOS itself (as Llama's does), a CLIP or SigLIP tower, a processor whose
settings differ from the toolkit's defaults, and LLaVA-1.5's chat template. Shared by the processor and the
real-client tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
from tokenizers import models as tokenizer_models
from transformers import (CLIPImageProcessor, CLIPVisionConfig, GenerationConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast, SiglipVisionConfig)
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from toolkit.tokenizer import LLAVA15_CHAT_TEMPLATE

WORDS = ("USER: ASSISTANT: which photo is this ? temple flower left right side of the a picture\n",) * 8
MEAN, STD = (0.40, 0.45, 0.50), (0.20, 0.25, 0.30)   # not CLIP's, not 0.5: ignoring them changes every pixel


def hf_tokenizer() -> PreTrainedTokenizerFast:
    core = Tokenizer(tokenizer_models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    core.train_from_iterator(WORDS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", additional_special_tokens=["<image>"])


def image_processor(kind: str):
    if kind == "siglip":   # plain resize to the square (aspect ratio not kept)
        return SiglipImageProcessorPil(size={"height": 32, "width": 32}, image_mean=list(MEAN), image_std=list(STD))
    # CLIP-style: the short side to 40 px, then a 32x32 centre crop (a wide photo loses its sides)
    return CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32},
                              image_mean=list(MEAN), image_std=list(STD))


def build_hf_llava(folder, kind: str = "clip", layout: str = "processor", seed: int = 0) -> Path:
    """Save a tiny LLaVA into ``folder``: ``kind`` clip (16 patches + [CLS]) or siglip (16 patches); ``layout``
    ``processor`` (transformers 5: processor_config.json + chat_template.jinja) or ``preprocessor`` (older:
    preprocessor_config.json + chat_template.json)."""
    folder = Path(folder)
    tokenizer = hf_tokenizer()
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    vision = CLIPVisionConfig(projection_dim=32, **common) if kind == "clip" else SiglipVisionConfig(**common)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       tie_word_embeddings=False)
    strategy = "default" if kind == "clip" else "full"
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy=strategy, projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(folder)
    processor = LlavaProcessor(image_processor=image_processor(kind), tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy=strategy,
                               num_additional_image_tokens=1 if kind == "clip" else 0,
                               chat_template=LLAVA15_CHAT_TEMPLATE)
    if layout == "processor":
        processor.save_pretrained(folder)
    else:
        tokenizer.save_pretrained(folder)
        processor.image_processor.save_pretrained(folder)
        (folder / "chat_template.json").write_text(json.dumps({"chat_template": LLAVA15_CHAT_TEMPLATE}))
    return folder


def odd_photos(n: int = 6, seed: int = 0) -> list[Image.Image]:
    """Photos of several shapes and colour modes (wide, tall, square; RGB, L, RGBA) with real structure."""
    from toolkit.samples import sample_photos

    rng = np.random.default_rng(seed)
    photos, out = sample_photos(), []
    shapes = [(60, 40), (40, 90), (50, 50), (120, 33), (33, 47), (64, 64)]
    for i in range(n):
        w, h = shapes[i % len(shapes)]
        top, left = int(rng.integers(0, 400 - h)), int(rng.integers(0, 600 - w))
        image = Image.fromarray(photos[i % 2][top:top + h, left:left + w])
        out.append(image.convert(("RGB", "L", "RGBA")[i % 3]))
    return out

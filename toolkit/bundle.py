"""A LLaVA model with everything needed to feed it (:class:`LlavaBundle`), and the error a bad model folder raises.

Example::

    >>> from toolkit.models import build_model
    >>> bundle = build_model("tiny")
    >>> bundle.n_patches, bundle.has_cls, type(bundle.image_processor).__name__
    (64, True, 'LlavaImageProcessorPil')
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from toolkit.data import preprocess_images


class ModelLoadError(ValueError):
    """A model directory is missing, does not hold a LLaVA-family model, or holds one the toolkit cannot honour."""


@dataclass
class LlavaBundle:
    """A LLaVA model with everything needed to feed it: tokenizer, image processor, image geometry, placeholder id.

    ``image_processor`` is a transformers image processor: the checkpoint's own for a local checkpoint, a real
    ``LlavaImageProcessor`` config for an embedded preset (letterbox to a square, then resize). Pixels fed in
    training, evaluation and prediction are exactly its output. ``chat_template`` is the Jinja chat template the
    model's prompts follow (the checkpoint's own, or the preset's), saved with every export.
    """

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
    image_processor: object = None  # None only for a bundle made by hand: square resize + mean/std
    chat_template: str | None = None

    def preprocess(self, images) -> torch.Tensor:
        """Pixel values ``[B, 3, H, W]`` for the vision tower: exactly what the image processor produces (the
        checkpoint's own: e.g. LLaVA-1.5 resizes the short side, centre-crops, CLIP mean/std)."""
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

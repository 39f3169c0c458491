"""Shared fixtures. Models are built from config (no download); each test that mutates a model builds its own."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_bundle():
    from toolkit.models import build_model

    return build_model("tiny", seed=0)


@pytest.fixture
def siglip_bundle():
    from toolkit.models import build_model

    return build_model("tiny-siglip", seed=0)


@pytest.fixture(scope="session")
def tiny_records():
    from toolkit.data import make_vqa

    return make_vqa("parity", "private", image_size=32, limit=16)

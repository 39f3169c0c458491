"""Shared fixtures. Models are built from config (no download); each test that mutates a model builds its own."""
from __future__ import annotations

import pytest


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


@pytest.fixture
def trained_configs(monkeypatch):
    """Every config ``toolkit.train.train`` is called with (sweeps look it up at call time), in order; the real
    training still runs."""
    import toolkit.train as train_module

    calls = []
    real_train = train_module.train

    def counting_train(config, callback=None):
        calls.append(config)
        return real_train(config, callback)

    monkeypatch.setattr(train_module, "train", counting_train)
    return calls

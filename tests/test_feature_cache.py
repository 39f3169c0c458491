"""The visual tokens of a file-backed data set are computed once per (tower, preprocessing, pruner, images) and
read back on the next run."""
import json

import pytest
import torch
from PIL import Image

import toolkit.feature_cache as fc
from toolkit.data import make_vqa
from toolkit.models import build_model
from toolkit.tokens import make_pruner
from toolkit.userdata import load_llava_json


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.setenv("DUALPRIV_CACHE", str(tmp_path / "cache"))
    images = tmp_path / "images"
    images.mkdir()
    records = []
    for i, colour in enumerate(("red", "green", "blue")):
        Image.new("RGB", (40, 30), colour).save(images / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat colour ?"}, {"from": "gpt", "value": colour}]})
    (tmp_path / "data.json").write_text(json.dumps(records))
    return tmp_path


def _load(files):
    return load_llava_json(files / "data.json", files / "images").records


def test_a_second_run_reads_the_features_instead_of_recomputing_them(tiny_bundle, files, monkeypatch):
    bundle = tiny_bundle
    pruner = make_pruner("dual-priv", bundle, keep=16)
    first = fc.cached_features(bundle, pruner, _load(files))
    assert len(list((files / "cache" / "features").glob("*.pt"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("cached features must not be recomputed")

    monkeypatch.setattr(fc, "encode_records", refuse)
    assert torch.equal(fc.cached_features(bundle, pruner, _load(files)), first)


def test_the_key_changes_with_the_pruner_the_image_content_and_the_tower(tiny_bundle, files):
    bundle = tiny_bundle
    pruner = make_pruner("dual-priv", bundle, keep=16)
    records = _load(files)
    key = fc.features_key(bundle, pruner, records)
    assert fc.features_key(bundle, make_pruner("dual-priv", bundle, keep=8), records) != key
    Image.new("RGB", (40, 30), "white").save(files / "images" / "1.png")      # same name, new content
    assert fc.features_key(bundle, pruner, _load(files)) != key
    with torch.no_grad():
        next(bundle.vision_tower.parameters()).add_(1e-3)
    assert fc.features_key(bundle, pruner, records) != key
    assert fc.features_key(build_model("tiny"), pruner, records) == key      # same model, same key


def test_in_memory_records_are_not_cached(tiny_bundle, files):
    bundle = tiny_bundle
    fc.cached_features(bundle, make_pruner("none", bundle), make_vqa("parity", "test", 32, limit=4).records)
    assert not (files / "cache" / "features").exists()

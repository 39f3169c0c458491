"""An export is self-contained for transformers and peft: its processor writes the right number of image tokens, its
adapter names an absolute base and loads with AutoPeftModel, and its remote-code model feeds exactly the pruned
visual tokens the toolkit fed (the fast, in-process half of tests/test_real_client.py)."""
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from fast_run import fast
from hf_llava import odd_photos
from toolkit.export import EXPORT_FILE, load_trained, save_trained
from toolkit.features import make_pruner_for
from toolkit.forward import tower_hidden_states
from toolkit.train import TrainConfig, train

FAST = fast(steps=2, train_limit=16, lr=1e-2)


@pytest.fixture(scope="module")
def dual_priv():
    return train(TrainConfig(method="dual-priv", **FAST))


def test_the_export_processor_writes_one_placeholder_per_visual_token_fed(dual_priv, tmp_path):
    out = save_trained(dual_priv, tmp_path / "m", "merged")
    meta = json.loads((out / EXPORT_FILE).read_text())
    prompt = "<s>user : <image> what digit is this ? assistant :"
    pruned = AutoProcessor.from_pretrained(out, trust_remote_code=True)(images=odd_photos(1), text=prompt)
    stock = AutoProcessor.from_pretrained(out)(images=odd_photos(1), text=prompt)
    image_id = dual_priv.bundle.image_token_id
    assert pruned["input_ids"][0].count(image_id) == meta["image_tokens"] == 16
    assert stock["input_ids"][0].count(image_id) == 64   # without remote code: a plain LLaVA's processor


def test_the_adapter_names_an_absolute_base_and_loads_with_auto_peft(dual_priv, tmp_path, monkeypatch):
    from peft import AutoPeftModel

    out = save_trained(dual_priv, tmp_path / "a", "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]).is_absolute()
    assert Path(config["base_model_name_or_path"]) == (out / "base_model").resolve()
    monkeypatch.chdir(tmp_path.parent)                     # never resolved against the working directory
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoPeftModel.from_pretrained(out)
    assert type(model.get_base_model()).__name__ == "LlavaForConditionalGeneration"


def test_a_user_named_base_is_what_the_adapter_config_names(dual_priv, tmp_path):
    out = save_trained(dual_priv, tmp_path / "a", "adapter", base_model="llava-hf/llava-1.5-7b-hf")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "llava-hf/llava-1.5-7b-hf"
    assert load_trained(out).metadata["base_model"]["kind"] == "copy"   # the toolkit still loads its own copy


@pytest.mark.parametrize("preset,strategy", [("tiny", "dual-priv"), ("tiny-siglip", "mean-attention")])
def test_the_remote_code_model_feeds_exactly_the_toolkits_pruned_tokens(tmp_path, preset, strategy):
    result = train(TrainConfig(method="dual-priv", preset=preset, token_strategy=strategy, **FAST))
    out = save_trained(result, tmp_path / "m", "merged")
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True).eval()
    assert type(model).__name__ == "DualPrivLlavaForConditionalGeneration"
    bundle = result.bundle
    pixels = bundle.preprocess(odd_photos(4))
    pruner = make_pruner_for(bundle, result.config)
    with torch.no_grad():
        ours = bundle.model.model.multi_modal_projector(pruner(tower_hidden_states(bundle, pixels)).features)
        theirs = torch.stack(model.model.get_image_features(pixel_values=pixels).pooler_output)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)


def test_a_model_fed_all_tokens_exports_for_stock_transformers(tmp_path):
    result = train(TrainConfig(method="dp-sgd", **FAST))
    out = save_trained(result, tmp_path / "m", "merged")
    meta = json.loads((out / EXPORT_FILE).read_text())
    assert meta["inference"] == "stock" and not (out / "modeling_dualpriv_llava.py").exists()
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    card = (out / "README.md").read_text()
    assert "letterboxed" in card and "LlavaForConditionalGeneration.from_pretrained(out)" in card

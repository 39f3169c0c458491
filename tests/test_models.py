"""Model presets, local save/load round trip, trainable-parameter choices."""
import json

import pytest
import torch

from toolkit.data import Collator, make_vqa, preprocess_images
from toolkit.forward import LlavaLM, per_example_loss, select_features, tower_hidden_states
from toolkit.models import PRESETS, ModelLoadError, apply_trainable, build_model, count_trainable, load_model, save_model


def _batch(bundle, n=2):
    records = make_vqa("digit", "test", bundle.image_size, limit=n).records
    pixels = preprocess_images([r.image for r in records], bundle.image_size, bundle.image_mean, bundle.image_std)
    return records, pixels


# shape-only presets (llava-7b-shape: 7e9 parameters) are checked on the meta device in tests/test_scale.py
@pytest.mark.parametrize("preset", sorted(p for p in PRESETS if not PRESETS[p].get("shape_only")))
def test_every_preset_builds_runs_forward_and_backward(preset):
    bundle = build_model(preset)
    apply_trainable(bundle, "lora")
    records, pixels = _batch(bundle)
    feats = select_features(bundle, tower_hidden_states(bundle, pixels))
    assert feats.shape[1] == bundle.n_patches
    collator = Collator(bundle.tokenizer, feats.shape[1], bundle.image_token_id, bundle.prompt_template)
    batch = collator(records)
    lm = LlavaLM(bundle).bind_collator(collator)
    loss = per_example_loss(lm(feats, batch["input_ids"], batch["attention_mask"]), batch["labels"]).mean()
    loss.backward()
    grads = [p.grad for p in bundle.model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_llava576_preset_has_llava15_token_count_and_siglip_has_no_cls():
    assert build_model("llava576").n_patches == 576
    assert build_model("tiny").has_cls and not build_model("tiny-siglip").has_cls


@pytest.mark.parametrize("preset", ["tiny", "tiny-siglip"])
def test_toolkit_forward_equals_hf_forward_when_nothing_is_pruned(preset):
    bundle = build_model(preset)
    records, pixels = _batch(bundle, 3)
    feats = select_features(bundle, tower_hidden_states(bundle, pixels))
    collator = Collator(bundle.tokenizer, feats.shape[1], bundle.image_token_id, bundle.prompt_template)
    batch = collator(records)
    ours = LlavaLM(bundle).bind_collator(collator)(feats, batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        theirs = bundle.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              pixel_values=pixels).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_saved_model_loads_back_offline_with_identical_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bundle = build_model("tiny", seed=3)
    save_model(bundle, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert (loaded.image_size, loaded.patch_size, loaded.has_cls) == (32, 4, True)
    for (name, a), (_, b) in zip(bundle.model.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.tokenizer("what digit ?")["input_ids"] == bundle.tokenizer("what digit ?")["input_ids"]


def test_hf_style_checkpoint_without_toolkit_metadata_loads(tmp_path):
    bundle = build_model("tiny")
    path = save_model(bundle, tmp_path / "hf")
    (path / "toolkit_bundle.json").unlink()
    (path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    loaded = load_model(path)
    assert loaded.n_patches == 64 and loaded.has_cls and loaded.image_mean == (0.5, 0.5, 0.5)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)


def test_non_llava_model_is_refused_by_name(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="not a LLaVA-family"):
        load_model(tmp_path)


def test_file_instead_of_directory_is_refused(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a directory"):
        load_model(f)


@pytest.mark.parametrize("mode", ["lora", "lora+head", "projector", "lm-full"])
def test_trainable_modes_never_train_the_vision_tower(mode):
    bundle = build_model("tiny")
    n = apply_trainable(bundle, mode)
    assert n == count_trainable(bundle.model) > 0
    assert not any(p.requires_grad for p in bundle.vision_tower.parameters())
    assert all(p.requires_grad for p in bundle.model.model.multi_modal_projector.parameters())
    lm_names = [n for n, p in bundle.model.model.language_model.named_parameters() if p.requires_grad]
    if mode.startswith("lora"):
        assert lm_names and all("lora_" in n for n in lm_names)
    elif mode == "projector":
        assert not lm_names
    assert any(p.requires_grad for p in bundle.model.lm_head.parameters()) == (mode in ("lora+head", "lm-full"))


def test_lora_is_smaller_than_full_language_model():
    assert apply_trainable(build_model("tiny"), "lora") < apply_trainable(build_model("tiny"), "lm-full")


def test_unknown_preset_and_mode_are_clear_errors():
    with pytest.raises(ValueError, match="unknown preset"):
        build_model("huge")
    with pytest.raises(ValueError, match="unknown trainable mode"):
        apply_trainable(build_model("tiny"), "everything")
    with pytest.raises(ValueError, match="lora_rank"):
        apply_trainable(build_model("tiny"), "lora", lora_rank=0)

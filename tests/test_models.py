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


def test_hf_style_checkpoint_without_toolkit_metadata_loads(tiny_bundle, tmp_path):
    bundle = tiny_bundle
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
def test_trainable_modes_never_train_the_vision_tower(tiny_bundle, mode):
    bundle = tiny_bundle
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


# ------------------------------------------------------------------ a local checkpoint's own template and processor

LLAVA15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@pytest.fixture
def hf_checkpoint(tiny_bundle, tmp_path):
    """A tiny LLaVA saved the way llava-1.5-7b-hf is: weights, tokenizer, chat_template.json, a CLIP image
    processor (resize the short side, centre crop) and no toolkit metadata."""
    from transformers import CLIPImageProcessor

    bundle = tiny_bundle
    path = tmp_path / "llava-hf"
    bundle.model.save_pretrained(path)
    bundle.tokenizer.save_pretrained(path)
    (path / "chat_template.json").write_text(json.dumps({"chat_template": LLAVA15_CHAT_TEMPLATE}))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def test_a_local_checkpoint_uses_its_own_chat_template_and_image_processor(hf_checkpoint):
    from PIL import Image

    bundle = load_model(hf_checkpoint)
    assert bundle.prompt_template == "USER: <image>\n{question} ASSISTANT:"
    assert bundle.info["prompt_template_source"] == "chat_template.json"
    assert bundle.image_mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    wide = Image.new("RGB", (96, 32), "white")
    wide.paste(Image.new("RGB", (32, 32), "black"), (0, 0))      # black only in the left third
    pixels = bundle.preprocess([wide])
    # resize the short side + centre crop keeps the white middle; a square resize would squash the black in
    assert pixels.shape == (1, 3, 32, 32) and pixels.min() > 1.0
    assert preprocess_images([wide], 32).min() < 0


def test_a_run_without_progress_prints_no_transformers_bars_and_leaves_them_as_they_were(hf_checkpoint, tmp_path,
                                                                                        capfd):
    """``progress=False`` hides transformers' own "Loading weights" and "Writing model shards" bars too (they went
    to a user's log), and restores them after; with ``progress=True`` they are shown, so the check can fail."""
    from transformers.utils import logging as hf_logging

    from toolkit.data import make_vqa
    from toolkit.predict import predict
    from toolkit.train import TrainConfig, train

    config = dict(method="dual-priv", model_dir=str(hf_checkpoint), steps=1, train_limit=8, eval_limit=4,
                  expected_batch_size=4, export_format="merged")
    capfd.readouterr()
    train(TrainConfig(progress=True, output_dir=str(tmp_path / "shown"), **config))
    shown = capfd.readouterr().err
    assert "Loading weights" in shown and "Writing model shards" in shown
    result = train(TrainConfig(progress=False, output_dir=str(tmp_path / "hidden"), **config))
    result.save(tmp_path / "saved-again")                  # an export after the run keeps the run's setting
    predict(tmp_path / "hidden", make_vqa("parity", "test", 32, limit=2), progress=False)
    hidden = capfd.readouterr().err
    assert "Loading weights" not in hidden and "Writing model shards" not in hidden, hidden
    assert hf_logging.is_progress_bar_enabled()


def test_overlapping_runs_without_progress_restore_the_bars_when_the_last_one_ends():
    """The switch is process-wide and the dashboard runs jobs in threads: the first run to leave must not turn
    the bars back on under a second one still running, and the Hub's own setting comes back as it was."""
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    from toolkit.quiet import transformers_progress_bars

    first, second = transformers_progress_bars(False), transformers_progress_bars(False)
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert not hf_logging.is_progress_bar_enabled()          # the second run is still inside
    second.__exit__(None, None, None)
    assert hf_logging.is_progress_bar_enabled() and not hub_utils.are_progress_bars_disabled()
    hub_utils.disable_progress_bars()                        # a user's own choice for the Hub's bars
    try:
        with transformers_progress_bars(False):
            pass
        assert hub_utils.are_progress_bars_disabled() and hf_logging.is_progress_bar_enabled()
    finally:
        hub_utils.enable_progress_bars()


def test_a_model_trained_from_a_local_checkpoint_exports_with_its_template_and_processor(hf_checkpoint, tmp_path):
    from toolkit.export import load_trained
    from toolkit.train import TrainConfig, train

    result = train(TrainConfig(method="dual-priv", model_dir=str(hf_checkpoint), steps=1, train_limit=8, eval_limit=4,
                               expected_batch_size=4, progress=False, output_dir=str(tmp_path / "out"),
                               export_format="merged"))
    assert result.bundle.prompt_template.startswith("USER:")
    loaded = load_trained(tmp_path / "out").bundle
    assert loaded.prompt_template == "USER: <image>\n{question} ASSISTANT:"
    assert loaded.image_processor is not None and (tmp_path / "out" / "processor_config.json").is_file()
    adapter = load_trained(result.save(tmp_path / "adapter", "adapter"))
    assert adapter.metadata["base_model"]["kind"] == "reference"
    assert adapter.metadata["base_model"]["path"] == str(hf_checkpoint.resolve())
    assert not (tmp_path / "adapter" / "base_model").exists()          # a local base is referenced, not copied
    for (name, a), (_, b) in zip(adapter.bundle.model.state_dict().items(), result.bundle.model.state_dict().items()):
        assert torch.equal(a, b), name

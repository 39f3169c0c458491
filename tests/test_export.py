"""Model out: a trained run exports as a peft adapter or a merged LLaVA, loads back with identical outputs, never
leaves a trained weight uninitialised, never writes the run's secret state, and never half-writes a folder."""
import json

import pytest
import torch

from fast_run import fast
from toolkit.data import make_vqa
from toolkit.export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, EXPORT_FILE, load_trained, save_trained
from toolkit.models import ModelLoadError, build_model, load_model, save_model
from toolkit.train import TrainConfig, train

FAST = fast(method="dual-priv", epsilon=3.0, steps=2, train_limit=16)


@pytest.fixture(scope="module")
def trained():
    """A LoRA + head + projector run whose weights moved away from the base (non-zero LoRA B, trained head)."""
    return train(TrainConfig(**dict(FAST, method="non-private", lr=1e-2, steps=3)))


def _logits(model, bundle):
    records = make_vqa("parity", "test", bundle.image_size, limit=3).records
    from toolkit.data import Collator

    collator = Collator(bundle.tokenizer, bundle.n_patches, bundle.image_token_id, bundle.prompt_template)
    batch = collator(records)
    pixels = bundle.preprocess([r.image for r in records])
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=pixels).logits


def test_adapter_export_loads_back_with_the_same_outputs(trained, tmp_path):
    path = trained.save(tmp_path / "adapter", "adapter")
    loaded = load_trained(path)
    assert loaded.metadata["export_format"] == "adapter"
    torch.testing.assert_close(_logits(loaded.bundle.model, loaded.bundle), _logits(trained.bundle.model, trained.bundle),
                               rtol=0, atol=1e-5)


def test_adapter_export_is_peft_format_and_loads_with_peft_onto_the_base(trained, tmp_path):
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    path = trained.save(tmp_path / "adapter", "adapter")
    assert (path / ADAPTER_CONFIG).is_file() and (path / ADAPTER_WEIGHTS).is_file()
    base = LlavaForConditionalGeneration.from_pretrained(path / "base_model")
    model = PeftModel.from_pretrained(base, path).eval()
    torch.testing.assert_close(_logits(model, trained.bundle), _logits(trained.bundle.model, trained.bundle),
                               rtol=0, atol=1e-5)


def test_merged_export_loads_with_plain_transformers_and_the_toolkit(trained, tmp_path):
    from transformers import LlavaForConditionalGeneration

    path = trained.save(tmp_path / "merged", "merged")
    assert not (path / ADAPTER_WEIGHTS).exists()
    plain = LlavaForConditionalGeneration.from_pretrained(path).eval()
    expected = _logits(trained.bundle.model, trained.bundle)
    torch.testing.assert_close(_logits(plain, trained.bundle), expected, rtol=0, atol=1e-5)
    loaded = load_trained(path)
    torch.testing.assert_close(_logits(loaded.bundle.model, loaded.bundle), expected, rtol=0, atol=1e-5)


def test_auto_export_is_an_adapter_after_lora_and_merged_otherwise(tmp_path):
    result = train(TrainConfig(**dict(FAST, trainable="projector", output_dir=str(tmp_path / "p"))))
    assert load_trained(tmp_path / "p").metadata["export_format"] == "merged"
    with pytest.raises(ValueError, match="needs LoRA"):
        save_trained(result, tmp_path / "q", "adapter")


def test_a_missing_trained_weight_is_an_error_not_a_silent_reinitialisation(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    path = trained.save(tmp_path / "adapter", "adapter")
    state = load_file(path / ADAPTER_WEIGHTS)
    dropped = next(k for k in state if "lora_B" in k)
    del state[dropped]
    save_file(state, path / ADAPTER_WEIGHTS)
    with pytest.raises(ModelLoadError, match="missing from adapter_model.safetensors"):
        load_trained(path)


def test_a_merged_model_with_a_missing_weight_is_refused(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    path = trained.save(tmp_path / "merged", "merged")
    state = load_file(path / "model.safetensors")
    del state[next(k for k in state if "lm_head" in k)]
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="lacks 1 weight"):
        load_trained(path)


def test_save_model_refuses_lora_weights_that_load_model_could_not_restore(trained, tmp_path):
    with pytest.raises(ValueError, match="carries LoRA adapters"):
        save_model(trained.bundle, tmp_path / "raw")
    # and a folder saved the old way (LoRA names) is refused on load instead of being silently re-initialised
    trained.bundle.model.save_pretrained(tmp_path / "raw")
    with pytest.raises(ModelLoadError, match="LoRA weights saved unmerged"):
        load_model(tmp_path / "raw")


def test_a_model_folder_with_a_config_but_no_weights_is_a_clear_error(tmp_path):
    build_model("tiny").model.config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="has a LLaVA config.json but no weights"):
        load_model(tmp_path)


def test_the_secret_state_of_the_run_never_goes_into_the_export(tmp_path):
    result = train(TrainConfig(**dict(FAST, noise_seed=987654321, checkpoint_path=str(tmp_path / "ckpt.pt"))))
    path = result.save(tmp_path / "out")
    names = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    allowed = {EXPORT_FILE, "README.md", ADAPTER_CONFIG, ADAPTER_WEIGHTS, "tokenizer.json", "tokenizer_config.json",
               "base_model/config.json", "base_model/generation_config.json", "base_model/model.safetensors",
               "base_model/tokenizer.json", "base_model/tokenizer_config.json", "base_model/toolkit_bundle.json",
               "processor_config.json", "chat_template.jinja", "base_model/processor_config.json",
               "base_model/chat_template.jinja", "modeling_dualpriv_llava.py", "base_model/modeling_dualpriv_llava.py"}
    assert names <= allowed, names - allowed
    for file in path.rglob("*.json"):
        assert "987654321" not in file.read_text(), file        # the noise seed would re-create the noise
    meta = json.loads((path / EXPORT_FILE).read_text())
    assert meta["config"]["noise_seed"] is None and meta["privacy"]["noise_seed_given"] is True
    assert not any(word in json.dumps(meta) for word in ("generator", "sampler_state", "rng_state"))
    assert "NO privacy guarantee" in (path / "README.md").read_text()


def test_the_model_card_states_the_guarantee_and_what_it_does_not_cover(trained, tmp_path):
    result = train(TrainConfig(**dict(FAST, max_grad_norm=0.7, accountant="rdp")))
    card = (result.save(tmp_path / "card") / "README.md").read_text()
    s = result.summary()
    for text in (f"{s['epsilon_spent']:.4g}", "δ = 1e-05", "one record = one source image", f"q = {s['sample_rate']:.4g}",
                 f"{s['noise_multiplier']:.4g}", "| steps | 2 |", "| accountant | rdp |", "clipping norm C | 0.7",
                 "Dual-Priv", "16 of 64", "0.2 of the noisy gradient", "Outside the guarantee",
                 "hyper-parameters chosen on the private data"):
        assert text in card, text
    assert "None.** This model was trained without" in (trained.save(tmp_path / "np") / "README.md").read_text()


def test_a_failed_export_leaves_nothing_half_written(trained, tmp_path, monkeypatch):
    import toolkit.export as export

    def fail(meta):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "model_card", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        trained.save(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_non_empty_folder(trained, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists and is not empty"):
        trained.save(tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_an_export_from_a_newer_version_names_the_config_fields_it_does_not_know(trained, tmp_path):
    path = trained.save(tmp_path / "newer", "adapter")
    meta = json.loads((path / EXPORT_FILE).read_text())
    meta["config"]["a_future_knob"] = 7
    (path / EXPORT_FILE).write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="a_future_knob"):
        config = load_trained(path).config
    assert config.method == "non-private" and config.lr == 1e-2

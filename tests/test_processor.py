"""Images in: the pixels the toolkit feeds are exactly the checkpoint's own processor's (CLIP- and SigLIP-style,
both config layouts), processors it cannot honour are refused by name, and the embedded presets carry a real
processor and chat template that reproduce the collator's tokens."""
import json

import pytest
import torch
from transformers import AutoProcessor

from hf_llava import build_hf_llava, odd_photos
from toolkit.data import Collator, preprocess_images
from toolkit.model_io import CLIP_MEAN, CLIP_STD
from toolkit.models import ModelLoadError, load_model, save_model
from toolkit.processor import check_supported, describe_preprocessing


@pytest.mark.parametrize("kind,layout", [("clip", "processor"), ("siglip", "processor"), ("clip", "preprocessor")])
def test_the_toolkit_feeds_exactly_the_checkpoints_own_processor_pixels(tmp_path, kind, layout):
    path = build_hf_llava(tmp_path / kind, kind, layout)
    photos = odd_photos(6)
    processor = AutoProcessor.from_pretrained(path)
    # the older layout has no patch size for the LLaVA processor: its image processor is what reads images
    processor = processor if layout == "processor" else processor.image_processor
    theirs = processor(images=photos, return_tensors="pt")["pixel_values"]
    ours = load_model(path).preprocess(photos)
    assert ours.shape == theirs.shape == (6, 3, 32, 32)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    # the test has teeth: the toolkit's old fallback (a square resize with CLIP's mean/std) is far off
    assert (preprocess_images(photos, 32, CLIP_MEAN, CLIP_STD) - theirs).abs().max() > 0.5


def test_an_any_res_processor_is_refused_by_name(tmp_path):
    path = build_hf_llava(tmp_path / "anyres", "clip", "preprocessor")
    config = json.loads((path / "preprocessor_config.json").read_text())
    config.update(image_processor_type="LlavaNextImageProcessor", image_grid_pinpoints=[[32, 64], [64, 32]])
    (path / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="LlavaNextImageProcessor.*any-res"):
        load_model(path)


def test_an_any_res_or_video_processor_object_is_refused_by_name():
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    with pytest.raises(ModelLoadError, match="LlavaNextImageProcessorPil.*any-res"):
        check_supported(LlavaNextImageProcessorPil(), "x")


def test_a_folder_with_only_a_video_processor_is_refused(tmp_path):
    path = build_hf_llava(tmp_path / "video", "clip", "preprocessor")
    (path / "preprocessor_config.json").rename(path / "video_preprocessor_config.json")
    with pytest.raises(ModelLoadError, match="video processor"):
        load_model(path)


def test_a_processor_whose_output_is_not_the_towers_input_is_refused(tmp_path):
    path = build_hf_llava(tmp_path / "wrong", "clip", "preprocessor")
    config = json.loads((path / "preprocessor_config.json").read_text())
    config["crop_size"] = {"height": 24, "width": 32}
    (path / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"shape \[3, 24, 32\].*\[3, 32, 32\]"):
        load_model(path)


def test_a_preset_saves_a_real_processor_that_letterboxes_and_reproduces_the_collators_tokens(tiny_bundle, tmp_path):
    bundle = tiny_bundle
    path = save_model(bundle, tmp_path / "tiny")
    processor = AutoProcessor.from_pretrained(path)
    photos = odd_photos(6)
    torch.testing.assert_close(bundle.preprocess(photos), processor(images=photos, return_tensors="pt")["pixel_values"],
                               rtol=0, atol=0)
    assert "letterboxed" in describe_preprocessing(bundle.image_processor)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "which photo is this ?"}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    ids = processor(images=photos[:1], text=prompt, return_tensors="pt")["input_ids"][0].tolist()
    collator = Collator(bundle.tokenizer, bundle.n_patches, bundle.image_token_id, bundle.prompt_template)
    assert ids == collator.prompt_ids("which photo is this ?")
    assert ids.count(bundle.image_token_id) == 64


def test_a_preset_on_its_own_square_canvas_gets_the_pixels_it_always_got(tiny_bundle):
    from toolkit.data import make_vqa

    bundle = tiny_bundle
    images = [r.image for r in make_vqa("parity", "test", 32, limit=8).records]
    torch.testing.assert_close(bundle.preprocess(images), preprocess_images(images, 32, bundle.image_mean,
                                                                            bundle.image_std), rtol=0, atol=1e-6)


def test_a_multi_turn_conversation_renders_as_the_collator_lays_it_out(tiny_bundle, tmp_path):
    bundle = tiny_bundle
    processor = AutoProcessor.from_pretrained(save_model(bundle, tmp_path / "tiny"))
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what digit is this ?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "7"}]},
        {"role": "user", "content": [{"type": "text", "text": "is the digit even or odd ?"}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    ids = processor(images=odd_photos(1), text=prompt, return_tensors="pt")["input_ids"][0].tolist()
    collator = Collator(bundle.tokenizer, bundle.n_patches, bundle.image_token_id, bundle.prompt_template)
    assert ids == collator.prompt_ids("is the digit even or odd ?", (("what digit is this ?", "7"),))

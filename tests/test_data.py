"""Embedded data, the LLaVA-JSON loader's validation, and the collator."""
import json

import pytest
import torch
from PIL import Image

from toolkit.data import (SPLITS, TASKS, Collator, DataValidationError, make_vqa,
                          preprocess_images)
from toolkit.forward import LlavaLM
from toolkit.userdata import load_llava_json


def test_splits_never_share_a_source_image():
    seen = {}
    for split in SPLITS:
        for task in ("digit", "sum"):
            for record in make_vqa(task, split, 32):
                for source in record.source_ids:
                    assert seen.setdefault(source, split) == split


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_record_uses_each_source_image_once(task):
    ds = make_vqa(task, "private", 32)
    sources = [s for r in ds for s in r.source_ids]
    assert len(sources) == len(set(sources))
    assert all(r.answer in ds.candidates for r in ds)


def test_digit_sits_on_a_mostly_background_canvas():
    import numpy as np

    image = np.asarray(make_vqa("digit", "test", 32)[0].image)
    background = (image.reshape(8, 4, 8, 4, 3).max(axis=(1, 3, 4)) == 0).mean()
    assert background >= 0.6  # token pruning has real work


def test_bad_task_split_and_size_are_clear_errors():
    with pytest.raises(ValueError, match="unknown task"):
        make_vqa("colour")
    with pytest.raises(ValueError, match="unknown split"):
        make_vqa("digit", "train")
    with pytest.raises(ValueError, match="multiple of 16"):
        make_vqa("digit", "test", image_size=30)


# ------------------------------------------------------------------ LLaVA JSON loader

def _record(rid="a", image="a.png", question="<image>\nwhat digit is this ?", answer="7"):
    return {"id": rid, "image": image,
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


@pytest.fixture
def folder(tmp_path):
    Image.new("RGB", (32, 32), "white").save(tmp_path / "a.png")
    Image.new("RGB", (32, 32), "black").save(tmp_path / "b.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    return tmp_path


def _write(folder, records, name="data.json"):
    path = folder / name
    if name.endswith(".jsonl"):
        path.write_text("\n".join(json.dumps(r) for r in records))
    else:
        path.write_text(json.dumps(records))
    return path


def test_valid_json_and_jsonl_files_load(folder):
    records = [_record(), _record("b", "b.png", answer="3")]
    for name in ("data.json", "data.jsonl"):
        ds = load_llava_json(_write(folder, records, name))
        assert [r.id for r in ds] == ["a", "b"] and ds[0].question == "what digit is this ?"
        assert ds.candidates == ("3", "7")


@pytest.mark.parametrize("record, message", [
    (_record(image="missing.png"), "not found"),
    (_record(image="broken.png"), "unreadable"),
    (_record(question="what digit is this ?"), "exactly one '<image>'"),
    (_record(answer="   "), "answer is empty"),
    (_record(question="<image>"), "question is empty"),
    ({"id": "a", "image": 5, "conversations": []}, "'image' is missing or not a string"),
    ({"id": None, "image": "a.png"}, "'id' is missing"),
    ({"id": "a", "image": "a.png", "conversations": "hi"}, "'conversations' must be a list"),
    ({"id": "a", "image": "a.png", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},
     "'human' then 'gpt'"),
    ({"id": "a", "image": "a.png", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "y"}]},
     "string 'from' and 'value'"),
    ("just a string", "must be an object"),
])
def test_every_bad_record_is_named_with_its_problem(folder, record, message):
    path = _write(folder, [_record("ok", "b.png"), record])
    with pytest.raises(DataValidationError, match=message) as err:
        load_llava_json(path)
    assert "#1" in str(err.value)  # the record is named (by id and position)


def test_duplicate_ids_are_refused(folder):
    with pytest.raises(DataValidationError, match="duplicate id"):
        load_llava_json(_write(folder, [_record(), _record()]))


def test_file_level_problems_are_clear(folder):
    with pytest.raises(DataValidationError, match="does not exist"):
        load_llava_json(folder / "nope.json")
    (folder / "bad.json").write_text("{not json")
    with pytest.raises(DataValidationError, match="not valid JSON"):
        load_llava_json(folder / "bad.json")
    (folder / "obj.json").write_text("{}")
    with pytest.raises(DataValidationError, match="list of records"):
        load_llava_json(folder / "obj.json")
    with pytest.raises(DataValidationError, match="holds no records"):
        load_llava_json(_write(folder, []))
    with pytest.raises(DataValidationError, match="image folder"):
        load_llava_json(_write(folder, [_record()]), image_folder=folder / "nowhere")


# ------------------------------------------------------------------ collator

@pytest.mark.parametrize("n_visual", [1, 16, 64])
def test_placeholders_always_equal_the_visual_tokens_fed(tiny_bundle, n_visual):
    bundle = tiny_bundle
    records = make_vqa("sum", "test", 32, limit=3).records
    collator = Collator(bundle.tokenizer, n_visual, bundle.image_token_id, bundle.prompt_template)
    batch = collator(records)
    assert ((batch["input_ids"] == bundle.image_token_id).sum(dim=1) == n_visual).all()
    lm = LlavaLM(bundle).bind_collator(collator)
    lm.check_placeholders(torch.zeros(3, n_visual, 64), batch["input_ids"])
    with pytest.raises(ValueError, match="do not match"):
        lm.check_placeholders(torch.zeros(3, n_visual + 1, 64), batch["input_ids"])


def test_loss_is_on_the_answer_only(tiny_bundle):
    bundle = tiny_bundle
    records = make_vqa("parity", "test", 32, limit=2).records
    batch = Collator(bundle.tokenizer, 4, bundle.image_token_id, bundle.prompt_template)(records)
    labelled = batch["labels"] != -100
    for i, record in enumerate(records):
        ids = batch["input_ids"][i][labelled[i]].tolist()
        assert bundle.tokenizer.decode(ids[:-1]).strip() == record.answer and ids[-1] == bundle.tokenizer.eos_token_id
        assert labelled[i].nonzero().min() == batch["prompt_lengths"][i]


def test_preprocess_rejects_non_images_and_resizes():
    with pytest.raises(TypeError, match="PIL image"):
        preprocess_images(["not an image"], 32)
    x = preprocess_images([Image.new("RGB", (50, 20))], 32)
    assert x.shape == (1, 3, 32, 32)

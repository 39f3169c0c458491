"""A user's LLaVA-JSON data set: paths stay in the image folder, the privacy unit holds, multi-turn records train
on every assistant turn, images stay on disk until their visual tokens are computed."""
import json

import pytest
from PIL import Image

from toolkit.data import Collator, DataValidationError
from toolkit.features import encode_records
from toolkit.tokens import make_pruner
from toolkit.userdata import IMAGE_UNIT, USER_UNIT, load_llava_json


def _record(rid, image, answer="red", question="<image>\nwhat colour ?", **extra):
    return dict({"id": rid, "image": image, "conversations": [
        {"from": "human", "value": question}, {"from": "gpt", "value": answer}]}, **extra)


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 30), "red").save(images / "a.png")
    Image.new("RGB", (40, 30), "blue").save(images / "b.png")
    Image.new("RGB", (40, 30), "red").save(images / "a-copy.png")   # same pixels, same bytes as a.png
    (tmp_path / "outside.png").write_bytes((images / "a.png").read_bytes())
    return images


def _write(folder, records, name="data.json"):
    path = folder.parent / name
    path.write_text(json.dumps(records))
    return path


def test_records_hold_paths_and_hashes_and_images_are_read_only_when_encoded(tiny_bundle, folder, monkeypatch):
    ds = load_llava_json(_write(folder, [_record("a", "a.png"), _record("b", "b.png", "blue")]), folder)
    assert all(r.image is None and r.image_path and len(r.image_sha256) == 64 for r in ds)
    assert ds.privacy_unit == IMAGE_UNIT
    opened = []
    original = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a[0]) or original(*a, **k))
    bundle = tiny_bundle
    features = encode_records(bundle, make_pruner("none", bundle), ds.records)
    assert features.shape == (2, 64, 64) and len(opened) == 2


@pytest.mark.parametrize("image", ["../outside.png", "../nothing-here.png", "/etc/passwd", "/etc/no-such-file"])
def test_paths_outside_the_image_folder_are_refused_without_revealing_whether_they_exist(folder, image):
    with pytest.raises(DataValidationError) as err:
        load_llava_json(_write(folder, [_record("a", image)]), folder)
    message = str(err.value)
    assert "must be relative to" in message and "stay inside it" in message
    assert "not found" not in message and "unreadable" not in message


def test_a_symlink_out_of_the_folder_is_refused(folder):
    (folder / "link.png").symlink_to(folder.parent / "outside.png")
    with pytest.raises(DataValidationError, match="stay inside it"):
        load_llava_json(_write(folder, [_record("a", "link.png")]), folder)


def test_the_same_image_file_under_two_ids_is_refused_naming_both(folder):
    with pytest.raises(DataValidationError, match="records 'first' and 'second' share the image file"):
        load_llava_json(_write(folder, [_record("first", "a.png"), _record("second", "a.png")]), folder)


def test_the_same_image_content_under_two_ids_is_refused_naming_both(folder):
    with pytest.raises(DataValidationError, match="records 'x' and 'y' have images with the same content"):
        load_llava_json(_write(folder, [_record("x", "a.png"), _record("y", "a-copy.png")]), folder)


def test_an_evaluation_set_may_ask_several_questions_about_one_image(folder):
    records = [_record("q1", "a.png"), _record("q2", "a.png", "round", "<image>\nwhat shape ?")]
    assert len(load_llava_json(_write(folder, records), folder, privacy_unit=False)) == 2


def test_user_ids_make_the_unit_a_user_and_a_repeated_user_is_refused(folder):
    ds = load_llava_json(_write(folder, [_record("a", "a.png", user_id="u1"), _record("b", "b.png", user_id=2)]), folder)
    assert ds.privacy_unit == USER_UNIT and [r.user_id for r in ds] == ["u1", "2"]
    with pytest.raises(DataValidationError, match="records 'a' and 'b' have the same user_id 'u1'"):
        load_llava_json(_write(folder, [_record("a", "a.png", user_id="u1"), _record("b", "b.png", user_id="u1")]),
                        folder)
    with pytest.raises(DataValidationError, match="has no 'user_id' while other records have one"):
        load_llava_json(_write(folder, [_record("a", "a.png", user_id="u1"), _record("b", "b.png")]), folder)


def test_multi_turn_records_train_on_every_assistant_turn(tiny_bundle, folder):
    turns = [{"from": "human", "value": "<image>\nwhat colour ?"}, {"from": "gpt", "value": "red"},
             {"from": "human", "value": "and the shape ?"}, {"from": "gpt", "value": "a square box"}]
    ds = load_llava_json(_write(folder, [{"id": "m", "image": "a.png", "conversations": turns}]), folder)
    record = ds[0]
    assert record.history == (("what colour ?", "red"),) and (record.question, record.answer) == ("and the shape ?", "a square box")
    bundle = tiny_bundle
    tok = bundle.tokenizer
    batch = Collator(tok, 4, bundle.image_token_id, bundle.prompt_template)([record])
    labels = batch["labels"][0]
    labelled = tok.decode(batch["input_ids"][0][labels != -100], skip_special_tokens=True)
    assert labelled.split() == ["red", "a", "square", "box"]     # both answers, nothing of the prompts
    prompt = tok.decode(batch["input_ids"][0][: batch["prompt_lengths"][0]], skip_special_tokens=True)
    assert "what colour ?" in prompt and "red" in prompt and prompt.rstrip().endswith("assistant :")


@pytest.mark.parametrize("turns, message", [
    ([{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}, {"from": "human", "value": "q2"}],
     "must end with a 'gpt' answer"),
    ([{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}, {"from": "gpt", "value": "b"},
      {"from": "human", "value": "q"}], "turn 2 is from 'gpt'"),
    ([{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}, {"from": "human", "value": "<image> q2"},
      {"from": "gpt", "value": "b"}], "only the first human turn may contain '<image>'"),
    ([{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}, {"from": "human", "value": "q2"},
      {"from": "gpt", "value": " "}], "turn 3: the answer is empty"),
])
def test_malformed_conversations_are_named(folder, turns, message):
    with pytest.raises(DataValidationError, match=message):
        load_llava_json(_write(folder, [{"id": "m", "image": "a.png", "conversations": turns}]), folder)


def test_a_prediction_set_may_end_with_the_question(folder):
    record = {"id": "p", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nwhat colour ?"}]}
    ds = load_llava_json(_write(folder, [record]), folder, privacy_unit=False, require_answers=False)
    assert ds[0].answer is None
    with pytest.raises(DataValidationError, match="at least 2 turn"):
        load_llava_json(_write(folder, [record]), folder)


def test_a_bad_jsonl_line_is_named_by_number(folder):
    path = folder.parent / "data.jsonl"
    path.write_text(json.dumps(_record("a", "a.png")) + "\n{oops\n")
    with pytest.raises(DataValidationError, match="line 2 is not valid JSON"):
        load_llava_json(path, folder)


def test_limit_keeps_the_first_records_after_validating_all(folder):
    records = [_record("a", "a.png"), _record("b", "b.png", "blue"), _record("c", "missing.png")]
    with pytest.raises(DataValidationError, match="'c'.*not found"):
        load_llava_json(_write(folder, records), folder, limit=1)
    assert [r.id for r in load_llava_json(_write(folder, records[:2]), folder, limit=1)] == ["a"]


def test_an_image_that_cannot_be_decoded_is_named_when_encoded(tiny_bundle, folder):
    data = (folder / "b.png").read_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) // 2])   # a valid header, truncated pixels
    path = _write(folder, [_record("cut", "cut.png")])
    # a training set decodes its pixels at load (duplicates by pixels, issue 20): named there
    with pytest.raises(DataValidationError, match="record 'cut': image 'cut.png' could not be decoded"):
        load_llava_json(path, folder)
    ds = load_llava_json(path, folder, privacy_unit=False)
    bundle = tiny_bundle
    with pytest.raises(DataValidationError, match="record 'cut': image 'cut.png' could not be decoded"):
        encode_records(bundle, make_pruner("none", bundle), ds.records)


def test_any_answer_text_is_encodable_never_unknown(tiny_bundle):
    bundle = tiny_bundle
    tok = bundle.tokenizer
    for text in ("temple", "Schloß Neuschwanstein", "東京タワー", "emoji 🙂", "x" * 40):
        ids = tok(" " + text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids and tok.decode(ids) == " " + text

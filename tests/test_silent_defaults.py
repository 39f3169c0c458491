"""What used to pass silently now says so (issue 22): ignored ε, tiny images, a BOM, non-JSON infinities, a
user-data run named after the embedded task, a silent long run, an unannounced warm start, train/eval overlap."""
from __future__ import annotations

import json
import warnings

import pytest
from PIL import Image

from toolkit.config import TrainConfig
from toolkit.silent_defaults import silent_default_notes
from toolkit.vocabulary import strict_json
from toolkit.image_duplicates import report_overlap
from toolkit.userdata import load_llava_json

TURNS = [{"from": "human", "value": "<image>\nwhat colour ?"}, {"from": "gpt", "value": "red"}]


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_epsilon_given_to_a_non_private_run_is_named_as_ignored():
    notes = silent_default_notes(TrainConfig(method="non-private", epsilon=1.0, steps=1))
    assert len(notes) == 1 and "epsilon=1.0 is ignored" in notes[0]
    assert silent_default_notes(TrainConfig(method="dp-sgd", epsilon=1.0, steps=1)) == []
    assert silent_default_notes(TrainConfig(method="non-private", steps=1)) == []


def test_a_utf8_bom_in_the_data_file_is_accepted(tmp_path):
    Image.new("RGB", (20, 20), "red").save(tmp_path / "a.png")
    (tmp_path / "data.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(
        [{"id": "a", "image": "a.png", "conversations": TURNS}]).encode())
    assert load_llava_json(tmp_path / "data.json")[0].answer == "red"


def test_a_one_pixel_image_is_warned_about_by_record(tmp_path):
    Image.new("RGB", (1, 1), "red").save(tmp_path / "a.png")
    (tmp_path / "data.json").write_text(json.dumps([{"id": "dot", "image": "a.png", "conversations": TURNS}]))
    with pytest.warns(UserWarning, match=r"'dot'.*1x1 pixels"):
        load_llava_json(tmp_path / "data.json")


def test_infinities_become_strict_json():
    text = json.dumps(strict_json({"epsilon": float("inf"), "x": [float("nan"), float("-inf")], "ok": 1.5}))
    assert _strict(text) == {"epsilon": "inf", "x": ["nan", "-inf"], "ok": 1.5}
    assert float(_strict(text)["epsilon"]) == float("inf")


def test_train_and_eval_records_sharing_an_image_are_found(tmp_path):
    from toolkit.samples import make_photo_dataset

    paths = make_photo_dataset(tmp_path, n_train=6, n_test=4)
    train_set = load_llava_json(paths["train"], paths["image_folder"])
    assert report_overlap(train_set.records,
                          load_llava_json(paths["test"], paths["image_folder"], privacy_unit=False).records) == []
    with pytest.warns(UserWarning, match="6 evaluation record"):
        assert len(report_overlap(train_set.records, train_set.records)) == 6


def test_a_missing_warm_start_is_announced_with_its_time(tmp_path, monkeypatch, capsys):
    from toolkit import warmstart

    monkeypatch.setenv("DUALPRIV_CACHE", str(tmp_path))
    monkeypatch.setattr(warmstart, "ETA_AFTER_STEPS", 1)
    warmstart.warm_start("tiny", steps=2, progress=False)
    err = capsys.readouterr().err
    assert "no cached public warm start" in err and "training it now (2 steps" in err
    assert "s per step measured, about" in err
    warmstart.warm_start("tiny", steps=2, progress=False)   # cached now: nothing to announce
    assert "no cached" not in capsys.readouterr().err


@pytest.mark.slow
def test_a_quiet_non_private_cli_run_on_user_data_says_everything_it_used_to_hide(tmp_path, capsys):
    from toolkit.cli import main
    from toolkit.samples import make_photo_dataset

    paths = make_photo_dataset(tmp_path / "photos", n_train=16, n_test=4)
    out = tmp_path / "run.json"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(["train", "--method", "non-private", "--epsilon", "3", "--steps", "2", "--warm-start-steps", "0",
                     "--expected-batch-size", "4", "--keep-tokens", "4", "--progress", "false",
                     "--train-data", paths["train"], "--eval-data", paths["train"],   # eval = train: overlap
                     "--image-folder", paths["image_folder"], "--json", str(out)])
    assert code == 0
    captured = capsys.readouterr()
    assert "epsilon=3.0 is ignored" in captured.err
    assert "plan: non-private" in captured.out
    assert "training started" in captured.out and "training finished in" in captured.out
    assert any("overlap the training set" in str(w.message) for w in caught)
    result = _strict(out.read_text())            # strict JSON: no Infinity
    assert result["epsilon"] == "inf" and result["task"] is None
    assert "sentence" in result["verdict"] and result["verdict"]["total"] == 16


def test_every_json_file_the_command_line_writes_is_strict_json(tmp_path):
    """``--json PATH`` (bench, train, plan, ...) once wrote ``NaN`` for the ratios a one-method bench lacks, which
    ``jq`` and JavaScript's ``JSON.parse`` refuse."""
    from toolkit.cli import write_json

    write_json([{"memory_vs_dp_zo": float("nan"), "epsilon": float("inf"), "steps": 3}], str(tmp_path / "r.json"))
    text = (tmp_path / "r.json").read_text()
    rows = json.loads(text, parse_constant=lambda constant: pytest.fail(f"{constant} is not JSON"))
    assert rows == [{"memory_vs_dp_zo": "nan", "epsilon": "inf", "steps": 3}]

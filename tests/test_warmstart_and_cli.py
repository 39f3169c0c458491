"""The warm-start cache and the info CLI."""
import json

import pytest

import toolkit.warmstart as ws
from toolkit.cli import main


def test_warm_start_is_cached_and_reproducible(tmp_path, monkeypatch):
    monkeypatch.setenv("DUALPRIV_CACHE", str(tmp_path))
    first = ws.warm_start("tiny", seed=1, steps=2, batch_size=4, progress=False)
    assert ws.warm_start_path("tiny", 1, 2).is_dir()

    def refuse(*args, **kwargs):
        raise AssertionError("a cached warm start must not be retrained")

    monkeypatch.setattr(ws, "_train_public", refuse)
    again = ws.warm_start("tiny", seed=1, steps=2, batch_size=4, progress=False)
    for (name, a), (_, b) in zip(first.model.state_dict().items(), again.model.state_dict().items()):
        assert (a == b).all(), name
    monkeypatch.undo()
    monkeypatch.setenv("DUALPRIV_CACHE", str(tmp_path / "other"))
    rebuilt = ws.warm_start("tiny", seed=1, steps=2, batch_size=4, progress=False)
    for (name, a), (_, b) in zip(first.model.state_dict().items(), rebuilt.model.state_dict().items()):
        assert (a == b).all(), f"warm start not reproducible from its seed: {name}"


def test_a_preset_whose_widths_changed_never_loads_the_warm_start_of_its_old_shape(tmp_path, monkeypatch):
    from toolkit.models import PRESETS

    monkeypatch.setenv("DUALPRIV_CACHE", str(tmp_path))
    old = ws.warm_start("tiny", seed=0, steps=2, batch_size=4, progress=False)
    assert old.model.config.text_config.hidden_size == PRESETS["tiny"]["lm_hidden"]
    monkeypatch.setitem(PRESETS, "tiny", dict(PRESETS["tiny"], lm_hidden=2 * PRESETS["tiny"]["lm_hidden"]))
    wider = ws.warm_start("tiny", seed=0, steps=2, batch_size=4, progress=False)
    assert wider.model.config.text_config.hidden_size == PRESETS["tiny"]["lm_hidden"]
    assert len(list(tmp_path.glob("warmstart-tiny-*"))) == 2


def test_warm_start_reports_each_training_step_to_its_callback(tmp_path, monkeypatch):
    monkeypatch.setenv("DUALPRIV_CACHE", str(tmp_path))
    calls = []
    ws.warm_start("tiny", seed=2, steps=2, batch_size=4, progress=False, callback=lambda *step: calls.append(step))
    assert calls == [(0, 2), (1, 2), (2, 2)]
    calls.clear()
    ws.warm_start("tiny", seed=2, steps=2, batch_size=4, progress=False, callback=lambda *step: calls.append(step))
    assert calls == []  # the cached copy is loaded: nothing trains, nothing to report


def test_warm_start_reads_only_public_splits_never_the_private_one(tmp_path, monkeypatch):
    monkeypatch.setenv("DUALPRIV_CACHE", str(tmp_path))
    splits = []
    real_make_vqa = ws.make_vqa

    def recording_make_vqa(task, split, *args, **kwargs):
        splits.append(split)
        return real_make_vqa(task, split, *args, **kwargs)

    monkeypatch.setattr(ws, "make_vqa", recording_make_vqa)
    ws.warm_start("tiny", seed=4, steps=2, batch_size=4, progress=False)
    assert splits and set(splits) <= {"public", "validation"} and "public" in splits
    with pytest.raises(ValueError, match="steps"):
        ws.warm_start("tiny", steps=-1)


def test_info_lists_versions_presets_and_dataset_sizes(tmp_path, capsys):
    out = tmp_path / "info.json"
    assert main(["info", "--json", str(out)]) == 0
    info = json.loads(out.read_text())
    assert {"tiny", "llava576", "tiny-siglip"} <= set(info["presets"])
    assert info["dataset_sizes"]["parity"]["private"] == 700 and info["torch"].startswith("2.13")


def test_warm_start_keeps_its_best_public_validation_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("DUALPRIV_CACHE", str(tmp_path))
    bundle = ws.warm_start("tiny", seed=3, steps=6, batch_size=8, lr=1e-2, progress=False)
    info = bundle.info["warm_start"]
    curve = {step: accuracy for step, accuracy in info["validation_curve"]}
    assert sorted(curve) == [1, 2, 3, 4, 5, 6]                  # steps // VALIDATION_CHECKS = every step here
    assert info["validation_accuracy"] == max(curve.values()) == curve[info["kept_step"]]
    assert curve[6] < info["validation_accuracy"]                # here the last step is not the best one, so ...
    assert ws.public_validation_accuracy(bundle) == pytest.approx(info["validation_accuracy"], abs=1e-4)  # ... kept


def test_warm_start_cli_trains_once_then_finds_the_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DUALPRIV_CACHE", str(tmp_path))
    out = tmp_path / "ws.json"
    assert main(["warm-start", "--steps", "2", "--json", str(out)]) == 0
    first = json.loads(out.read_text())
    assert first["was_cached"] is False and 0 <= first["validation_accuracy"] <= 1 and first["steps"] == 2
    assert main(["warm-start", "--steps", "2", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["was_cached"] is True
    assert main(["warm-start", "--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("args, words", [
    (["warm-start", "--task", "bogus"], "unknown --task 'bogus'"),
    (["warm-start", "--preset", "llava-7b-shape"], "shape-only preset 'llava-7b-shape' has no warm start"),
    (["warm-start", "--steps", "0"], "--steps must be an integer >= 1"),
    (["warm-start", "--seed", "-1"], "--seed must be an integer >= 0"),
    (["predict", "--model", "no-model", "--data", "{data}", "--device", "bogus"],
     "device 'bogus' is not a torch device"),
    (["predict", "--model", "no-model", "--data", "{data}", "--batch-size", "-1"],
     "batch_size must be an integer >= 1"),
    (["predict", "--model", "no-model", "--data", "{data}", "--limit", "0"], "limit must be an integer >= 1"),
])
def test_a_bad_warm_start_or_predict_argument_is_named_before_anything_trains_or_loads(args, words, tmp_path,
                                                                                     monkeypatch, capsys):
    """Was: an unknown task silently trained the digit warm start, a bad device or batch size a torch traceback or
    an empty result. Refused by name, exit code 2, before a model is trained or loaded."""
    monkeypatch.setenv("DUALPRIV_CACHE", str(tmp_path / "cache"))
    (tmp_path / "data.json").write_text("[]")
    assert main([a.format(data=tmp_path / "data.json") for a in args]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert not (tmp_path / "cache").exists()

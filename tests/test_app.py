"""The dashboard's handlers, called directly (no browser): validation, a fine-tune to the end, cancel, the time
limit, the tokens view, the memory table and the privacy–utility view. Tiny settings: no warm start, few records."""
from __future__ import annotations

import html
import importlib.util
import json
import math
import os
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from toolkit.dashboard import handlers as h

TINY = dict(preset="tiny", warm_start_steps=0, train_limit=32, eval_limit=32, max_steps=50, time_limit=120.0,
            bench_isolate=False)

GOOD = dict(method="dual-priv", epsilon=3.0, delta=1e-5, budget_mode=h.BUDGET_RATIO, token_prune_ratio=0.75,
            keep_tokens=16, token_strategy="auto", grad_prune_ratio=0.2, steps=3, batch_size=8, lr="")


@pytest.fixture
def settings(tmp_path):
    return h.AppSettings(output_dir=str(tmp_path / "runs"), **TINY)


@pytest.fixture
def nothing_starts(monkeypatch):
    """Fail the test if a handler starts a worker (training, measurement, sweep)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a job was started for a bad input")

    monkeypatch.setattr(h, "_in_thread", refuse)


def _run(settings, session="test", **overrides):
    values = dict(GOOD, **overrides)
    return h.finetune(settings, values["method"], values["epsilon"], values["delta"], values["budget_mode"],
                      values["token_prune_ratio"], values["keep_tokens"], values["token_strategy"],
                      values["grad_prune_ratio"], values["steps"], values["batch_size"], values["lr"],
                      session=session)


def _only_update(generator) -> dict:
    with pytest.warns(UserWarning) as warned:  # gr.Warning outside a Gradio request
        updates = list(generator)
    assert len(updates) == 1, updates
    assert warned, "a bad input must raise a visible warning"
    return updates[0]


# ----------------------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("overrides, words", [
    (dict(epsilon=0), "ε must be > 0"),
    (dict(epsilon=-1.5), "ε must be > 0"),
    (dict(epsilon=None), "ε is empty"),
    (dict(delta=1.0), "δ must be in (0, 1)"),
    (dict(delta=0), "δ must be in (0, 1)"),
    (dict(delta=2), "δ must be in (0, 1)"),
    (dict(token_prune_ratio=1.0), "token prune ratio must be in [0, 1)"),
    (dict(token_prune_ratio=-0.1), "token prune ratio must be in [0, 1)"),
    (dict(grad_prune_ratio=1.0), "gradient prune ratio must be in [0, 1)"),
    (dict(grad_prune_ratio=-0.2), "gradient prune ratio must be in [0, 1)"),
    (dict(steps=0), "steps must be at least 1"),
    (dict(steps=2.5), "steps must be a whole number"),
    (dict(steps=51), "limited to 50"),
    (dict(batch_size=0), "batch size must be between"),
    (dict(lr="fast"), "learning rate must be a number"),
    (dict(lr="-1"), "learning rate must be > 0"),
    (dict(budget_mode=h.BUDGET_KEEP, keep_tokens=0), "keep must be >= 1"),
    (dict(budget_mode=h.BUDGET_KEEP, keep_tokens=65), "larger than the 64 patches"),
    (dict(token_strategy="dual-priv", budget_mode=h.BUDGET_KEEP, keep_tokens=7, method="dp-sgd",
          token_prune_ratio=None), None),  # valid: an explicit strategy on a baseline (checked below)
    (dict(method="sgd"), "unknown method"),
])
def test_bad_finetune_inputs_show_a_message_and_start_nothing(settings, nothing_starts, overrides, words):
    if words is None:  # the valid row: builds a config without starting anything
        config = h.build_train_config(settings, *[dict(GOOD, **overrides)[k] for k in GOOD])
        assert config.token_strategy == "dual-priv" and config.keep_tokens == 7 and config.grad_prune_ratio == 0
        return
    update = _only_update(_run(settings, **overrides))
    assert "Not started" in update["status"] and "dp-error" in update["status"]
    assert words in html.unescape(update["status"])
    assert update["result"] == "" and update["download"] is None
    assert h.running_job("test") is None


def test_non_private_ignores_epsilon_and_baselines_keep_every_token(settings):
    config = h.build_train_config(settings, "non-private", -1, 5, h.BUDGET_RATIO, 0.75, 16, "auto", 0.2, 3, 8, "")
    assert math.isinf(config.epsilon) and config.token_strategy == "none" and config.grad_prune_ratio == 0
    config = h.build_train_config(settings, "dual-priv", 2, 1e-5, h.BUDGET_RATIO, 0.5, 16, "auto", 0.3, 3, 8, "0.01")
    assert (config.token_strategy, config.token_prune_ratio, config.grad_prune_ratio, config.lr) == \
        ("dual-priv", 0.5, 0.3, 0.01)
    assert config.warm_start_steps == 0 and config.train_limit == 32 and config.progress is False


def test_app_settings_refuse_nonsense():
    with pytest.raises(ValueError, match="max_steps"):
        h.AppSettings(max_steps=0)
    with pytest.raises(ValueError, match="time_limit"):
        h.AppSettings(time_limit=0)


# ----------------------------------------------------------------------------------------------- fine-tune

def test_finetune_runs_to_completion_and_writes_its_settings(settings):
    updates = list(_run(settings, steps=3))
    final = updates[-1]
    assert "Finished 3 steps" in final["status"], final["status"]
    assert "accuracy" in final["result"] and "ε spent / target" in final["result"]
    assert "one source image" in final["result"]
    summary = final["settings"]
    assert summary["method"] == "dual-priv" and summary["steps"] == 3
    assert 0 < summary["epsilon_spent"] <= 3.0
    assert summary["visual_tokens"] == 16 and summary["grad_prune_ratio"] == 0.2
    path = Path(final["download"])
    assert path.is_file() and path.is_relative_to(Path(settings.output_dir))
    saved = json.loads(path.read_text())  # strict JSON: inf written as a string
    assert saved["config"]["token_prune_ratio"] == 0.75 and len(saved["history"]) == 3
    curve = final["curve"]
    assert [list(t.x) for t in curve.data][:2] == [[1, 2, 3], [1, 2, 3]]  # loss and ε spent per step
    assert h.running_job("test") is None


def test_first_job_trains_the_warm_start_with_progress(tmp_path, monkeypatch):
    monkeypatch.setenv("DUALPRIV_CACHE", str(tmp_path / "cache"))
    settings = h.AppSettings(output_dir=str(tmp_path / "runs"), **dict(TINY, warm_start_steps=1))
    assert not h.warm_start_cached(settings) and "not trained yet" in h.warm_start_note(settings)
    updates = list(_run(settings, steps=2, method="dp-sgd"))
    assert any("Preparing the public warm start" in u["status"] for u in updates)
    assert "Finished 2 steps" in updates[-1]["status"]
    assert h.warm_start_cached(settings) and "(cached)" in h.warm_start_note(settings)


def test_cancel_stops_the_run_cleanly(settings):
    generator = _run(settings, session="cancel-me", steps=50, batch_size=4)
    cancelled_at = None
    updates = []
    for update in generator:
        updates.append(update)
        if cancelled_at is None and "step " in update["status"]:
            assert h.running_job("cancel-me") is not None
            assert "Cancelling" in h.cancel("cancel-me")
            cancelled_at = len(updates)
    assert cancelled_at is not None, "no step was streamed"
    final = updates[-1]
    assert "Stopped early (cancelled by the user)" in final["status"]
    assert final["settings"]["cancelled"] is True and final["settings"]["steps"] < 50
    assert "Stopped early" in final["result"]
    assert h.running_job("cancel-me") is None
    assert "Nothing to cancel" in h.cancel("cancel-me")


def test_time_limit_stops_the_run(tmp_path):
    settings = h.AppSettings(output_dir=str(tmp_path), **dict(TINY, time_limit=1e-6))
    final = list(_run(settings, steps=20, method="non-private"))[-1]
    assert "time limit" in final["status"]
    assert final["settings"]["cancelled"] is True and final["settings"]["steps"] == 1
    assert final["settings"]["epsilon"] == "inf" and "non-private: no guarantee" in final["result"]


# ----------------------------------------------------------------------------------------------- tokens

def test_tokens_view_of_a_test_image(settings):
    out = h.tokens_view(settings, 3, None, "dual-priv", h.BUDGET_RATIO, 0.75, 16)
    counts = out["counts"]
    assert counts["tokens_out"] == 16 and counts["patches_in"] == 64
    assert counts["cls"] + counts["kept"] + counts["fused"] == 16
    assert "64 patches -> 16 visual tokens" in html.unescape(out["status"])
    names = [trace.name or "" for trace in out["overlay"].data]
    assert any(n.startswith("kept") for n in names) and any(n.startswith("contextual") for n in names)
    assert out["histogram"] is not None
    out = h.tokens_view(settings, 0, None, "random", h.BUDGET_KEEP, None, 10)
    assert out["counts"]["tokens_out"] == 10 and out["counts"]["dropped"] == 54


def test_tokens_view_of_an_upload(settings, tmp_path):
    from PIL import Image

    image = tmp_path / "photo.png"
    Image.new("RGB", (50, 40), (200, 30, 30)).save(image)
    out = h.tokens_view(settings, 0, str(image), "dual-priv", h.BUDGET_RATIO, 0.5, 16)
    assert out["counts"]["tokens_out"] == 32 and "photo.png" in out["counts"]["source"]


@pytest.mark.parametrize("content, words", [
    (b"this is not an image", "is not an image"),
    (b"\x89PNG\r\n\x1a\n broken", "is not an image"),
])
def test_tokens_view_refuses_a_non_image_upload(settings, tmp_path, content, words):
    bad = tmp_path / "notes.png"
    bad.write_bytes(content)
    with pytest.warns(UserWarning):
        out = h.tokens_view(settings, 0, str(bad), "dual-priv", h.BUDGET_RATIO, 0.75, 16)
    assert out["overlay"] is None and out["counts"] is None
    assert words in out["status"] and "dp-error" in out["status"]


@pytest.mark.parametrize("args, words", [
    ((0, None, "dual-priv", h.BUDGET_RATIO, 1.0, 16), "token prune ratio must be in [0, 1)"),
    ((0, None, "dual-priv", h.BUDGET_KEEP, 0.75, 0), "keep must be >= 1"),
    ((0, None, "nonsense", h.BUDGET_RATIO, 0.75, 16), "unknown token strategy"),
    ((999, None, "dual-priv", h.BUDGET_RATIO, 0.75, 16), "example must be between 0 and 296"),
    ((0, "/nonexistent/file.png", "dual-priv", h.BUDGET_RATIO, 0.75, 16), "missing"),
])
def test_tokens_view_bad_inputs(settings, args, words):
    with pytest.warns(UserWarning):
        out = h.tokens_view(settings, *args)
    assert out["overlay"] is None and words in html.unescape(out["status"])


# ----------------------------------------------------------------------------------------------- memory

def test_memory_table_has_ratio_columns(settings):
    updates = list(h.memory(settings, ["dp-sgd", "dual-priv"], 2, 3, "dual-priv", h.BUDGET_RATIO, 0.75, 16, 0.2))
    final = updates[-1]
    table = final["table"]
    assert list(table["method"]) == ["dp-sgd", "dual-priv"]
    for column in ("peak_memory_mb", "memory_vs_dp_sgd", "memory_vs_dp_zo", "time_vs_dp_sgd", "memory_method"):
        assert column in table.columns
    assert table.loc[table.method == "dp-sgd", "memory_vs_dp_sgd"].iloc[0] == pytest.approx(1.0)
    assert list(table["visual_tokens"]) == [64, 16]
    assert "How memory was measured" in final["note"] and str(table["memory_method"].iloc[0]) in final["note"]
    assert len(final["figure"].data[0].x) == 2


@pytest.mark.parametrize("args, words", [
    (([], 2, 3), "at least one method"),
    ((["dp-sgd"], 2, 2), "at least 3"),
    ((["dp-sgd"], 0, 3), "batch size"),
])
def test_memory_bad_inputs(settings, nothing_starts, args, words):
    update = _only_update(h.memory(settings, *args, "dual-priv", h.BUDGET_RATIO, 0.75, 16, 0.2))
    assert words in html.unescape(update["status"]) and update["table"] is None


# ----------------------------------------------------------------------------------------------- privacy-utility

def test_load_sweep_csv_draws_the_curve(tmp_path):
    path = tmp_path / "sweep.csv"
    pd.DataFrame(dict(method=["dp-sgd", "dp-sgd", "dual-priv", "dual-priv", "non-private"],
                      epsilon=[1.0, 3.0, 1.0, 3.0, "inf"], seed=[0] * 5,
                      accuracy=[0.5, 0.6, 0.55, 0.7, 0.9])).to_csv(path, index=False)
    out = h.load_sweep_csv(str(path))
    assert "Loaded 5 runs of 3 method(s)" in out["status"]
    assert out["figure"] is not None and len(out["table"]) == 5
    assert list(out["table"]["epsilon"]) == [1.0, 3.0, 1.0, 3.0, "∞"]


def test_load_sweep_csv_refuses_a_wrong_file(tmp_path):
    path = tmp_path / "other.csv"
    pd.DataFrame(dict(a=[1], b=[2])).to_csv(path, index=False)
    with pytest.warns(UserWarning):
        out = h.load_sweep_csv(str(path))
    assert "lacks column(s)" in out["status"] and out["figure"] is None
    binary = tmp_path / "image.csv"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.warns(UserWarning):
        assert h.load_sweep_csv(str(binary))["figure"] is None


@pytest.mark.parametrize("args, words", [
    ((["dp-sgd"], "0, 3", 1, 2, 8), "every ε must be > 0"),
    ((["dp-sgd"], "one", 1, 2, 8), "not a number"),
    ((["dp-sgd"], "", 1, 2, 8), "at least one ε"),
    (([], "3", 1, 2, 8), "at least one method"),
    ((["dp-sgd", "dual-priv"], "1,2,3,4,5", 3, 2, 8), "the app allows"),
])
def test_sweep_bad_inputs(settings, nothing_starts, args, words):
    update = _only_update(h.sweep(settings, *args))
    assert words in html.unescape(update["status"])


def test_small_sweep_runs(settings):
    final = list(h.sweep(settings, ["dual-priv"], "2", 1, 2, 8))[-1]
    assert "Sweep done: 1 of 1 runs" in final["status"], final["status"]
    table = final["table"]
    assert list(table["method"]) == ["dual-priv"] and list(table["epsilon"]) == [2.0]
    assert 0 < table["epsilon_spent"].iloc[0] <= 2.0
    assert Path(final["download"]).is_file()
    assert final["figure"] is not None


# ----------------------------------------------------------------------------------------------- the app

def test_build_app_wires_every_control_with_help(settings):
    import gradio as gr

    from toolkit.dashboard.ui import build_app

    demo = build_app(settings=settings)
    assert isinstance(demo, gr.Blocks)
    inputs = [b for b in demo.blocks.values()
              if isinstance(b, (gr.Number, gr.Slider, gr.Radio, gr.Dropdown, gr.Checkbox, gr.CheckboxGroup,
                                gr.Textbox))]
    assert len(inputs) >= 20
    missing = [b.label for b in inputs if not getattr(b, "info", None)]
    assert not missing, f"controls without help text: {missing}"
    infos = " ".join(b.info for b in inputs)
    assert "one record = one source image" in infos and "OUTSIDE the DP guarantee" in infos
    api = {d.api_name for d in demo.fns.values()}
    assert {"finetune", "cancel", "tokens", "memory", "sweep", "load_sweep"} <= api
    assert demo.dashboard_settings.max_steps == 50


def _app_module():
    spec = importlib.util.spec_from_file_location("dualpriv_app", Path(__file__).resolve().parents[1] / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_app_flags_default_to_local_and_bounded():
    app = _app_module()
    args = app.parse_args([])
    assert (args.host, args.port, args.share, args.max_steps, args.time_limit) == ("127.0.0.1", 7860, False, 200, 600.0)
    with pytest.raises(SystemExit):
        app.parse_args(["--max-steps", "0"])
    if "GRADIO_TEMP_DIR" not in os.environ or os.environ["GRADIO_TEMP_DIR"] == h.temp_root():
        assert Path(h.temp_root()).resolve().is_relative_to(Path(tempfile.gettempdir()).resolve())


def test_json_safe_makes_strict_json():
    text = json.dumps(h.json_safe(dict(a=math.inf, b=[float("nan"), 1.0])), allow_nan=False)
    assert json.loads(text) == dict(a="inf", b=["nan", 1.0])


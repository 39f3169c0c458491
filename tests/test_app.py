"""The dashboard, called directly (no browser), one section per module: the job runner, the model and its warm
start, each tab's handlers (validation, a fine-tune to the end, cancel, the time limit, the tokens view, the memory
table, the privacy–utility view), and the page. Tiny settings: no warm start, few records."""
from __future__ import annotations

import dataclasses
import html
import importlib.util
import json
import math
import os
import re
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import gradio as gr
import pandas as pd
import pytest
from PIL import Image

from toolkit.dashboard import AppSettings, InputError, common, datasets, images, jobs, line, model, reference
from toolkit.dashboard.budget import BUDGET_KEEP, BUDGET_RATIO
from toolkit.dashboard.tabs import audit, finetune, memory, runs, sweep, tokens, yourdata
from toolkit.dashboard.ui import build_app, header_markdown
from toolkit.config import TrainConfig
from toolkit.samples import make_photo_dataset

TINY = dict(preset="tiny", warm_start_steps=0, train_limit=32, eval_limit=32, max_steps=50, time_limit=120.0,
            bench_isolate=False)

GOOD = dict(method="dual-priv", epsilon=3.0, delta=1e-5, budget_mode=BUDGET_RATIO, token_prune_ratio=0.75,
            keep_tokens=16, token_strategy="auto", grad_prune_ratio=0.2, steps=3, batch_size=8, lr="")


@pytest.fixture
def settings(tmp_path):
    return AppSettings(output_dir=str(tmp_path / "runs"), **TINY)


@pytest.fixture
def nothing_starts(monkeypatch):
    """Fail the test if a handler starts a worker (training, measurement, sweep) or claims a job."""
    def refuse(*args, **kwargs):
        raise AssertionError("a job was started for a bad input")

    monkeypatch.setattr(jobs, "start_worker", refuse)
    monkeypatch.setattr(jobs, "claim", refuse)


def _run(settings, session="test", **overrides):
    values = dict(GOOD, **overrides)
    return finetune.finetune(settings, values["method"], values["epsilon"], values["delta"], values["budget_mode"],
                             values["token_prune_ratio"], values["keep_tokens"], values["token_strategy"],
                             values["grad_prune_ratio"], values["steps"], values["batch_size"], values["lr"],
                             release_stats=values.get("release_stats", False),
                             compare=values.get("compare", False), session=session)


def _only_update(generator) -> dict:
    with pytest.warns(UserWarning) as warned:  # gr.Warning outside a Gradio request
        updates = list(generator)
    assert len(updates) == 1, updates
    _shown_once(warned, updates[0]["status"])
    return updates[0]


def _shown_once(warned, status: str) -> None:
    """The reason is in the status line only; exactly one toast (a warning outside Gradio) points at it."""
    toasts = [str(w.message) for w in warned if issubclass(w.category, UserWarning)]
    assert toasts == [common.TOAST_TEXT], toasts
    assert "dp-error" in status


# ----------------------------------------------------------------------------------------------- jobs

def _drain_stream(generator):
    """Every update of a jobs.stream generator, and its Outcome."""
    updates = []
    while True:
        try:
            updates.append(next(generator))
        except StopIteration as stop:
            return updates, stop.value


def test_a_session_runs_one_job_at_a_time():
    job = jobs.claim("one-at-a-time", "fine-tune")
    with pytest.raises(InputError, match="a job of yours is already running"):
        jobs.claim("one-at-a-time", "sweep")
    assert jobs.running_job("one-at-a-time") is job
    jobs.release(job)
    assert jobs.running_job("one-at-a-time") is None
    jobs.release(jobs.claim("one-at-a-time", "sweep"))  # the slot is free again


def test_the_job_stream_renders_events_in_order_and_returns_the_outcome():
    job = jobs.claim("stream", "test job")
    seen = []

    def work(job):
        for i in range(3):
            job.emit("tick", i)
            time.sleep(0.3)
        return "result"

    updates, outcome = _drain_stream(jobs.stream(
        job, work, lambda: dict(blank="", status=f"ticks {seen}"), blank=dict(blank=""), first_status="starting",
        on_event=lambda kind, value: seen.append((kind, value)), poll_s=0.05, min_gap_s=0.0))
    assert updates[0] == dict(blank="", status="starting")
    assert seen == [("tick", 0), ("tick", 1), ("tick", 2)]
    assert any(u["status"].startswith("ticks [('tick', 0)") for u in updates[1:])
    assert outcome.value == "result" and outcome.error is None
    assert jobs.running_job("stream") is None


def test_a_failing_job_returns_its_error_and_frees_the_session():
    job = jobs.claim("failing", "test job")

    def work(job):
        raise RuntimeError("broken")

    _, outcome = _drain_stream(jobs.stream(job, work, dict, blank={}, first_status="", poll_s=0.05))
    assert isinstance(outcome.error, RuntimeError) and str(outcome.error) == "broken"
    assert "The run failed: broken" in common.failure_html("The run", outcome.error)   # words, no class name
    assert jobs.running_job("failing") is None


def test_closing_the_page_cancels_the_job_and_frees_the_session():
    job = jobs.claim("closed", "test job")
    stopped = threading.Event()

    def work(job):
        while not job.stopping:
            time.sleep(0.02)
        stopped.set()

    generator = jobs.stream(job, work, lambda: dict(status="running"), blank={}, first_status="", poll_s=0.05,
                            min_gap_s=0.0)
    next(generator), next(generator)  # the worker is running
    generator.close()                 # what Gradio does when the page goes away
    assert stopped.wait(5) and job.reason == "the page was closed"
    assert jobs.running_job("closed") is None


def _hold_the_line(session: str):
    """A running job that holds the line until the returned event is set; returns (event, its update stream)."""
    job = jobs.claim(session, "test job", units=1)
    go, inside = threading.Event(), threading.Event()

    def hold(job):
        inside.set()
        go.wait(30)

    updates = jobs.stream(job, hold, lambda: dict(status="holding"), blank={}, first_status="", poll_s=0.05)
    while not inside.is_set():
        next(updates)
    return go, updates


def test_one_heavy_job_at_a_time_in_order_and_a_queued_one_sees_its_place(monkeypatch):
    jobs.forget_durations()
    go, first = _hold_the_line("line-1")
    ran = []
    second = jobs.stream(jobs.claim("line-2", "test job", units=4), lambda job: ran.append("line-2"),
                         dict, blank={}, first_status="", poll_s=0.05, min_gap_s=0.0)
    third = jobs.stream(jobs.claim("line-3", "test job", units=4), lambda job: ran.append("line-3"),
                        dict, blank={}, first_status="", poll_s=0.05, min_gap_s=0.0)
    status2, status3 = next(second)["status"], next(third)["status"]
    assert "Queued: your test job is 2nd in line" in status2 and "a test job (another user" in status2
    assert "3rd in line" in html.unescape(status3)
    # nothing of this kind has finished yet: the wait is unknown, never a guess
    assert "Wait unknown: no test job has finished on this server yet" in status2
    monkeypatch.setattr(line, "_PACES", {"test job": __import__("collections").deque([2.0])})  # 2 s per unit
    status3 = next(third)["status"]
    assert re.search(r"Estimated wait ≈ \d+ s", status3) and "from the last 1 test job on this server" in status3
    assert ran == []
    go.set()
    _drain_stream(first), _drain_stream(second), _drain_stream(third)
    assert ran == ["line-2", "line-3"]  # first in, first out
    assert jobs.LINE.snapshot() == (None, [])


def test_a_running_job_reports_its_own_pace_to_those_waiting():
    jobs.forget_durations()
    go, first = _hold_the_line("pace-1")
    running = jobs.running_job("pace-1")
    running.progress(1, 10)   # the first unit includes loading: no estimate from it alone
    waiting = jobs.stream(jobs.claim("pace-2", "test job", units=1), lambda job: None, dict, blank={},
                          first_status="", poll_s=0.05, min_gap_s=0.0)
    status = html.unescape(next(waiting)["status"])
    assert "1/10 done" in status and "Wait unknown" in status
    time.sleep(0.3)
    running.progress(1 + jobs.MIN_PACE_UNITS, 10)  # then its pace since the first unit: ≈ 0.1 s per unit
    status = html.unescape(next(waiting)["status"])
    assert "4/10 done" in status and "from the running test job's own pace" in status
    assert re.search(r"Estimated wait (under 1 s|≈ [0-9] s)", status), status
    jobs.cancel("pace-2")
    assert _drain_stream(waiting)[1].started is False
    go.set()
    _drain_stream(first)


def test_cancel_takes_a_queued_fine_tune_out_of_the_line_before_it_ever_trains(settings, monkeypatch):
    calls = []
    monkeypatch.setattr(finetune, "train", lambda *a, **k: calls.append(a))  # must never be reached
    go, first = _hold_the_line("someone-else")
    queued = _run(settings, session="queued-user", steps=20)
    status = next(queued)["status"]
    assert "Queued: your fine-tune is 2nd in line" in status
    answer = jobs.cancel("queued-user")
    assert "Cancelled before it started (cancelled while queued)" in answer and "no ε was spent" in answer
    final = list(queued)[-1]
    assert "Cancelled before it started" in final["status"] and "no ε was spent" in final["status"]
    assert final["result"] == "" and final["settings"] is None
    assert jobs.running_job("queued-user") is None
    assert jobs.LINE.snapshot()[1] == []  # it left the line
    go.set()
    _drain_stream(first)
    time.sleep(0.3)
    assert calls == []  # it never started, even after the line freed


def test_a_queued_job_whose_page_closes_leaves_the_line():
    go, first = _hold_the_line("closing-1")
    waiting = jobs.stream(jobs.claim("closing-2", "test job"), lambda job: None, dict, blank={}, first_status="",
                          poll_s=0.05)
    next(waiting)
    assert len(jobs.LINE.snapshot()[1]) == 1
    waiting.close()
    assert jobs.LINE.snapshot()[1] == [] and jobs.running_job("closing-2") is None
    go.set()
    _drain_stream(first)


def test_cancel_says_when_nothing_runs_and_when_a_job_cannot_stop():
    assert "Nothing to cancel" in jobs.cancel("nobody")
    job = jobs.claim("measuring", "memory measurement", cancellable=False)
    job.started = time.monotonic()  # running: a measurement cannot stop midway
    try:
        assert "cannot be cancelled" in jobs.cancel("measuring") and not job.stopping
    finally:
        jobs.release(job)


# ----------------------------------------------------------------------------------------------- common

def test_app_settings_refuse_nonsense():
    with pytest.raises(ValueError, match="max_steps"):
        AppSettings(max_steps=0)
    with pytest.raises(ValueError, match="time_limit"):
        AppSettings(time_limit=0)


def test_strict_json_makes_strict_json():
    text = json.dumps(common.strict_json(dict(a=math.inf, b=[float("nan"), 1.0])), allow_nan=False)
    assert json.loads(text) == dict(a="inf", b=["nan", 1.0])


def test_tables_show_rounded_numbers_not_sixteen_digits():
    table = pd.DataFrame(dict(method=["dp-sgd"], accuracy=[0.1 + 0.2], epsilon=[math.inf], steps=[3],
                              mixed=[1 / 3]))
    shown = common.round_table(table)
    assert shown["accuracy"].iloc[0] == 0.3 and shown["mixed"].iloc[0] == 0.3333
    assert math.isinf(shown["epsilon"].iloc[0]) and shown["steps"].iloc[0] == 3 and shown["method"].iloc[0] == "dp-sgd"
    assert table["accuracy"].iloc[0] != 0.3  # the input is left as it was


# ----------------------------------------------------------------------------------------------- model

def test_preparing_the_warm_start_reports_each_step_then_caches_it(tmp_path, monkeypatch):
    monkeypatch.setenv("DUALPRIV_CACHE", str(tmp_path / "cache"))
    settings = AppSettings(output_dir=str(tmp_path / "runs"), **dict(TINY, warm_start_steps=2))
    assert not model.warm_start_cached(settings) and "not trained yet" in header_markdown(settings)
    notes = []
    model.prepare(settings, notes.append)
    assert "Preparing the public warm start" in notes[0]
    assert any("step 0/2" in n for n in notes[1:-1]) and any("step 2/2" in n for n in notes[1:-1])
    assert notes[-1] is None
    assert model.warm_start_cached(settings) and "(cached)" in header_markdown(settings)
    notes.clear()
    model.prepare(settings, notes.append)  # cached: nothing to report
    assert notes == []


def test_the_warm_start_is_prepared_at_launch_as_the_first_job_in_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DUALPRIV_CACHE", str(tmp_path / "cache"))
    settings = AppSettings(output_dir=str(tmp_path / "runs"), **dict(TINY, warm_start_steps=3))
    job = model.prepare_in_background(settings)
    assert job is not None and job.session == model.WARM_START_SESSION and not job.cancellable
    assert model.prepare_in_background(settings) is None  # already being prepared
    deadline = time.monotonic() + 300
    while jobs.running_job(model.WARM_START_SESSION) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert model.warm_start_cached(settings) and jobs.LINE.snapshot() == (None, [])
    log = capsys.readouterr().out
    assert "public warm start of 'tiny': step 3/3" in log and "\r" not in log  # short lines, no progress bar
    assert model.prepare_in_background(settings) is None  # cached: nothing to do


def test_while_the_warm_start_trains_the_header_and_tokens_view_say_so(settings, monkeypatch):
    settings = AppSettings(output_dir=settings.output_dir, **dict(TINY, warm_start_steps=600))
    pace = jobs.Pace()
    pace.update(1, 600)
    pace._first, pace.done = (1.0, time.monotonic() - 10), (4.0, 600.0)   # 3 steps: too few for an estimate
    monkeypatch.setitem(model._TRAINING, ("tiny", 600), (pace, time.monotonic() - 12))
    monkeypatch.setattr(model, "warm_start_cached", lambda s: False)
    assert model.warm_start_progress(settings) == "step 4/600 · 12 s"            # no guess from 3 slow steps
    pace.done = (31.0, 600.0)                                                    # 30 steps in 10 s: 1/3 s each
    progress = model.warm_start_progress(settings)
    assert progress.startswith("step 31/600 · 12 s, about 19") and progress.endswith("s left")
    assert "being trained now, once: step 31/600" in header_markdown(settings)
    out = tokens.tokens_view(settings, 0, None, "dual-priv", BUDGET_RATIO, 0.75, 16)
    assert "The public warm start is being trained (step 31/600" in html.unescape(out["status"])
    assert out["overlay"] is None


# ----------------------------------------------------------------------------------------------- fine-tune

@pytest.mark.parametrize("overrides, words", [
    (dict(epsilon=0), "ε must be a finite number > 0, got 0"),
    (dict(epsilon=-1.5), "ε must be a finite number > 0, got -1.5"),
    (dict(epsilon=None), "ε is empty"),
    (dict(delta=1.0), "δ must be in (0, 1)"),
    (dict(delta=0), "δ must be in (0, 1)"),
    (dict(delta=2), "δ must be in (0, 1)"),
    (dict(token_prune_ratio=1.0), "token prune ratio must be in [0, 1)"),
    (dict(token_prune_ratio=-0.1), "token prune ratio must be in [0, 1)"),
    (dict(grad_prune_ratio=1.0), "gradient prune ratio must be in [0, 1)"),
    (dict(grad_prune_ratio=-0.2), "gradient prune ratio must be in [0, 1)"),
    (dict(steps=0), "steps must be an integer >= 1, got 0"),
    (dict(steps=2.5), "steps must be an integer >= 1, got 2.5"),
    (dict(steps=51), "limited to 50"),
    (dict(batch_size=0), "batch size must be an integer in [1, 256]"),
    (dict(lr="fast"), "learning rate must be a number"),
    (dict(lr="-1"), "learning rate must be a finite number > 0"),
    (dict(budget_mode=BUDGET_KEEP, keep_tokens=0), "keep must be >= 1"),
    (dict(budget_mode=BUDGET_KEEP, keep_tokens=65), "larger than the 64 patches"),
    (dict(method="sgd"), "unknown method"),
])
def test_bad_finetune_inputs_show_a_message_and_start_nothing(settings, nothing_starts, overrides, words):
    update = _only_update(_run(settings, **overrides))
    assert "Not started" in update["status"] and "dp-error" in update["status"]
    assert words in html.unescape(update["status"])
    assert update["result"] == "" and update["download"] is None
    assert jobs.running_job("test") is None


def test_an_explicit_token_strategy_applies_to_a_baseline(settings):
    values = dict(GOOD, token_strategy="dual-priv", budget_mode=BUDGET_KEEP, keep_tokens=7, method="dp-sgd",
                  token_prune_ratio=None)
    config = finetune.build_train_config(settings, *[values[k] for k in GOOD])
    assert config.token_strategy == "dual-priv" and config.keep_tokens == 7 and config.grad_prune_ratio == 0


def test_what_a_fine_tune_prunes_by_default_comes_from_the_method_registry(settings):
    from toolkit.methods import get_method, register_method, unregister_method

    dp_sgd = get_method("dp-sgd")
    register_method(dataclasses.replace(dp_sgd, name="toy-pruned-dp-sgd", prunes_tokens=True, prunes_update=True))
    try:
        values = dict(GOOD, method="toy-pruned-dp-sgd", token_strategy="auto", grad_prune_ratio=0.3)
        config = finetune.build_train_config(settings, *[values[k] for k in GOOD])
        assert (config.token_strategy, config.grad_prune_ratio) == ("dual-priv", 0.3)
    finally:
        unregister_method("toy-pruned-dp-sgd")
    values = dict(GOOD, method="dp-sgd", token_strategy="auto", grad_prune_ratio=0.3)
    config = finetune.build_train_config(settings, *[values[k] for k in GOOD])
    assert (config.token_strategy, config.grad_prune_ratio) == ("none", 0)   # as TrainConfig.resolved() says
    assert config.grad_prune_ratio == TrainConfig(method="dp-sgd", steps=1).resolved().grad_prune_ratio


def test_the_fine_tune_plan_shows_sigma_and_the_measured_verdict_before_any_run(settings, monkeypatch):
    monkeypatch.setattr(model, "prepare", lambda *a, **k: pytest.fail("the plan must not load the model"))
    text = html.unescape(finetune.plan_for(settings, *GOOD.values()))
    assert "plan: dual-priv" in text and "N = 32 records" in text and "q = 0.25" in text and "σ = " in text
    assert any(words in text for words in ("stayed at the majority class", "learned (", "between measured levels"))
    assert "No plan" in html.unescape(finetune.plan_for(settings, *dict(GOOD, epsilon=-1).values()))


def test_non_private_ignores_epsilon_and_baselines_keep_every_token(settings):
    config = finetune.build_train_config(settings, "non-private", -1, 5, BUDGET_RATIO, 0.75, 16, "auto", 0.2, 3, 8,
                                         "")
    assert math.isinf(config.epsilon) and config.token_strategy == "none" and config.grad_prune_ratio == 0
    config = finetune.build_train_config(settings, "dual-priv", 2, 1e-5, BUDGET_RATIO, 0.5, 16, "auto", 0.3, 3, 8,
                                         "0.01")
    assert (config.token_strategy, config.token_prune_ratio, config.grad_prune_ratio, config.lr) == \
        ("dual-priv", 0.5, 0.3, 0.01)
    assert config.warm_start_steps == 0 and config.train_limit == 32 and config.progress is False


def test_a_second_job_of_the_same_session_is_refused(settings):
    job = jobs.claim("busy", "sweep")
    try:
        update = _only_update(_run(settings, session="busy"))
        assert "Not started: a job of yours is already running" in update["status"]
    finally:
        jobs.release(job)


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
    assert [t.name for t in curve.data][:1] == ["ε spent"]  # the private loss is not released by default
    assert "not released" in curve.layout.annotations[0].text
    assert "loss" not in saved["history"][0] and saved["released_training_stats"] == []
    assert jobs.running_job("test") is None


def test_a_result_within_noise_of_chance_is_flagged_in_plain_words():
    assert reference.chance_level("parity") == 0.5 and reference.chance_level("digit") == 0.1
    assert reference.eval_size("parity") == 297 and reference.eval_size("parity", eval_limit=32) == 32
    read = reference.accuracy_verdict("parity", 0.512)   # the old default's non-private result
    assert read["kind"] == "warn" and "Within noise of the majority class baseline" in read["sentence"]
    assert "297 test records" in read["sentence"] and "majority class 51.2% (always 'odd')" in read["sentence"]
    read = reference.accuracy_verdict("parity", 0.75)
    assert read["kind"] == "ok" and "standard errors, one-sided binomial test" in read["sentence"]
    assert reference.accuracy_verdict("parity", float("nan"))["kind"] == "warn"


def test_an_epsilon_of_a_billion_is_flagged_effectively_non_private(settings):
    final = list(_run(settings, epsilon=1e9, steps=2))[-1]
    verdict = html.unescape(final["verdict"])
    assert "dp-warn" in verdict and "Effectively non-private: ε = 1e+09 is at least 13.8" in verdict
    assert "σ = " in verdict and "below 0.1" in verdict
    assert "Effectively non-private" not in list(_run(settings, epsilon=3.0, steps=2))[-1]["verdict"]


def test_the_non_private_reference_is_measured_once_then_cached(settings, tmp_path, monkeypatch):
    monkeypatch.setenv("DUALPRIV_CACHE", str(tmp_path / "cache"))
    config = finetune.build_train_config(settings, *[GOOD[k] for k in list(GOOD)[:8]], 3, 8, "")
    assert finetune.reference_to_measure(config, True)     # the queue's estimate counts the reference run ...
    updates = list(_run(settings, steps=3, compare=True))
    assert not finetune.reference_to_measure(config, True)  # ... until it is cached: then only the run itself
    # the run's own result is on the page while its reference is being measured
    assert any("Measuring the non-private reference" in u["status"] and "accuracy" in u["result"]
               and "Non-private reference: coming" in u["verdict"] for u in updates)
    first = updates[-1]["verdict"]
    assert "Non-private reference, same 3 steps and batch size 8" in first and "measured live just now" in first
    assert "majority class" in first and "binomial test" in first or "one answer for (almost) everything" in first
    second = list(_run(settings, steps=3, compare=True, method="dp-sgd"))
    assert not any("Measuring the non-private reference" in u["status"] for u in second)
    assert "cached for these settings" in second[-1]["verdict"]
    stored = json.loads((tmp_path / "cache" / "dashboard" / "references.json").read_text())
    assert len(stored) == 1 and next(iter(stored.values()))["steps"] == 3
    other = list(_run(settings, steps=4, compare=True, method="non-private"))[-1]["verdict"]
    assert "this run is that reference" in other  # a non-private run with new settings is its own reference
    off = list(_run(settings, steps=3))[-1]["verdict"]
    assert "Non-private reference: off" in off


@pytest.mark.slow
def test_the_queued_wait_counts_only_what_will_run_and_is_near_the_real_wait(settings, tmp_path, monkeypatch):
    """The issue's case: a reference cached by the first run must not be counted in the next one's wait."""
    monkeypatch.setenv("DUALPRIV_CACHE", str(tmp_path / "cache"))
    jobs.forget_durations()
    list(_run(settings, session="first", steps=20, compare=True))   # its pace: run + reference (40 units)
    running = threading.Thread(target=lambda: list(_run(settings, session="second", steps=20, compare=True)))
    running.start()
    deadline = time.monotonic() + 30
    while not (jobs.LINE.snapshot()[0] and jobs.LINE.snapshot()[0].session == "second"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # the case, exactly: the running job counts its 20 steps, not the reference the first run cached
    assert jobs.LINE.snapshot()[0].units == 20
    started = time.monotonic()
    queued = _run(settings, session="third", steps=5)
    status = html.unescape(next(queued)["status"])
    estimate = float(re.search(r"Estimated wait ≈ (\d+) s", status).group(1))
    while "Queued" in html.unescape(next(queued)["status"]):
        pass
    real = time.monotonic() - started
    list(queued)
    running.join()
    print(f"queued wait: estimated {estimate:.0f} s, real {real:.1f} s")
    # seconds on a shared 2-core machine are noisy (a quiet CI run once measured 5 s estimated, 2.0 s real): the
    # exact check is the unit count above; this one only catches an estimate of another order of magnitude
    assert real / 3 - 1 <= estimate <= 3 * real + 1, (estimate, real)


def test_a_cached_reference_is_not_replaced_by_a_slower_measurement(settings, tmp_path):
    store = reference.ReferenceStore(tmp_path / "references.json")
    config = reference.reference_config(finetune.build_train_config(settings, *[GOOD[k] for k in list(GOOD)[:8]],
                                                                    3, 8, ""))
    fast = store.put(config, dict(accuracy=0.8, wall_time_s=13.6, steps=3))
    kept = store.put(config, dict(accuracy=0.7, wall_time_s=99.5, steps=3))   # measured again under load
    assert kept == fast and store.get(config)["wall_time_s"] == 13.6 and store.get(config)["accuracy"] == 0.8
    faster = store.put(config, dict(accuracy=0.81, wall_time_s=9.0, steps=3))
    assert store.get(config) == faster


def test_released_training_loss_is_drawn_and_marked_outside_the_guarantee(settings):
    final = list(_run(settings, steps=3, release_stats=True))[-1]
    curve = final["curve"]
    assert [list(t.x) for t in curve.data][:2] == [[1, 2, 3], [1, 2, 3]]  # loss and ε spent per step
    assert "outside the DP guarantee" in curve.layout.annotations[0].text
    assert final["settings"]["released_training_stats"] == ["loss", "batch_size"]


def test_first_job_trains_the_warm_start_with_progress(tmp_path, monkeypatch):
    monkeypatch.setenv("DUALPRIV_CACHE", str(tmp_path / "cache"))
    settings = AppSettings(output_dir=str(tmp_path / "runs"), **dict(TINY, warm_start_steps=1))
    assert not model.warm_start_cached(settings) and "not trained yet" in model.warm_start_note(settings)
    updates = list(_run(settings, steps=2, method="dp-sgd"))
    assert any("Preparing the public warm start" in u["status"] for u in updates)
    assert "Finished 2 steps" in updates[-1]["status"]
    assert model.warm_start_cached(settings) and "(cached)" in model.warm_start_note(settings)


def test_cancel_stops_the_run_cleanly(settings):
    generator = _run(settings, session="cancel-me", steps=50, batch_size=4)
    cancelled_at = None
    updates = []
    for update in generator:
        updates.append(update)
        if cancelled_at is None and "step " in update["status"]:
            assert jobs.running_job("cancel-me") is not None
            assert "Cancelling" in jobs.cancel("cancel-me")
            cancelled_at = len(updates)
    assert cancelled_at is not None, "no step was streamed"
    final = updates[-1]
    assert "Stopped early (cancelled by the user)" in final["status"]
    assert final["settings"]["cancelled"] is True and final["settings"]["steps"] < 50
    assert "Stopped early" in final["result"]
    assert jobs.running_job("cancel-me") is None
    assert "Nothing to cancel" in jobs.cancel("cancel-me")


def test_time_limit_stops_the_run(tmp_path):
    settings = AppSettings(output_dir=str(tmp_path), **dict(TINY, time_limit=1e-6))
    final = list(_run(settings, steps=20, method="non-private"))[-1]
    assert "time limit" in final["status"]
    assert final["settings"]["cancelled"] is True and final["settings"]["steps"] == 1
    assert final["settings"]["epsilon"] == "inf" and "non-private: no guarantee" in final["result"]


# ----------------------------------------------------------------------------------------------- runs

def test_every_run_is_kept_compared_pinned_and_exported_as_a_csv_the_sweep_tab_reads(settings):
    private = list(_run(settings, steps=3))[-1]["summary"]
    public = list(_run(settings, steps=3, method="non-private"))[-1]["summary"]
    session = [runs.run_from_summary(private, 1)]
    session.append(runs.run_from_summary(public, runs.next_number(session)))
    assert [r["run"] for r in session] == [1, 2] and math.isinf(session[1]["epsilon"])
    view = runs.runs_view(session)
    assert list(view.columns) == list(runs.SHOWN.values())
    assert list(view["ε"]) == ["3", "∞"] and list(view["visual tokens"]) == ["16/64 (dual-priv)", "64/64 (none)"]
    assert view["accuracy"].iloc[0] == f"{100 * private['accuracy']:.1f}%"   # the format of every tab
    assert list(view["data set"]) == ["embedded", "embedded"] and view["verdict"].iloc[0] == "not scored"
    assert list(view["memory (MB)"])[0] == "withheld" and list(view["memory (MB)"])[1] != "withheld"
    session = runs.set_pins(session, [2])
    assert [r["pinned"] for r in session] == [False, True] and runs.runs_view(session)["pin"].tolist() == ["", "★"]
    shown = runs.refresh(settings, session)
    assert "2 run(s) this session, 1 pinned" in shown["status"]
    figure = shown["figure"]
    assert {t.name for t in figure.data} == {"Dual-Priv", "Non-private"}
    assert any(list(t.text) == ["#2"] for t in figure.data)  # the pinned run is numbered in the plot
    path = runs.export_runs(settings, session)
    table = pd.read_csv(path)
    assert list(table.columns) == runs.COLUMNS and table["epsilon"].tolist()[1] == math.inf
    # a private run's peak memory depends on its secret batch sizes: not in the CSV either
    assert math.isnan(table["peak_memory_mb"].iloc[0]) and table["peak_memory_mb"].iloc[1] > 0
    loaded = sweep.load_sweep_csv(path)  # the privacy–utility tab reads the export back
    assert "Loaded 2 runs of 2 method(s)" in loaded["status"] and loaded["figure"] is not None
    assert runs.clear_unpinned(session) == [session[1]]
    assert runs.refresh(settings, [])["figure"] is None


def test_a_sweep_adds_its_cells_to_the_runs():
    cells = pd.DataFrame(dict(method=["dp-sgd", "non-private"], epsilon=[2.0, "inf"], accuracy=[0.6, 0.7],
                              epsilon_spent=[1.9, math.inf], steps_done=[5, 5], wall_time_s=[3.0, 2.0], seed=[0, 0]))
    rows = runs.runs_from_sweep(cells, 4)
    assert [r["run"] for r in rows] == [4, 5] and [r["source"] for r in rows] == ["sweep", "sweep"]
    view = runs.runs_view(rows)
    assert math.isinf(rows[1]["epsilon"]) and list(view["kind"]) == ["sweep", "sweep"]
    assert list(view["data set"]) == ["embedded parity"] * 2 and list(view["accuracy"]) == ["60.0%", "70.0%"]
    assert view["verdict"].iloc[0] == "learned (p = 0.001)"   # 60 % of 297 against the majority class 51.2 %


def test_a_private_result_table_withholds_its_step_time_and_memory(settings):
    final = list(_run(settings, steps=3))[-1]
    assert "| peak memory | withheld for private runs" in final["result"]
    assert "| step time (median) | withheld for private runs" in final["result"] and "secret" in final["result"]
    assert "peak_memory_mb" not in final["settings"] and "step_time_s" not in final["settings"]
    written = json.loads(Path(final["download"]).read_text())
    assert "peak_memory_mb" not in written and all("step_time_s" not in row for row in written["history"])
    public = list(_run(settings, steps=3, method="non-private"))[-1]
    assert "withheld" not in public["result"] and "peak_memory_mb" in public["settings"]


# ----------------------------------------------------------------------------------------------- tokens

def test_tokens_view_counts_and_draws_the_tokens_of_a_test_image(settings):
    out = tokens.tokens_view(settings, 3, None, "dual-priv", BUDGET_RATIO, 0.75, 16)
    counts = out["counts"]
    assert counts["tokens_out"] == 16 and counts["patches_in"] == 64
    assert counts["cls"] + counts["kept"] + counts["fused"] == 16
    assert "64 patches -> 16 visual tokens" in html.unescape(out["status"])
    names = [trace.name or "" for trace in out["overlay"].data]
    assert any(n.startswith("kept") for n in names) and any(n.startswith("cluster 1: ") for n in names)
    assert out["histogram"] is not None
    out = tokens.tokens_view(settings, 0, None, "random", BUDGET_KEEP, None, 10)
    assert out["counts"]["tokens_out"] == 10 and out["counts"]["dropped"] == 54


def test_tokens_view_of_an_upload(settings, tmp_path):
    image = tmp_path / "photo.png"
    Image.new("RGB", (50, 40), (200, 30, 30)).save(image)
    out = tokens.tokens_view(settings, 0, str(image), "dual-priv", BUDGET_RATIO, 0.5, 16)
    assert out["counts"]["tokens_out"] == 32 and "photo.png" in out["counts"]["source"]


def test_tokens_view_says_the_decision_in_words_and_explains_the_score(settings):
    out = tokens.tokens_view(settings, 3, None, "dual-priv", BUDGET_KEEP, None, 16)
    c = out["counts"]
    fused_patches = 64 - c["kept"] - c["dropped"]
    assert (f"Kept {c['kept']} of 64 patches + [CLS]; {c['fused']} contextual tokens fuse the other "
            f"{fused_patches}. 16 visual tokens reach the LLM instead of 64.") in out["summary"]
    assert "attention the [CLS] token pays to each patch at layer" in out["summary"]
    assert out["scores"] is not None and out["original"].size == (32, 32)
    clusters = [t for t in out["overlay"].data if getattr(t, "legendgroup", None) == "clusters"]
    assert len(clusters) == c["fused"] and len({t.line.color for t in clusters}) == c["fused"]
    assert not any(t.name == "attention" for t in out["overlay"].data)  # the image is not under a tint
    out = tokens.tokens_view(settings, 3, None, "random", BUDGET_KEEP, None, 10)
    assert "Kept 10 of 64 patches; the other 54 are dropped." in out["summary"]
    assert out["scores"] is None and "does not score patches" in out["summary"]
    out = tokens.tokens_view(settings, 3, None, "none", BUDGET_RATIO, 0.75, 16)
    assert "Kept all 64 patches (no pruning)" in out["summary"] and "nothing is scored" in out["summary"]


def test_small_images_are_shown_enlarged_with_sharp_pixels():
    digit = Image.new("RGB", (32, 32))
    digit.putpixel((0, 0), (255, 255, 255))
    shown = images.enlarged(digit)
    assert shown.size == (256, 256) and shown.getpixel((7, 7)) == (255, 255, 255) and shown.getpixel((8, 8)) == (0, 0, 0)
    photo = Image.new("RGB", (300, 200))
    assert images.enlarged(photo) is photo


def test_a_non_square_upload_is_letterboxed_and_the_page_says_so(settings, tmp_path):
    image = tmp_path / "wide.png"
    Image.new("RGB", (300, 200), (255, 255, 255)).save(image)
    out = tokens.tokens_view(settings, 0, str(image), "dual-priv", BUDGET_RATIO, 0.75, 16)
    assert out["original"].size == (300, 200)  # shown as given, beside the overlay
    assert "letterboxed to 300×300 (black bars above and below, nothing stretched)" in out["summary"]
    rgb = out["overlay"].data[0].z
    assert rgb.shape[:2] == (32, 32)
    assert rgb[0].max() <= 1 and rgb[16].min() >= 250  # black bars at the top, the white photo in the middle


@pytest.mark.parametrize("content, words", [
    (b"this is not an image", "is not an image"),
    (b"\x89PNG\r\n\x1a\n broken", "is not an image"),
])
def test_tokens_view_refuses_a_non_image_upload_once_in_plain_words(settings, tmp_path, content, words):
    bad = tmp_path / "notes.png"
    bad.write_bytes(content)
    with pytest.warns(UserWarning) as warned:
        out = tokens.tokens_view(settings, 0, str(bad), "dual-priv", BUDGET_RATIO, 0.75, 16)
    _shown_once(warned, out["status"])
    assert out["overlay"] is None and out["counts"] is None
    assert words in out["status"] and "dp-error" in out["status"]
    message = re.sub("<[^>]+>", "", html.unescape(out["status"])).strip()
    assert "'notes.png'" in message and "Error" not in message and str(tmp_path) not in message
    assert message.endswith("image")  # ends saying what to upload, not with an exception class


@pytest.mark.parametrize("args, words", [
    ((0, None, "dual-priv", BUDGET_RATIO, 1.0, 16), "token prune ratio must be in [0, 1)"),
    ((0, None, "dual-priv", BUDGET_KEEP, 0.75, 0), "keep must be >= 1"),
    ((0, None, "nonsense", BUDGET_RATIO, 0.75, 16), "unknown token strategy"),
    ((999, None, "dual-priv", BUDGET_RATIO, 0.75, 16), "example must be an integer in [0, 296], got 999"),
    ((0, "/nonexistent/file.png", "dual-priv", BUDGET_RATIO, 0.75, 16), "missing"),
])
def test_tokens_view_bad_inputs(settings, args, words):
    with pytest.warns(UserWarning):
        out = tokens.tokens_view(settings, *args)
    assert out["overlay"] is None and words in html.unescape(out["status"])


# ----------------------------------------------------------------------------------------------- memory

def test_memory_is_measured_repeatedly_and_shown_with_its_spread(settings):
    updates = list(memory.memory(settings, ["dp-sgd", "dual-priv"], 2, 3, "dual-priv", BUDGET_RATIO, 0.75, 16, 0.2,
                                 preset="tiny", repeats=2))
    final = updates[-1]
    measured = final["measurements"]
    assert list(measured["method"]) == ["dp-sgd", "dual-priv"] and list(measured["repeats"]) == [2, 2]
    for column in ("peak_memory_mb", "peak_memory_mb_min", "peak_memory_mb_max", "step_time_s_min",
                   "memory_vs_dp_sgd", "memory_vs_dp_zo"):
        assert column in measured.columns
    assert (measured["peak_memory_mb_min"] <= measured["peak_memory_mb"]).all()
    assert (measured["peak_memory_mb"] <= measured["peak_memory_mb_max"]).all()
    assert measured.loc[measured.method == "dp-sgd", "memory_vs_dp_sgd"].iloc[0] == pytest.approx(1.0)
    table = final["table"]
    assert list(table.columns) == memory.TABLE_COLUMNS and len(table.columns) <= 8  # no sideways overflow
    assert list(table["tokens"]) == [64, 16] and "–" in table["peak MB min–max"].iloc[0]
    assert "measured 2 time(s), each in a fresh process" in final["note"]
    assert "Why DP-SGD with LoRA costs about what non-private training does" in final["note"]
    assert "per-example gradients" in final["note"] and " MB in fp32" in final["note"]
    assert final["figure"].data[0].error_y.array is not None  # min–max whiskers
    assert any("repeat 2/2" in u["status"] for u in updates)
    assert jobs.running_job("local") is None


def test_memory_status_says_which_phase_the_method_being_measured_is_in(settings, monkeypatch):
    """At the 7B shape one method runs for minutes: the status names its phase (model built, warm-up, the
    peak-memory step, timed steps) while it runs. The real bench runs; its worker is held at the peak-memory phase
    until the page has shown it, so the test does not depend on how fast this machine is."""
    shown = threading.Event()
    real_bench = memory.run_bench

    def held_bench(on_phase, **kwargs):
        def tell(method, text):
            on_phase(method, text)
            if "peak memory" in text:
                shown.wait(timeout=60)
        return real_bench(on_phase=tell, **kwargs)

    monkeypatch.setattr(memory, "run_bench", held_bench)
    statuses = []
    for update in memory.memory(settings, ["dual-priv"], 2, 3, "dual-priv", BUDGET_RATIO, 0.75, 16, 0.2,
                                preset="tiny"):
        statuses.append(html.unescape(update["status"]))
        if "measuring dual-priv on tiny" in statuses[-1] and "step 2 of 3 (peak memory)" in statuses[-1]:
            shown.set()
    assert shown.is_set(), statuses
    assert "measured 1 method(s)" in statuses[-1]


def test_memory_offers_presets_by_what_exists_and_the_paper_budget_on_576_tokens():
    assert memory.memory_presets(cuda=False)[:2] == ["tiny", "llava576"]
    assert "llava-7b-shape" not in memory.memory_presets(cuda=False)  # shape-only: only with a GPU
    assert "llava-7b-shape" in memory.memory_presets(cuda=True)
    assert memory.budget_for_preset("llava576") == (BUDGET_KEEP, 0.75, 64)      # 576 -> 64, as in the paper
    assert memory.budget_for_preset("tiny") == (BUDGET_RATIO, 0.75, 16)
    assert model.geometry_bundle("llava-7b-shape").n_patches == 576               # built on "meta": no memory


def test_memory_refuses_a_bad_preset_or_repeats_by_name(settings, nothing_starts):
    update = _only_update(memory.memory(settings, ["dp-sgd"], 2, 3, "dual-priv", BUDGET_RATIO, 0.75, 16, 0.2,
                                        preset="huge"))
    assert "unknown preset 'huge'" in html.unescape(update["status"])
    update = _only_update(memory.memory(settings, ["dp-sgd"], 2, 3, "dual-priv", BUDGET_KEEP, 0.75, 577, 0.2,
                                        preset="llava576"))
    assert "577" in html.unescape(update["status"])  # the budget is checked against the chosen preset's 576
    update = _only_update(memory.memory(settings, ["dp-sgd"], 2, 3, "dual-priv", BUDGET_RATIO, 0.75, 16, 0.2,
                                        preset="tiny", repeats=9))
    assert "repeats must be an integer in [1, 5]" in html.unescape(update["status"])


@pytest.mark.parametrize("args, words", [
    (([], 2, 3), "at least one method"),
    ((["dp-sgd"], 2, 2), "measured steps must be an integer >= 3"),
    ((["dp-sgd"], 0, 3), "batch size"),
    ((["sgd"], 2, 3), "unknown method(s) ['sgd']"),
])
def test_memory_bad_inputs(settings, nothing_starts, args, words):
    update = _only_update(memory.memory(settings, *args, "dual-priv", BUDGET_RATIO, 0.75, 16, 0.2, preset="tiny"))
    assert words in html.unescape(update["status"]) and update["table"] is None


# ----------------------------------------------------------------------------------------------- privacy-utility

def test_load_sweep_csv_draws_the_curve(tmp_path):
    path = tmp_path / "sweep.csv"
    pd.DataFrame(dict(method=["dp-sgd", "dp-sgd", "dual-priv", "dual-priv", "non-private"],
                      epsilon=[1.0, 3.0, 1.0, 3.0, "inf"], seed=[0] * 5,
                      accuracy=[0.5, 0.6, 0.55, 0.7, 0.9])).to_csv(path, index=False)
    out = sweep.load_sweep_csv(str(path))
    assert "Loaded 5 runs of 3 method(s)" in out["status"]
    assert out["figure"] is not None and len(out["table"]) == 5
    assert list(out["table"]["ε"]) == [1.0, 3.0, 1.0, 3.0, "∞"]
    assert list(out["table"]["accuracy"]) == ["50.0%", "60.0%", "55.0%", "70.0%", "90.0%"]
    assert out["figure"].layout.width is None  # fills the app's plot area


def test_load_sweep_csv_refuses_a_wrong_file(tmp_path):
    path = tmp_path / "other.csv"
    pd.DataFrame(dict(a=[1], b=[2])).to_csv(path, index=False)
    with pytest.warns(UserWarning):
        out = sweep.load_sweep_csv(str(path))
    assert "lacks column(s)" in out["status"] and out["figure"] is None
    binary = tmp_path / "image.csv"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.warns(UserWarning):
        out = sweep.load_sweep_csv(str(binary))
    assert out["figure"] is None and "not a readable CSV" in out["status"]
    negative = tmp_path / "negative.csv"
    pd.DataFrame(dict(method=["dp-sgd"], epsilon=[-1.0], accuracy=[0.5])).to_csv(negative, index=False)
    with pytest.warns(UserWarning):
        out = sweep.load_sweep_csv(str(negative))
    assert out["figure"] is None and "column 'epsilon'" in html.unescape(out["status"])


@pytest.mark.parametrize("args, words", [
    ((["dp-sgd"], "0, 3", 1, 2, 8), "every ε must be > 0"),
    ((["dp-sgd"], "one", 1, 2, 8), "not a number"),
    ((["dp-sgd"], "", 1, 2, 8), "at least one ε"),
    (([], "3", 1, 2, 8), "at least one method"),
    ((["dp-sgd"], "3", 6, 2, 8), "seeds must be an integer in [1, 5]"),
    ((["dp-sgd", "dual-priv"], "1,2,3,4,5", 3, 2, 8), "the app allows"),
])
def test_sweep_bad_inputs(settings, nothing_starts, args, words):
    update = _only_update(sweep.sweep(settings, *args))
    assert words in html.unescape(update["status"])


def test_small_sweep_runs(settings):
    final = list(sweep.sweep(settings, ["dual-priv"], "2", 1, 2, 8))[-1]
    assert "Sweep done: 1 of 1 runs" in final["status"], final["status"]
    table = final["table"]
    assert list(table["method"]) == ["Dual-Priv"] and list(table["ε"]) == [2.0]   # labels as in every tab
    assert 0 < table["ε spent"].iloc[0] <= 2.0 and table["accuracy"].iloc[0].endswith("%")
    assert list(table["memory (MB)"]) == ["withheld"]          # a private run's memory: secret batch sizes
    assert Path(final["download"]).is_file()
    assert final["figure"] is not None
    assert "Chance is 50%; with 32 test images a guesser lands within ± 17.7 points" in html.unescape(final["status"])
    assert any(shape.type == "rect" for shape in final["figure"].layout.shapes)  # the noise band is drawn
    assert jobs.running_job("local") is None


# ----------------------------------------------------------------------------------------------- the page

def test_defaults_are_a_run_that_learns(settings):
    demo = build_app(settings=AppSettings(**dict(TINY, max_steps=200)))
    by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    assert by_id["ft-steps"].value == finetune.DEFAULT_STEPS == 100 and by_id["sw-steps"].value == 100
    assert by_id["ft-batch"].value == finetune.DEFAULT_BATCH_SIZE and by_id["ft-compare"].value is True
    assert by_id["sw-eps"].value == sweep.DEFAULT_EPSILONS == "0.3, 1, 3" and by_id["mem-preset"].value == "llava576"


def test_build_app_wires_every_control_with_help(settings):
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


def test_empty_tables_are_headed_by_their_columns(settings):
    demo = build_app(settings=settings)
    tables = {b.elem_id: b for b in demo.blocks.values() if isinstance(b, gr.Dataframe)}
    assert set(tables) == {"mem-table", "sw-table", "runs-table", "yd-refused"}
    assert list(tables["yd-refused"].value["headers"]) == datasets.REFUSED_COLUMNS
    assert tables["mem-table"].headers == memory.TABLE_COLUMNS
    labels = [sweep.VIEW_LABELS[c] for c in sweep.SHOWN_COLUMNS]
    assert tables["sw-table"].headers == labels
    assert tables["sw-table"].postprocess(None).headers == labels  # a cleared table keeps them


def test_the_header_is_refreshed_after_every_job_that_may_train_the_warm_start(settings):
    demo = build_app(settings=settings)
    header = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "header")
    refreshes = {fn.trigger_after for fn in demo.fns.values() if header in fn.outputs and fn.trigger_after is not None}
    by_api = {fn.api_name: fn._id for fn in demo.fns.values()}
    assert {by_api["finetune"], by_api["tokens"], by_api["sweep"]} <= refreshes


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
    if "GRADIO_TEMP_DIR" not in os.environ or os.environ["GRADIO_TEMP_DIR"] == common.temp_root():
        assert Path(common.temp_root()).resolve().is_relative_to(Path(tempfile.gettempdir()).resolve())


# ----------------------------------------------------------------------------------------------- your data

def _photo_zip(tmp_path, bad_records: bool = True) -> Path:
    """A LLaVA zip made from scikit-learn's two sample photos, with a missing image and a duplicated image."""
    folder = tmp_path / "photos"
    paths = make_photo_dataset(folder, n_train=12, n_test=4)
    records = json.loads(Path(paths["train"]).read_text())
    if bad_records:
        turns = records[0]["conversations"]
        records.append({"id": "ghost", "image": "images/nowhere.png", "conversations": turns})
        records.append({"id": "copy", "image": records[1]["image"], "conversations": turns})
    Path(paths["train"]).write_text(json.dumps(records))
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for file in folder.rglob("*"):
            zf.write(file, Path("photos") / file.relative_to(folder))
    return archive


def test_a_data_zip_is_validated_and_every_refused_record_says_why(settings, tmp_path):
    out = yourdata.choose_data(settings, str(_photo_zip(tmp_path)), "")
    assert "Validated: 12 training record(s) accepted. 2 refused record(s) are left out." in html.unescape(
        out["status"])
    summary = out["summary"]
    assert "12 record(s) accepted, 2 refused" in summary and "'temple' (6)" in summary and "'flower' (6)" in summary
    assert "Evaluation file `test.json`:** 4 record(s) accepted" in summary and "one record = one image" in summary
    refused = out["refused"]
    assert list(refused["id"]) == ["ghost", "copy"]
    assert "not found in 'the data set's folder'" in refused["reason"].iloc[0]
    assert "share the image file" in refused["reason"].iloc[1]
    assert not any(str(settings.results_dir()) in reason for reason in refused["reason"])  # no server path shown
    assert out["data"]["train"].endswith("train.json") and out["data"]["eval"].endswith("test.json")


@pytest.mark.parametrize("member", ["../escaped.txt", "/tmp/absolute-escape.txt", "photos/../../escaped.txt"])
def test_a_zip_member_cannot_write_outside_its_folder(settings, tmp_path, member):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(member, "x")
    with pytest.warns(UserWarning):
        out = yourdata.choose_data(settings, str(archive), "")
    assert "points outside the zip's own folder" in html.unescape(out["status"]) and out["data"] is None
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/absolute-escape.txt").exists()


def _uploaded_files(settings) -> list:
    uploads = settings.results_dir() / "uploads"
    return [p for p in uploads.rglob("*")] if uploads.exists() else []


def test_a_refused_zip_leaves_no_file_and_its_reasons_are_sentences(settings, tmp_path):
    archive = tmp_path / "half.zip"
    with zipfile.ZipFile(archive, "w") as zf:   # ten good members are unpacked before the bad one is met
        for i in range(10):
            zf.writestr(f"photos/images/{i}.png", "x")
        zf.writestr("../escaped.txt", "x")
    with pytest.warns(UserWarning):
        out = yourdata.choose_data(settings, str(archive), "")
    assert out["data"] is None and _uploaded_files(settings) == []
    bad = tmp_path / "bad.zip"                  # valid zip, but its only record's image is not an image
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("photos/images/a.png", "not a picture")
        zf.writestr("photos/train.json", json.dumps([{"id": "a", "image": "images/a.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat ?"}, {"from": "gpt", "value": "x"}]}]))
    with pytest.warns(UserWarning):
        out = yourdata.choose_data(settings, str(bad), "")
    text = html.unescape(out["status"])
    assert "not an image that can be read" in text and "Error" not in text, text
    assert _uploaded_files(settings) == []
    assert (settings.results_dir() / "uploads").stat().st_mode & 0o777 == 0o700   # private to the server's user


def test_a_new_data_set_clears_the_previous_results(settings, tmp_path):
    out = yourdata.choose_data(settings, str(_photo_zip(tmp_path, bad_records=False)), "")
    assert out["data"] is not None
    for key, value in yourdata.CLEARED.items():   # the previous model, result, downloads and answers leave
        assert out[key] == value
    assert out["model"] is None and out["downloads"] is None and out["result"] == ""


def test_a_zip_with_a_symbolic_link_or_that_is_no_zip_is_refused(settings, tmp_path):
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("photos/train.json")
        info.external_attr = (0o120777 << 16)  # a symbolic link, pointing anywhere
        zf.writestr(info, "/etc/passwd")
    with pytest.warns(UserWarning):
        out = yourdata.choose_data(settings, str(archive), "")
    assert "symbolic link" in html.unescape(out["status"])
    text = tmp_path / "notes.zip"
    text.write_text("not a zip")
    with pytest.warns(UserWarning):
        out = yourdata.choose_data(settings, str(text), "")
    assert "is not a zip file" in html.unescape(out["status"])


def test_a_server_path_never_leaves_the_data_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    make_photo_dataset(root / "photos", n_train=4, n_test=2)
    make_photo_dataset(outside, n_train=4, n_test=2)
    (root / "link").symlink_to(outside, target_is_directory=True)
    settings = AppSettings(output_dir=str(tmp_path / "runs"), data_root=str(root), **TINY)
    assert "4 training record(s) accepted" in yourdata.choose_data(settings, None, "photos")["status"]
    for path in ("../outside", str(outside), "link", "photos/../../outside"):
        with pytest.warns(UserWarning):
            out = yourdata.choose_data(settings, None, path)
        message = html.unescape(out["status"])
        assert "must be relative to" in message and "stay inside it" in message and out["data"] is None, path
    with pytest.warns(UserWarning):
        out = yourdata.choose_data(AppSettings(output_dir=str(tmp_path / "runs"), **TINY), None, "photos")
    assert "launched without a data root" in html.unescape(out["status"])


def test_fine_tune_on_your_data_then_download_the_model_card_and_ask_the_model(settings, tmp_path):
    data = yourdata.choose_data(settings, str(_photo_zip(tmp_path, bad_records=False)), "")["data"]
    updates = list(yourdata.train_on_data(settings, data, "dual-priv", 2.0, 3, 4, session="your-data"))
    final = updates[-1]
    assert "Finished: 3 steps" in final["status"] and "exported" in final["status"]
    archive, card = final["downloads"]
    assert archive.endswith(".zip") and Path(card).name == "README.md"
    text = Path(card).read_text()
    spent = re.search(r"\*\*ε = ([0-9.]+)\*\* spent \(target 2\)", text)
    assert spent and 0 < float(spent.group(1)) <= 2.0
    assert f"{float(spent.group(1)):.4g}" in final["result"] or spent.group(1) in final["result"]
    assert "one record = one image" in final["result"] and "accuracy (your evaluation file)" in final["result"]
    assert "Load it with transformers alone" in final["result"] and ".from_pretrained(out" in final["result"]
    verdict = html.unescape(final["verdict"])  # read against the baselines of the user's own test.json
    assert "majority class 50.0%" in verdict and "chance 50.0% (2 answers)" in verdict and "of 4 test records" in verdict
    with zipfile.ZipFile(archive) as zf:
        assert {"README.md", "adapter_config.json", "dualpriv_export.json"} <= set(zf.namelist())
    photo = Image.open(next((tmp_path / "photos" / "images").glob("test-*")))
    out = yourdata.ask(settings, final["model"], photo, "which photo is this ?")
    assert re.search(r"\*\*Answer: (temple|flower)\*\*", out["answer"]) and "16 of 64 visual tokens" in out["answer"]
    assert out["overlay"] is not None and "16 visual tokens the model used" in out["overlay"].layout.title.text


def test_the_plan_of_a_run_on_your_data_counts_the_accepted_records_and_needs_no_model(settings, tmp_path,
                                                                                     monkeypatch):
    out = yourdata.choose_data(settings, str(_photo_zip(tmp_path)), "")   # 12 accepted, 2 refused
    assert out["data"]["records"] == 12 and out["plan"] == ""            # an old plan leaves with the old data
    monkeypatch.setattr(model, "prepare", lambda *a, **k: pytest.fail("the plan must not load the model"))
    text = html.unescape(yourdata.plan_for_data(settings, out["data"], "dual-priv", 3.0, 30, 4))
    assert "N = 12 records" in text and "q = 0.333" in text and "30 steps" in text and "σ = " in text
    assert "ε = 3 protects one record" in text and "noise σ·C/B" in text
    assert "dp-ok" in text or "dp-warn" in text                            # coloured by the measured verdict
    non_private = html.unescape(yourdata.plan_for_data(settings, out["data"], "non-private", 3.0, 30, 4))
    assert "plan: non-private" in non_private and "no guarantee" in non_private
    assert "No plan yet" in yourdata.plan_for_data(settings, None, "dual-priv", 3.0, 30, 4)
    assert "ε must be" in html.unescape(yourdata.plan_for_data(settings, out["data"], "dual-priv", -1, 30, 4))


def test_your_data_refuses_a_missing_data_set_model_or_question(settings):
    update = _only_update(yourdata.train_on_data(settings, None, "dual-priv", 2.0, 3, 4))
    assert "no data set chosen yet" in update["status"]
    with pytest.warns(UserWarning):
        out = yourdata.ask(settings, None, Image.new("RGB", (8, 8)), "which ?")
    assert "no trained model yet" in out["status"]


# ----------------------------------------------------------------------------------------------- audit

def test_the_audit_shows_the_lower_bound_next_to_the_reported_epsilon(settings):
    final = list(audit.audit(settings, "dp-sgd", "inf", 32))[-1]   # no noise: a run that leaks by design
    verdict, summary = final["verdict"], final["summary"]
    assert "ε reported by the accountant | ∞" in verdict and "empirical ε lower bound (95 %)" in verdict
    assert f"{summary['correct']} of {summary['guesses']} (32 canaries)" in verdict
    assert "proves nothing about privacy" in verdict and "never show more than ε" in verdict
    assert summary["epsilon_lower_bound"] <= summary["epsilon_ceiling"]


def test_the_audit_refuses_bad_inputs_by_name(settings, nothing_starts):
    update = _only_update(audit.audit(settings, "dp-sgd", "0", 32))
    assert "ε must be a finite number > 0" in html.unescape(update["status"])
    update = _only_update(audit.audit(settings, "dp-sgd", "1", 1))
    assert "canaries must be an integer in [2, 512]" in html.unescape(update["status"])
    update = _only_update(audit.audit(settings, "non-private", "1", 32))
    assert "unknown method" in html.unescape(update["status"])


def test_the_measured_study_is_shown_with_its_losing_configurations():
    report = dict(
        chosen={"DP-SGD": "DP-SGD", "Dual-Priv, equal wall-clock": "Dual-Priv, batch 256"},
        tuning=[dict(arm="DP-SGD", method="dp-sgd", mean=0.85, sem=0.01, count=2, steps=110, train_time_s=200.0),
                dict(arm="Dual-Priv, batch 256", method="dual-priv", mean=0.80, sem=0.02, count=2, steps=110,
                     train_time_s=60.0),
                dict(arm="Dual-Priv, random mask", method="dual-priv", mean=0.60, sem=0.03, count=2, steps=110,
                     train_time_s=40.0)],
        tasks=dict(parity=[dict(family="DP-SGD", arm="DP-SGD", epsilon=3.0, mean=85.0, se=1.0, seeds=5,
                                vs_dp_sgd=0.0, vs_dp_sgd_se=1.4),
                           dict(family="Dual-Priv, equal wall-clock", arm="Dual-Priv, batch 256", epsilon=3.0,
                                mean=80.0, se=1.0, seeds=5, vs_dp_sgd=-5.0, vs_dp_sgd_se=1.4)]))
    view = sweep.measured_study_view(report)
    assert "MISSED by 7.0 points" in view["markdown"] and "Dual-Priv, batch 256" in view["markdown"]
    assert list(view["tuning"].data[0].y) == ["Dual-Priv, random mask", "Dual-Priv, batch 256", "DP-SGD"]
    assert set(view["test"]) == {"parity"} and len(view["test"]["parity"].data) == 2
    empty = sweep.measured_study_view({})
    assert "has not been measured" in empty["markdown"] and empty["tuning"] is None


def test_an_audit_too_small_to_show_anything_says_so():
    summary = dict(epsilon_reported=float("inf"), epsilon_lower_bound=0.0, epsilon_ceiling=0.0, correct=4, guesses=4,
                   canaries=16, accuracy=0.5, violation=False)
    assert "This audit had no power" in audit.verdict_markdown(summary)
    assert "no power" not in audit.verdict_markdown(dict(summary, canaries=128, guesses=32, epsilon_ceiling=2.3))

"""`make gpu-bench-smoke`: the GPU table's code path runs end to end on a CPU (tiny preset, the GPU run's lean
settings), writes the JSON and the markdown table, records every cell, passes the bf16 checks, and a failing or
over-time cell is recorded instead of stopping the run; a cell and the checks come back from their subprocess;
and the wheels a GPU machine without internet needs are the pinned ones."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_bench.py"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_bench():
    return _load(SCRIPT, "gpu_bench")


def test_smoke_run_writes_the_table_with_every_cell_and_passing_bf16_checks(gpu_bench, tmp_path):
    result = gpu_bench.run(dict(gpu_bench.SMOKE, time_limit=300.0), tmp_path)
    # the table's four methods first, then DP-SGD with book-keeping (one backward) while time is left
    assert [(c["batch"], c["method"], c["status"]) for c in result["cells"]] == \
        [(2, m, "ok") for m in gpu_bench.METHODS] + [(2, "dp-sgd-bk", "ok")]
    assert all(c["record"]["peak_memory_mb"] > 0 and c["record"]["step_time_s"] > 0 for c in result["cells"])
    records = {c["method"]: c["record"] for c in result["cells"]}
    # the GPU run's lean settings, not the tiny preset's own: what runs on the GPU first ran here
    assert all(r["activation_checkpointing"] for r in records.values())
    assert records["dp-sgd"]["grad_sample_mode"] == records["dual-priv"]["grad_sample_mode"] == "ghost-fp32"
    assert records["dp-sgd-bk"]["grad_sample_mode"] == "ghost-fp32-bk" and records["dp-sgd-bk"]["method"] == "dp-sgd"
    assert records["dp-sgd"]["optimizer"] == "sgd" and records["dual-priv"]["visual_tokens"] == 16
    assert result["bf16_checks"]["ok"], result["bf16_checks"]
    written = json.loads(next(tmp_path.glob("gpu-*.json")).read_text())
    assert len(written["cells"]) == 5
    table = next(tmp_path.glob("gpu-*.md")).read_text()
    assert "| 2 | dual-priv | ok |" in table and "DP-SGD / non-private tokens/s" in table
    assert "DP-SGD book-keeping / non-private tokens/s" in table


def test_a_failing_cell_is_recorded_and_the_run_goes_on(gpu_bench, tmp_path, monkeypatch):
    def cell(kwargs):
        if kwargs["method"] == "dp-sgd":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if kwargs["method"] == "dual-priv":
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
        if kwargs["method"] == "dp-zo":
            raise ValueError("something else")
        return dict(peak_memory_mb=1.0, step_time_s=1.0, tokens_per_s=10.0)

    monkeypatch.setattr(gpu_bench, "_cell", cell)
    monkeypatch.setattr(gpu_bench, "bf16_checks", lambda **_: dict(ok=True))
    result = gpu_bench.run(dict(gpu_bench.SMOKE, time_limit=60.0), tmp_path)
    assert [c["status"] for c in result["cells"]] == ["ok", "oom", "oom", "error", "oom"]   # dp-sgd-bk is dp-sgd
    assert "| 2 | dp-sgd | oom |" in next(tmp_path.glob("gpu-*.md")).read_text()


def test_cells_that_would_pass_the_time_limit_are_skipped_not_started(gpu_bench, tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(gpu_bench, "_cell", lambda kwargs: started.append(kwargs["method"]) or dict(
        peak_memory_mb=1.0, step_time_s=1.0, tokens_per_s=1.0))
    result = gpu_bench.run(dict(gpu_bench.SMOKE, time_limit=0.5, min_cell_s=1.0), tmp_path)
    assert started == [] and {c["status"] for c in result["cells"]} == {"skipped (time limit)"}
    assert result["bf16_checks"] == {"status": "skipped (time limit)"}


def test_a_child_over_its_time_is_killed_and_recorded_as_timeout(gpu_bench):
    status, record, error = gpu_bench._child(["--cell", "{}"], timeout=0.01)
    assert (status, record) == ("timeout", None)


def test_the_checks_come_first_and_the_files_are_rewritten_after_every_cell(gpu_bench, tmp_path, monkeypatch):
    seen = []

    def cell(kwargs):   # what a run killed from outside during this cell would leave behind
        written = json.loads(next(tmp_path.glob("gpu-*.json")).read_text())
        seen.append((len(written["cells"]), written["bf16_checks"]))
        return dict(peak_memory_mb=1.0, step_time_s=1.0, tokens_per_s=10.0)

    def checks(**_):
        assert not list(tmp_path.glob("gpu-*.json")), "the checks ran after a cell"
        return dict(ok=True)

    monkeypatch.setattr(gpu_bench, "_cell", cell)
    monkeypatch.setattr(gpu_bench, "bf16_checks", checks)
    gpu_bench.run(dict(gpu_bench.SMOKE, time_limit=60.0), tmp_path)
    assert seen == [(i, dict(ok=True)) for i in range(len(gpu_bench.METHODS) + len(gpu_bench.EXTRA_CELLS))]


def test_a_cell_and_the_checks_come_back_from_their_own_subprocess(gpu_bench, tmp_path):
    mode = gpu_bench.SMOKE
    kwargs = dict(method="dual-priv", preset=mode["preset"], batch_size=2, steps=3, device="cpu", dtype="bfloat16",
                  lm_layers=None, vision_layers=None, **gpu_bench._lean_settings(mode))
    status, record, error = gpu_bench._child(["--cell", json.dumps(kwargs)], timeout=240)
    assert (status, error) == ("ok", "") and record["visual_tokens"] == 16 and record["peak_memory_mb"] > 0
    spec = dict(preset=mode["preset"], device="cpu", lm_layers=None, vision_layers=None)
    status, checks, error = gpu_bench._child(["--check", json.dumps(spec)], timeout=240)
    assert (status, error) == ("ok", "") and checks["ok"], checks


def test_the_wheels_for_a_gpu_machine_are_the_pinned_versions_without_the_images_cuda_stack():
    wheels = _load(ROOT / "benchmarks" / "gpu_wheels.py", "gpu_wheels")
    pinned = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert wheels.pins() == [p for name in ("transformers", "peft", "opacus", "imagehash") for p in pinned
                             if p.startswith(name + "==")]
    resolved = [("transformers", "5.0"), ("torch", "2.9.0"), ("nvidia-cublas-cu12", "12.6"),
                ("cuda-bindings", "12.9"), ("NumPy", "2.5"), ("opacus", "1.6.0"), ("typing_extensions", "4.16")]
    assert wheels.carried(resolved) == ["transformers==5.0", "opacus==1.6.0", "typing_extensions==4.16"]


def test_the_device_refuses_imported_libraries_other_than_the_pinned_versions(monkeypatch):
    wheels = _load(ROOT / "benchmarks" / "gpu_wheels.py", "gpu_wheels")
    assert "opacus 1.6.0" in wheels.check_imported_versions()   # this venv holds the pins
    stale = [spec if not spec.startswith("opacus==") else "opacus==1.5.4" for spec in wheels.pins()]
    monkeypatch.setattr(wheels, "pins", lambda: stale)
    with pytest.raises(SystemExit, match=r"'opacus': \('1.6.0', '1.5.4'\)"):
        wheels.check_imported_versions()


def test_the_device_script_without_wheels_says_what_to_run_and_stops(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_device.sh")], capture_output=True, text=True,
                          env=dict(os.environ, WHEELS=str(tmp_path / "none")), timeout=60)
    assert proc.returncode == 2 and "make gpu-wheels" in proc.stderr


def test_the_checks_are_given_at_most_their_own_limit_so_the_cells_keep_their_time(gpu_bench, monkeypatch):
    given = []
    monkeypatch.setattr(gpu_bench, "_child", lambda args, timeout: given.append(timeout) or ("timeout", None, "k"))
    assert gpu_bench._checks(gpu_bench.FULL, left=450.0) == dict(status="timeout", error="k")
    assert gpu_bench._checks(gpu_bench.FULL, left=60.0)["status"] == "timeout"
    assert given == [gpu_bench.FULL["check_limit_s"], 60.0] and gpu_bench.FULL["check_limit_s"] <= 120


def test_the_device_training_smoke_records_a_failing_run_and_goes_on(tmp_path):
    smoke = _load(ROOT / "benchmarks" / "train_smoke.py", "train_smoke")
    runs = {"broken": dict(method="no-such-method"), "resumed": dict(method="dual-priv", update_mask="past-noisy",
                                                                     grad_prune_ratio=0.5, resume=True)}
    result = smoke.run("cpu", tmp_path, time_limit=120.0, runs=runs)
    broken, resumed = result["runs"]
    assert broken["status"] == "error" and "no-such-method" in broken["error"]
    assert resumed["status"] == "ok" and resumed["steps"] == smoke.BASE["steps"] and resumed["epsilon_spent"] <= 8
    assert json.loads(next(tmp_path.glob("train-smoke-*.json")).read_text())["runs"][1]["status"] == "ok"
    assert set(smoke.RUNS) >= {"non-private", "dp-sgd, hooks", "dual-priv, hooks", "dp-zo"}

"""`make gpu-bench-smoke`: the GPU table's code path runs end to end on a CPU (tiny preset), writes the JSON and
the markdown table, records every cell, passes the bf16 checks, and a failing or over-time cell is recorded
instead of stopping the run."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_bench.py"


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_bench"] = module
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_the_table_with_every_cell_and_passing_bf16_checks(gpu_bench, tmp_path):
    result = gpu_bench.run(dict(gpu_bench.SMOKE, time_limit=300.0), tmp_path)
    assert [(c["batch"], c["method"], c["status"]) for c in result["cells"]] == \
        [(2, m, "ok") for m in gpu_bench.METHODS]
    assert all(c["record"]["peak_memory_mb"] > 0 and c["record"]["step_time_s"] > 0 for c in result["cells"])
    assert result["bf16_checks"]["ok"], result["bf16_checks"]
    written = json.loads(next(tmp_path.glob("gpu-*.json")).read_text())
    assert len(written["cells"]) == 4
    table = next(tmp_path.glob("gpu-*.md")).read_text()
    assert "| 2 | dual-priv | ok |" in table and "DP-SGD / non-private tokens/s" in table


def test_a_failing_cell_is_recorded_and_the_run_goes_on(gpu_bench, tmp_path, monkeypatch):
    def cell(kwargs):
        if kwargs["method"] == "dp-sgd":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if kwargs["method"] == "dp-zo":
            raise ValueError("something else")
        return dict(peak_memory_mb=1.0, step_time_s=1.0, tokens_per_s=10.0)

    monkeypatch.setattr(gpu_bench, "_cell", cell)
    monkeypatch.setattr(gpu_bench, "bf16_checks", lambda **_: dict(ok=True))
    result = gpu_bench.run(dict(gpu_bench.SMOKE, time_limit=60.0), tmp_path)
    assert [c["status"] for c in result["cells"]] == ["ok", "oom", "ok", "error"]
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

"""Every notebook in notebooks/ runs top to bottom in quick mode (DUALPRIV_QUICK=1) and is committed clean."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
TIMEOUT_S = 300          # per cell; a quick-mode notebook takes well under a minute
EXPECTED = ["01_quickstart", "02_privacy_utility", "03_visual_tokens", "04_memory", "05_ablation", "06_your_data",
            "07_privacy_audit"]


def _kernel_name() -> str:
    """A kernel running this interpreter (the venv): install its spec into the venv if it is missing."""
    from jupyter_client.kernelspec import KernelSpecManager

    specs = KernelSpecManager().find_kernel_specs()
    if "python3" not in specs:
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--sys-prefix"], check=True,
                       capture_output=True)
    return "python3"


def test_all_notebooks_present():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path):
    import nbformat

    book = nbformat.read(path, as_version=4)
    nbformat.validate(book)
    for cell in book.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear the outputs"
    text = "\n".join(c.source for c in book.cells)
    assert "one record = one source image" in text, f"{path.name} must state the privacy unit"
    assert "is_quick" in text, f"{path.name} must honour DUALPRIV_QUICK"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_quick_mode(path, tmp_path, tmp_path_factory, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("DUALPRIV_QUICK", "1")
    # the session's quick-sweep folder, shared with tests/test_viz_figures.py (a sweep cell is trained once a session)
    monkeypatch.setenv("DUALPRIV_OUT", str(tmp_path_factory.getbasetemp() / "quick-sweeps"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if Path("/usr/bin/chromium").exists():
        monkeypatch.setenv("BROWSER_PATH", "/usr/bin/chromium")
    book = nbformat.read(path, as_version=4)
    client = NotebookClient(book, timeout=TIMEOUT_S, kernel_name=_kernel_name(), allow_errors=False,
                            resources={"metadata": {"path": str(tmp_path)}})
    started = time.perf_counter()
    client.execute()                                   # raises CellExecutionError on the first failing cell
    elapsed = time.perf_counter() - started
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    assert not errors
    assert elapsed < 150, f"{path.name} took {elapsed:.0f}s in quick mode: shrink it"

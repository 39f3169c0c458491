"""The audit command of the README runs as written (issue 20: it failed with "give steps or epochs" because the
command line ignored the audit's own schedule, AUDIT_DEFAULTS)."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from toolkit.audit import AUDIT_DEFAULTS
from toolkit.cli import build_parser, main
from toolkit.cli.audit import audit_config

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_audit_command() -> list[str]:
    """The README's ``python -m toolkit audit ...`` line, as argv for :func:`toolkit.cli.main`."""
    lines = [line for line in README.read_text().splitlines() if line.startswith("python -m toolkit audit ")]
    assert len(lines) == 1, "the README shows one audit command"
    return shlex.split(lines[0])[3:]


def test_the_readme_audit_command_gets_the_audit_schedule():
    config = audit_config(build_parser().parse_args(readme_audit_command())).resolved()
    for name, value in AUDIT_DEFAULTS.items():
        assert getattr(config, name) == value, name
    assert config.method == "dp-sgd" and config.epsilon == 1.0


def test_flags_still_win_over_the_audit_schedule():
    config = audit_config(build_parser().parse_args(["audit", "--steps", "7", "--lr", "0.01"]))
    assert (config.lr, config.steps, config.expected_batch_size) == (0.01, 7, AUDIT_DEFAULTS["expected_batch_size"])


@pytest.mark.slow
def test_the_readme_audit_command_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # its --json audit.json lands here
    assert main(readme_audit_command() + ["--progress", "false"]) == 0
    record = json.loads((tmp_path / "audit.json").read_text())
    assert record["canaries"] == 128 and record["guesses"] == 32 and record["steps"] == AUDIT_DEFAULTS["steps"]
    assert record["epsilon_lower_bound"] <= record["epsilon_reported"] <= 1.0

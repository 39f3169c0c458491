"""Sweep files: a :class:`~toolkit.sweeps.plan.Sweep` from a mapping or a ``.yaml``/``.yml``/``.json`` file.

Contract: the keys are ``name``, ``base``, ``grid``, ``seeds``, ``description`` and ``quick`` (see ``configs/``
for examples); anything else, and any config error of the sweep itself (checked by planning it), raises
``ValueError`` naming the file, before anything runs.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from toolkit.sweeps.plan import Sweep, plan_sweep

SWEEP_KEYS = ("name", "base", "grid", "seeds", "description", "quick")


def sweep_from_dict(data: dict, name: str | None = None) -> Sweep:
    """A :class:`Sweep` from a mapping with the keys :data:`SWEEP_KEYS` (``name`` falls back to ``name=``),
    validated by planning it."""
    if not isinstance(data, dict):
        raise ValueError(f"sweep config must be a mapping ({', '.join(SWEEP_KEYS)}), got {type(data).__name__}")
    unknown = sorted(set(data) - set(SWEEP_KEYS))
    if unknown:
        raise ValueError(f"sweep config: unknown key(s) {unknown}; expected {sorted(SWEEP_KEYS)}")
    name = data.get("name") or name
    if not name:
        raise ValueError("sweep config: give a 'name'")
    sweep = Sweep(name=name, base=dict(data.get("base") or {}), grid=dict(data.get("grid") or {}),
                  seeds=data.get("seeds", [0]), description=data.get("description", ""),
                  quick=data.get("quick") or {})
    plan_sweep(sweep)  # validate now, so the caller can name the file in the message
    return sweep


def load_sweep_config(path: str | os.PathLike) -> Sweep:
    """Read a sweep from a ``.yaml``/``.yml`` or ``.json`` file (see ``configs/`` for examples).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` (prefixed with the path) for a file that
    does not parse or does not describe a valid sweep. The sweep's name defaults to the file's stem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep config {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise ValueError(f"sweep config {str(path)!r}: use a .yaml, .yml or .json file")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"sweep config {str(path)!r} does not parse: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"sweep config {str(path)!r} must hold a mapping ({', '.join(SWEEP_KEYS)})")
    try:
        return sweep_from_dict(data, name=path.stem)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err

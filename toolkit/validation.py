"""One home for input checks: each raises ``ValueError`` with a message that names the input and what it got.

The privacy modules keep their own narrow checks next to the maths they protect (:mod:`toolkit.privacy`); every
other layer (config, CLI, dashboard, data) uses these.

Example::

    >>> from toolkit.validation import check_fraction
    >>> check_fraction("token_prune_ratio", 0.75)
    0.75
    >>> check_fraction("token_prune_ratio", 1.5)
    Traceback (most recent call last):
    ...
    ValueError: token_prune_ratio must be in [0, 1), got 1.5
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_number(name: str, value, *, integer: bool = False) -> float | int:
    """A number a person typed (a UI field, a CLI or text value): ``3``, ``"2.5"``, ``" 1e-5 "``, ``"inf"``.

    Empty (None or blank text), bool, NaN and text that is not a number raise ``ValueError`` naming ``name``.
    With ``integer``, a whole number comes back as an ``int`` (``2.0`` -> ``2``); anything else comes back as
    parsed, for :func:`check_int` to refuse. Ranges are the ``check_*`` functions' job.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{name} is empty: enter a number")
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if math.isnan(number):
        raise ValueError(f"{name} must be a number, got NaN")
    if integer and math.isfinite(number) and number == int(number):
        return int(number)
    return number


def check_number(name: str, value, *, minimum: float | None = None, strict: bool = True,
                 allow_inf: bool = False) -> float:
    """A real number (not bool, not NaN), finite unless ``allow_inf``, above ``minimum`` (``>=`` if not strict)."""
    ok = _is_number(value) and not math.isnan(value) and (allow_inf or math.isfinite(value))
    if ok and minimum is not None:
        ok = value > minimum if strict else value >= minimum
    if not ok:
        bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum:g}"
        raise ValueError(f"{name} must be a {'' if allow_inf else 'finite '}number{bound}, got {value!r}")
    return float(value)


def check_int(name: str, value, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer (not bool) within ``[minimum, maximum]``."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and minimum is not None:
        ok = value >= minimum
    if ok and maximum is not None:
        ok = value <= maximum
    if not ok:
        if minimum is not None and maximum is not None:
            bound = f" in [{minimum}, {maximum}]"
        elif minimum is not None:
            bound = f" >= {minimum}"
        else:
            bound = f" <= {maximum}" if maximum is not None else ""
        raise ValueError(f"{name} must be an integer{bound}, got {value!r}")
    return value


def check_fraction(name: str, value, *, include_one: bool = False, include_zero: bool = True) -> float:
    """A number in [0, 1) (or [0, 1] with ``include_one``; (0, 1) without ``include_zero``, e.g. δ)."""
    ok = (_is_number(value) and (0.0 <= value if include_zero else 0.0 < value)
          and (value <= 1.0 if include_one else value < 1.0))
    if not ok:
        interval = f"{'[' if include_zero else '('}0, 1{']' if include_one else ')'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return float(value)


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {tuple(choices)}")
    return value


def inside_folder(folder: str | os.PathLike, relative: str, what: str = "path") -> Path:
    """``folder / relative`` resolved, refused unless it stays inside ``folder`` (no ``..``, no absolute path,
    no symlink out). The error names the path but never says whether something exists outside the folder."""
    root = Path(folder).resolve()
    candidate = Path(relative)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise ValueError(f"{what} {relative!r} must be relative to {str(folder)!r} and stay inside it")
    resolved = (root / candidate).resolve()
    if resolved != root and root not in resolved.parents:
        raise ValueError(f"{what} {relative!r} must be relative to {str(folder)!r} and stay inside it")
    return resolved


def check_writable_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """Fail before a long run if ``path`` cannot be written (its folder is created if missing)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a directory")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{what} {str(path)!r} is not writable")
    _probe_folder(path, what)
    return path


def check_output_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Fail before a long run unless ``path`` can become a new folder of results: it is absent or empty, and a
    file can be created next to it (probed for real: permissions, read-only disks and root all answer)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a file, not a folder")
    if path.is_dir() and any(path.iterdir()):
        raise ValueError(f"{what} {str(path)!r} already exists and is not empty: choose a new folder")
    _probe_folder(path, what)
    return path


def _probe_folder(path: Path, what: str) -> None:
    """Create ``path``'s folder if missing and write (then delete) a probe file in it: a real write, because
    ``os.access`` says yes to root and on some read-only mounts."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path.parent)
    except OSError as err:
        raise ValueError(f"{what} {str(path)!r} cannot be written ({err.strerror or err})") from None
    os.close(handle)
    os.unlink(probe)

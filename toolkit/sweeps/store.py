"""Where finished cells live: one JSON file per cell, written atomically; read back as one DataFrame.

Contract:

* :func:`write_cell` stores one result row as ``<folder>/<cell_id>.json``: the JSON goes to a temporary file
  in the same folder (``.<cell_id>.<random>.tmp``), is flushed and fsync'ed, then renamed over the final name
  with ``os.replace`` (atomic on POSIX and Windows) and the folder is fsync'ed. A crash leaves either the
  whole old file, the whole new file, or no file, never a torn one; at worst a stray ``*.tmp`` file, which
  readers ignore. Several workers may write into one folder at once (each cell is its own file).
* The files are strict JSON: ``inf``/``nan`` floats are written as the strings ``"inf"``, ``"-inf"``, ``"nan"``
  (:func:`toolkit.vocabulary.epsilon_to_json`). On reading, a column whose values are all numbers or those
  strings becomes a float column again (the rule ``pandas.read_csv`` applies to a CSV).
* :func:`read_results` reads every ``<folder>/*.json`` into one DataFrame, one row per cell, rows in plan
  order (``cell``, then ``cell_id``), columns in a stable order (:func:`column_order`). A file that is not a
  result (bad JSON, not an object, a ``cell_id`` that does not match its name) raises :class:`CorruptResultError`
  naming the file. A missing folder reads as an empty frame.
* :func:`export_csv` writes a DataFrame, or a results folder, as one CSV for people and spreadsheets. The CSV
  is an export: nothing reads it back to resume.
"""
from __future__ import annotations

import json
import math
import os
import re
import uuid
from pathlib import Path

import pandas as pd

from toolkit.sweeps.plan import CONFIG_FIELDS
from toolkit.validation import check_writable_file
from toolkit.vocabulary import strict_json

META_COLUMNS = ("cell_id", "sweep", "cell", "label")
RESULT_COLUMNS = (
    "accuracy", "epsilon_spent", "noise_multiplier", "sample_rate", "steps_done", "final_loss", "peak_memory_mb",
    "memory_method", "step_time_s", "wall_time_s", "trainable_params", "updated_params", "kept_fraction",
    "visual_tokens", "visual_tokens_in", "fusion_sigma", "n_records", "cancelled", "device", "finished_at",
)
_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
# a cell_id becomes a file name: no separators, no dots, nothing a shell or another OS would trip on
_CELL_ID = re.compile(r"[0-9A-Za-z_-]+")


class CorruptResultError(ValueError):
    """A file in a results folder that is not a readable result; the message names the file and the fix."""


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Replace ``path`` with ``text`` atomically: a temp file in the same folder, flush + fsync, ``os.replace``,
    then fsync the folder. On any error the temp file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp"
    # os.open with mode 0o666 honours the umask (tempfile.mkstemp would make every result file owner-only)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # also Ctrl-C: never leave our temp file behind when we can remove it
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def write_json_atomic(path: str | os.PathLike, data) -> Path:
    """Write ``data`` as strict JSON (non-finite floats as strings) to ``path`` with :func:`write_text_atomic`."""
    text = json.dumps(strict_json(data), indent=2, ensure_ascii=False, allow_nan=False, default=str) + "\n"
    return write_text_atomic(path, text)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the data itself is already synced
    finally:
        os.close(fd)


def cell_file(folder: str | os.PathLike, cell_id: str) -> Path:
    """``<folder>/<cell_id>.json``; ``ValueError`` for a ``cell_id`` that is not a plain file name."""
    if not isinstance(cell_id, str) or not _CELL_ID.fullmatch(cell_id):
        raise ValueError(f"cell_id must be letters, digits, '-' or '_' (it names a file), got {cell_id!r}")
    return Path(folder) / f"{cell_id}.json"


def write_cell(folder: str | os.PathLike, row: dict) -> Path:
    """Store one finished cell's row (it must have a ``cell_id``) atomically as ``<folder>/<cell_id>.json``."""
    if not isinstance(row, dict) or "cell_id" not in row:
        raise ValueError("a result row must be a dict with a 'cell_id'")
    return write_json_atomic(cell_file(folder, row["cell_id"]), row)


def _read_cell(path: Path) -> dict:
    fix = "delete it and run the sweep again to redo that cell"
    try:
        row = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CorruptResultError(f"result file {str(path)!r} is not UTF-8 text; {fix}") from None
    except json.JSONDecodeError as err:
        raise CorruptResultError(f"result file {str(path)!r} is not valid JSON ({err.msg} at line {err.lineno}, "
                                 f"column {err.colno}); {fix}") from None
    if not isinstance(row, dict):
        raise CorruptResultError(f"result file {str(path)!r} holds a {type(row).__name__}, not a result "
                                 f"object; {fix}")
    if row.get("cell_id") != path.stem:
        raise CorruptResultError(f"result file {str(path)!r} has cell_id {row.get('cell_id')!r}, not "
                                 f"{path.stem!r} as its name says; {fix}")
    return row


def _decode_non_finite(rows: list[dict]) -> None:
    """In place: turn "inf"/"-inf"/"nan" back into floats in the columns that are numeric (see the contract)."""
    columns = dict.fromkeys(k for row in rows for k in row)
    for column in columns:
        values = [row[column] for row in rows if row.get(column) is not None]
        words = [v for v in values if isinstance(v, str) and v in _NON_FINITE]
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if words and len(words) + len(numbers) == len(values):
            for row in rows:
                if isinstance(row.get(column), str) and row[column] in _NON_FINITE:
                    row[column] = _NON_FINITE[row[column]]


def column_order(columns) -> list[str]:
    """The stable order of result columns: :data:`META_COLUMNS`, then the bundled-axis and tag columns (in the
    order given), then the ``TrainConfig`` fields, then :data:`RESULT_COLUMNS`; each name once (``device`` is a
    field and a result: the row holds the device the run used, in the field's place). Only names in ``columns``."""
    columns = list(columns)
    present = set(columns)
    known = (*META_COLUMNS, *CONFIG_FIELDS, *RESULT_COLUMNS)
    extras = [c for c in dict.fromkeys(columns) if c not in known]
    return list(dict.fromkeys([*(c for c in META_COLUMNS if c in present), *extras,
                               *(c for c in (*CONFIG_FIELDS, *RESULT_COLUMNS) if c in present)]))


def finished_cell_ids(folder: str | os.PathLike) -> set[str]:
    """The ``cell_id`` of every result file in ``folder``, each file checked (see :func:`read_results`)."""
    return {row["cell_id"] for row in _read_rows(Path(folder))}


def _read_rows(folder: Path) -> list[dict]:
    if not folder.exists():
        return []
    if not folder.is_dir():
        raise ValueError(f"results folder {str(folder)!r} is a file, not a folder")
    # a name starting with '.' is a temporary file of a write in progress (or one cut short): never a result
    return [_read_cell(p) for p in sorted(folder.glob("*.json")) if not p.name.startswith(".") and p.is_file()]


def read_results(folder: str | os.PathLike) -> pd.DataFrame:
    """Every finished cell in ``folder`` as one DataFrame (see the module contract). Missing folder: no rows,
    with the columns :data:`META_COLUMNS`, the ``TrainConfig`` fields and :data:`RESULT_COLUMNS`."""
    rows = _read_rows(Path(folder))
    if not rows:
        return pd.DataFrame(columns=column_order((*META_COLUMNS, *CONFIG_FIELDS, *RESULT_COLUMNS)))
    _decode_non_finite(rows)
    rows.sort(key=lambda r: (r["cell"] if isinstance(r.get("cell"), int) else math.inf, r["cell_id"]))
    columns = column_order(k for row in rows for k in row)
    return pd.DataFrame.from_records(rows, columns=columns)


def export_csv(results: pd.DataFrame | str | os.PathLike, path: str | os.PathLike) -> Path:
    """Write ``results`` (a DataFrame, or a results folder read with :func:`read_results`) as a CSV at ``path``
    (replaced atomically; ``inf`` as ``inf``, missing values empty, lists and dicts as JSON). Returns ``path``."""
    df = results if isinstance(results, pd.DataFrame) else read_results(results)
    path = check_writable_file(path, "CSV file")
    table = df.copy()
    for column in table.columns:
        if table[column].dtype == object:
            table[column] = [json.dumps(strict_json(v), ensure_ascii=False) if isinstance(v, (dict, list, tuple)) else v
                             for v in table[column]]
    return write_text_atomic(path, table.to_csv(index=False, lineterminator="\n"))

"""Sweeps: a grid of :class:`~toolkit.train.TrainConfig` runs, cell by cell, into one tidy DataFrame.

A :class:`Sweep` is a ``base`` config (any ``TrainConfig`` fields), a ``grid`` (field -> list of values; the
cells are the Cartesian product) and ``seeds``. :func:`plan_sweep` expands it, normalises each cell, skips
invalid combinations **by rule** (:data:`RULES`, listed below, never by catching a training error), and keys
every cell by a stable hash of its resolved config. :func:`run_sweep` trains the cells one at a time and appends
each finished row to ``OUT_DIR/<name>.csv`` the moment it finishes, so a crash or a Ctrl-C loses at most the
cell that was running; running the same sweep again skips every cell whose key is already in the CSV.

Example (about a minute on a CPU)::

    >>> from toolkit.experiments import Sweep, run_sweep
    >>> sweep = Sweep("demo", base=dict(warm_start_steps=0, train_limit=32, eval_limit=32, steps=2),
    ...               grid=dict(method=["non-private", "dp-sgd"], epsilon=[1.0, 8.0]), seeds=[0])
    >>> df = run_sweep(sweep, "artifacts/sweeps", progress=False)   # doctest: +SKIP
    >>> len(df)   # non-private runs once, at ε = ∞ (normalisation N1)                  # doctest: +SKIP
    3

Grid axes
---------
* ``field: [v1, v2, ...]`` with ``field`` a ``TrainConfig`` field: one value per cell.
* ``name: [{...}, {...}]`` with ``name`` *not* a field: a **bundled axis**; each value is a dict of several
  fields set together (e.g. ``{lora_rank: 5, grad_prune_ratio: 0.0}``), plus optional ``label`` (the value of
  column ``name``; default ``"k=v, ..."``) and ``tags`` (a dict of extra columns, e.g. ``updated_params``).

Normalisations (N1 before a cell is resolved, N2-N3 after; equal configs then collapse into one cell)
------------------------------------------------------------------------------------------------------
* N1 ``non-private`` ignores ε: its ``epsilon`` is set to ``inf`` (one non-private cell, shown at ε = ∞).
* N2 ``token_strategy`` ``none`` (given, or the default of every method but ``dual-priv``) feeds every token:
  ``keep_tokens``, ``token_prune_ratio``, ``contextual_tokens`` and ``token_layer`` are cleared (so a budget in
  ``base`` meant for Dual-Priv neither changes the key nor shows up in the rows of the other methods).
* N3 ``contextual_tokens: 0`` on a strategy that never fuses is the same as leaving it unset.

Rules (a cell that matches one is *skipped*, with the rule's name and reason kept in :class:`SweepPlan`)
-------------------------------------------------------------------------------------------------------
* R1 ``update-pruning-needs-dp-sgd``: ``grad_prune_ratio > 0`` needs ``dp-sgd`` or ``dual-priv``. Update pruning
  zeroes coordinates of the *noisy DP-SGD gradient*; non-private training refuses it and DP-ZO has no gradient
  vector to prune (its update is a scalar times one random direction), so such a cell would silently repeat the
  ``grad_prune_ratio = 0`` cell.
* R2 ``fusion-noise-needs-fused-tokens``: fusion noise is added to the contextual (fused) tokens only; with no
  fused tokens (``contextual_tokens: 0`` or a strategy that never fuses) it is a no-op and the cell repeats the
  noise-off cell.
* R3 ``matched-fusion-noise-needs-dp-noise``: ``fusion_noise_std: matched`` is σ·C/B from the DP noise
  multiplier σ, which is 0 for ``non-private`` and at ε = ∞: a no-op again.
* R4 ``budget-exceeds-patches``: ``keep_tokens`` larger than the preset's patch count (e.g. 576 on ``tiny``,
  whose tower yields 64), so one budget list can serve several presets.
* R5 ``contextual-tokens-need-fusing-strategy``: ``contextual_tokens > 0`` with a strategy that never fuses.

A config error (unknown field, bad value, both ``keep_tokens`` and ``token_prune_ratio``) is not a combination
to skip: :func:`plan_sweep` raises ``ValueError`` for it before anything runs.

Cell key
--------
``cell_id`` = the first 12 hex digits of SHA-256 over the canonical JSON of the *resolved* config (every
``TrainConfig`` field after :meth:`TrainConfig.resolved`, ints in float fields written as floats, ``inf`` as
``"inf"``), leaving out the fields that cannot change a result (:data:`UNKEYED_FIELDS`). So ``epsilon: 3`` and
``epsilon: 3.0``, or ``method: dual-priv`` with and without an explicit ``token_strategy: dual-priv``, are one
cell; adding a field to ``TrainConfig`` changes every key (finished cells then re-run: the safe side).

Columns of the DataFrame / CSV (one row per finished cell)
----------------------------------------------------------
``cell_id``, ``sweep``, ``cell`` (index in the plan), ``label`` (a short description), one column per bundled
axis and tag, **every** ``TrainConfig`` field (resolved; ``epsilon`` is the target), then the results:
``accuracy``, ``epsilon_spent``, ``noise_multiplier``, ``sample_rate``, ``steps_done``, ``final_loss``,
``peak_memory_mb``, ``memory_method``, ``step_time_s``, ``wall_time_s``, ``trainable_params``,
``updated_params`` (coordinates a step may update: ``round((1 - grad_prune_ratio) * trainable_params)`` for the
DP-SGD methods, ``trainable_params`` otherwise), ``kept_fraction`` (mean over steps, DP-SGD methods),
``visual_tokens``, ``visual_tokens_in``, ``fusion_sigma`` (the σ_fuse actually used), ``n_records``,
``cancelled``, ``device``, ``finished_at``. See :data:`RESULT_COLUMNS`.

Privacy unit: one training record = one source image (the embedded private split has one record per image);
``epsilon_spent`` is per record, hence per image.
"""
from __future__ import annotations

import csv
import dataclasses
import difflib
import functools
import hashlib
import io
import itertools
import json
import math
import os
import typing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from toolkit.train import METHODS, PRIVATE_METHODS, TrainConfig

QUICK_ENV = "DUALPRIV_QUICK"
HASH_VERSION = 1
UNKEYED_FIELDS = ("progress", "checkpoint_path", "eval_batch_size")
META_COLUMNS = ("cell_id", "sweep", "cell", "label")
RESULT_COLUMNS = (
    "accuracy", "epsilon_spent", "noise_multiplier", "sample_rate", "steps_done", "final_loss", "peak_memory_mb",
    "memory_method", "step_time_s", "wall_time_s", "trainable_params", "updated_params", "kept_fraction",
    "visual_tokens", "visual_tokens_in", "fusion_sigma", "n_records", "cancelled", "device", "finished_at",
)
BUNDLE_KEYS = ("label", "tags")
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))

# Settings that make any sweep run in a second or two per cell on a CPU: for CI and for trying a sweep out. The
# model is not warm-started (warm_start_steps=0), so accuracies are near chance: quick mode checks the plumbing
# only. The RDP accountant replaces the (tighter, default) PRV one because calibrating σ with PRV takes seconds
# per cell; a small sampling rate (4 / 64) keeps Opacus' RDP fast too.
QUICK_BASE = dict(warm_start_steps=0, train_limit=64, eval_limit=32, steps=2, expected_batch_size=4,
                  epochs=None, accountant="rdp", progress=False)


def is_quick() -> bool:
    """True when ``$DUALPRIV_QUICK`` is set to 1/true/yes (notebooks and CI shrink steps, grids and limits)."""
    return os.environ.get(QUICK_ENV, "").strip().lower() in ("1", "true", "yes", "on")


# ------------------------------------------------------------------------------------------------ the sweep

@dataclass
class Sweep:
    """A grid of training runs.

    Attributes:
        name: names the output files (``<name>.csv``); letters, digits, ``-``, ``_`` and ``.``.
        base: ``TrainConfig`` fields shared by every cell.
        grid: axis -> list of values (a ``TrainConfig`` field, or a bundled axis of dicts, see the module doc).
        seeds: one cell per seed for every grid point (sets ``TrainConfig.seed``).
        description: what question the sweep answers (kept in the plan file).
        quick: overrides applied by :meth:`quick_version`: ``{"base": {...}, "grid": {...}, "seeds": [...]}``.
    """

    name: str
    base: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)
    seeds: list = field(default_factory=lambda: [0])
    description: str = ""
    quick: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.name or any(not (ch.isalnum() or ch in "-_.") for ch in self.name):
            raise ValueError(f"sweep name {self.name!r} must be non-empty letters, digits, '-', '_' or '.'")
        if isinstance(self.seeds, int):
            self.seeds = [self.seeds]
        self.seeds = [int(s) for s in self.seeds]
        if not self.seeds:
            raise ValueError("a sweep needs at least one seed")
        if "seed" in self.grid or "seed" in self.base:
            raise ValueError("give seeds with Sweep(seeds=[...]), not as a 'seed' field in base or grid")
        for axis, values in self.grid.items():
            if not isinstance(values, (list, tuple)) or len(values) == 0:
                raise ValueError(f"grid axis {axis!r} must be a non-empty list of values, got {values!r}")

    def quick_version(self) -> "Sweep":
        """The same sweep shrunk for CI: :data:`QUICK_BASE`, then this sweep's own ``quick`` overrides."""
        base = {**self.base, **QUICK_BASE, **self.quick.get("base", {})}
        grid = {**self.grid, **self.quick.get("grid", {})}
        seeds = self.quick.get("seeds", self.seeds[:1])
        return Sweep(f"{self.name}-quick", base=base, grid=grid, seeds=seeds,
                     description=self.description + " (quick mode: tiny settings, accuracies near chance)")

    def to_dict(self) -> dict:
        return dict(name=self.name, description=self.description, base=self.base, grid=self.grid,
                    seeds=self.seeds, quick=self.quick)


@dataclass
class Cell:
    """One run of a sweep: its key, its resolved config and the labels it is shown with."""

    index: int
    cell_id: str
    config: TrainConfig
    label: str
    columns: dict = field(default_factory=dict)   # bundled-axis labels and tags


@dataclass
class Skipped:
    """A combination not run, and why (``rule`` is one of :data:`RULES` or ``duplicate``)."""

    label: str
    rule: str
    reason: str


@dataclass
class SweepPlan:
    sweep: Sweep
    cells: list
    skipped: list

    def summary(self) -> dict:
        return dict(name=self.sweep.name, cells=len(self.cells), skipped=len(self.skipped),
                    skipped_cells=[dataclasses.asdict(s) for s in self.skipped])


# ------------------------------------------------------------------------------------- rules and expansion

def _strategy_spec(name: str):
    from toolkit.tokens import STRATEGIES

    if name not in STRATEGIES:
        raise ValueError(f"unknown token strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    return STRATEGIES[name]


def preset_patches(preset: str) -> int | None:
    """Patches the preset's vision tower yields (None for an unknown preset, e.g. a local model)."""
    from toolkit.models import PRESETS

    spec = PRESETS.get(preset)
    return None if spec is None else (spec["image_size"] // spec["patch_size"]) ** 2


def _has_fused_tokens(c: TrainConfig) -> bool:
    """Whether the pruner of this resolved config will feed any contextual (fused) token."""
    if c.token_strategy == "none":
        return False
    spec = _strategy_spec(c.token_strategy)
    if spec.default_contextual is None or c.contextual_tokens == 0:
        return False
    if c.contextual_tokens is not None:
        return c.contextual_tokens > 0
    n_patches = preset_patches(c.preset) if not c.model_dir else None
    if n_patches is None:
        return True  # a local model: assume the default fuses
    from toolkit.tokens import resolve_keep

    keep = resolve_keep(c.token_strategy, n_patches, c.keep_tokens, c.token_prune_ratio)
    return spec.default_contextual(keep) > 0


def _rule_update_pruning(c: TrainConfig) -> str | None:
    if c.grad_prune_ratio and c.method not in ("dp-sgd", "dual-priv"):
        return (f"grad_prune_ratio={c.grad_prune_ratio} with method {c.method!r}: update pruning acts on the noisy "
                "DP-SGD gradient (dp-sgd / dual-priv only)")
    return None


def _rule_fusion_noise(c: TrainConfig) -> str | None:
    if c.fusion_noise_std and not _has_fused_tokens(c):
        return (f"fusion_noise_std={c.fusion_noise_std!r} but strategy {c.token_strategy!r} with contextual_tokens="
                f"{c.contextual_tokens} feeds no fused token: the noise would be a no-op")
    return None


def _rule_matched_noise(c: TrainConfig) -> str | None:
    if c.fusion_noise_std == "matched" and (c.method not in PRIVATE_METHODS or math.isinf(c.epsilon)):
        return "fusion_noise_std='matched' is 0 without DP noise (non-private or ε = ∞): a no-op"
    return None


def _rule_budget(c: TrainConfig) -> str | None:
    n_patches = None if c.model_dir else preset_patches(c.preset)
    if c.keep_tokens is not None and n_patches is not None and c.keep_tokens > n_patches:
        return f"keep_tokens={c.keep_tokens} exceeds the {n_patches} patches of preset {c.preset!r}"
    return None


def _rule_contextual(c: TrainConfig) -> str | None:
    if c.contextual_tokens and c.token_strategy != "none" and _strategy_spec(c.token_strategy).default_contextual is None:
        return f"contextual_tokens={c.contextual_tokens} but strategy {c.token_strategy!r} never fuses tokens"
    return None


# name -> rule(resolved config) -> reason to skip, or None. Documented in the module docstring (R1-R5).
RULES: dict[str, Callable[[TrainConfig], str | None]] = {
    "update-pruning-needs-dp-sgd": _rule_update_pruning,
    "fusion-noise-needs-fused-tokens": _rule_fusion_noise,
    "matched-fusion-noise-needs-dp-noise": _rule_matched_noise,
    "budget-exceeds-patches": _rule_budget,
    "contextual-tokens-need-fusing-strategy": _rule_contextual,
}


def _normalise(values: dict) -> dict:
    """Normalisation N1 (module docstring) on a raw cell dict."""
    v = dict(values)
    if v.get("method", TrainConfig.method) == "non-private":
        v["epsilon"] = math.inf
    return v


def _normalise_resolved(c: TrainConfig) -> TrainConfig:
    """Normalisations N2-N3 (module docstring) on a resolved config."""
    if c.token_strategy == "none":
        return dataclasses.replace(c, keep_tokens=None, token_prune_ratio=None, contextual_tokens=None,
                                   token_layer=None)
    if c.contextual_tokens == 0 and _strategy_spec(c.token_strategy).default_contextual is None:
        return dataclasses.replace(c, contextual_tokens=None)
    return c


_FLOAT_FIELDS = {name for name, hint in typing.get_type_hints(TrainConfig).items()
                 if float in (typing.get_args(hint) or (hint,))}


def _parse_value(name: str, value):
    """Values from YAML/JSON/CLI: 'inf' for floats, ints in float fields as floats, lists as-is."""
    if isinstance(value, str) and name in _FLOAT_FIELDS and value.strip().lower() in ("inf", "infinity", "∞", ".inf"):
        return math.inf
    if name in _FLOAT_FIELDS and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _check_fields(names, where: str) -> None:
    unknown = [n for n in names if n not in CONFIG_FIELDS]
    if unknown:
        hints = []
        for n in unknown:
            close = difflib.get_close_matches(n, CONFIG_FIELDS, n=1)
            hints.append(f"{n!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"{where}: unknown TrainConfig field(s) {', '.join(hints)}")


def config_key(config: TrainConfig) -> str:
    """The stable 12-hex-digit key of a resolved config (see the module docstring)."""
    d = {k: v for k, v in config.to_dict().items() if k not in UNKEYED_FIELDS}
    canon = {}
    for k, v in d.items():
        v = _parse_value(k, v)
        if isinstance(v, float) and not math.isfinite(v):
            v = "inf" if v > 0 else ("-inf" if v < 0 else "nan")
        canon[k] = v
    text = json.dumps(dict(v=HASH_VERSION, config=canon), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _axis_points(sweep: Sweep) -> list[list[tuple[str, object]]]:
    axes = []
    for axis, values in sweep.grid.items():
        if axis in CONFIG_FIELDS:
            axes.append([(axis, _parse_value(axis, v)) for v in values])
            continue
        for value in values:
            if not isinstance(value, dict):
                raise ValueError(f"grid axis {axis!r} is not a TrainConfig field, so it must be a bundled axis whose "
                                 f"values are dicts of fields; got {value!r}"
                                 + _did_you_mean(axis))
            _check_fields([k for k in value if k not in BUNDLE_KEYS], f"bundled axis {axis!r}")
        axes.append([(axis, v) for v in values])
    return axes


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name, CONFIG_FIELDS, n=1)
    return f" (did you mean the field {close[0]!r}?)" if close else ""


def _fmt(value) -> str:
    if isinstance(value, float):
        return "∞" if math.isinf(value) else f"{value:g}"
    return str(value)


def plan_sweep(sweep: Sweep) -> SweepPlan:
    """Expand, normalise, apply :data:`RULES`, key and de-duplicate; raise ``ValueError`` on a config error."""
    _check_fields(sweep.base, f"sweep {sweep.name!r} base")
    base = {k: _parse_value(k, v) for k, v in sweep.base.items()}
    axes = _axis_points(sweep)
    cells, skipped, seen = [], [], {}
    for point in itertools.product(*axes, [("seed", s) for s in sweep.seeds]):
        values, columns, parts = dict(base), {}, []
        for axis, value in point:
            if axis in CONFIG_FIELDS:
                values[axis] = value
                parts.append(f"{'seed' if axis == 'seed' else axis}={_fmt(value)}")
            else:
                fields = {k: _parse_value(k, v) for k, v in value.items() if k not in BUNDLE_KEYS}
                values.update(fields)
                label = value.get("label") or ", ".join(f"{k}={_fmt(v)}" for k, v in fields.items())
                columns[axis] = label
                columns.update(value.get("tags") or {})
                parts.append(str(label))
        label = " | ".join(parts)
        values = _normalise(values)
        try:
            config = TrainConfig(**values)
        except TypeError as err:  # unknown keyword: already checked, but keep the message readable
            raise ValueError(f"cell {label}: {err}") from err
        try:
            resolved = config.resolved()
        except ValueError as err:
            raise ValueError(f"sweep {sweep.name!r}, cell {label}: {err}") from err
        resolved = _normalise_resolved(resolved)
        if resolved.keep_tokens is not None and resolved.token_prune_ratio is not None:
            raise ValueError(f"sweep {sweep.name!r}, cell {label}: both keep_tokens and token_prune_ratio are set; "
                             "give one budget (clear the other in base)")
        reason = next(((name, why) for name, rule in RULES.items() if (why := rule(resolved))), None)
        if reason:
            skipped.append(Skipped(label, *reason))
            continue
        key = config_key(resolved)
        if key in seen:
            skipped.append(Skipped(label, "duplicate", f"same resolved config as cell {seen[key]!r}"))
            continue
        seen[key] = label
        cells.append(Cell(len(cells), key, resolved, label, columns))
    return SweepPlan(sweep, cells, skipped)


def expand(sweep: Sweep) -> list[TrainConfig]:
    """The resolved configs the sweep will run, in order (invalid and duplicate combinations left out)."""
    return [cell.config for cell in plan_sweep(sweep).cells]


# --------------------------------------------------------------------------------------------- the CSV store

def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return "inf" if value == math.inf else ("-inf" if value == -math.inf else repr(value))
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return str(value)


def _repair_tail(path: Path) -> None:
    """Drop a partial last line (a crash in the middle of a write): every kept line is a whole row."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n")
    with open(path, "r+b") as fh:
        fh.truncate(cut + 1 if cut >= 0 else 0)


def _header(path: Path) -> list[str] | None:
    if not path.is_file() or path.stat().st_size == 0:
        return None
    with open(path, newline="", encoding="utf-8") as fh:
        return next(csv.reader(fh), None)


def append_row(path: str | os.PathLike, row: dict) -> None:
    """Append one row to a CSV, durably (flush + fsync); widen the header first if the row has new columns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _repair_tail(path)
    header = _header(path)
    if header is not None and [k for k in row if k not in header]:
        old = pd.read_csv(path, dtype=str, keep_default_na=False)
        header = header + [k for k in row if k not in header]
        tmp = path.with_suffix(path.suffix + ".tmp")
        old.reindex(columns=header, fill_value="").to_csv(tmp, index=False)
        os.replace(tmp, path)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if header is None:
        header = list(row)
        writer.writerow(header)
    writer.writerow([_csv_value(row.get(k)) for k in header])
    with open(path, "a", newline="", encoding="utf-8") as fh:
        fh.write(buffer.getvalue())  # one write per row
        fh.flush()
        os.fsync(fh.fileno())


def read_results(path: str | os.PathLike) -> pd.DataFrame:
    """Read a sweep CSV (a partial last line, from a crash, is ignored). Missing file: an empty DataFrame."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame(columns=list(META_COLUMNS))
    _repair_tail(path)
    # keys are hex strings: never let pandas read "0123..." as a number or "12e45..." as a float
    return pd.read_csv(path, dtype={"cell_id": str, "label": str, "sweep": str})


def sweep_csv(sweep: Sweep | str, out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / f"{sweep if isinstance(sweep, str) else sweep.name}.csv"


# -------------------------------------------------------------------------------------------------- running

def _result_row(cell: Cell, sweep: Sweep, result) -> dict:
    c = cell.config
    row = dict(cell_id=cell.cell_id, sweep=sweep.name, cell=cell.index, label=cell.label, **cell.columns)
    row.update(c.to_dict())
    history = result.history
    losses = history["loss"].dropna() if "loss" in history else pd.Series(dtype=float)
    kept = history["kept_fraction"].dropna() if "kept_fraction" in history else pd.Series(dtype=float)
    dp_sgd = c.method in ("dp-sgd", "dual-priv")
    row.update(
        accuracy=result.accuracy, epsilon_spent=result.epsilon_spent, noise_multiplier=result.noise_multiplier,
        sample_rate=result.sample_rate, steps_done=result.steps,
        final_loss=float(losses.iloc[-1]) if len(losses) else None, peak_memory_mb=result.peak_memory_mb,
        memory_method=result.memory_method, step_time_s=result.step_time_s, wall_time_s=result.wall_time_s,
        trainable_params=result.trainable_params,
        updated_params=round((1 - (c.grad_prune_ratio if dp_sgd else 0.0)) * result.trainable_params),
        kept_fraction=float(kept.mean()) if len(kept) else None, visual_tokens=result.visual_tokens,
        visual_tokens_in=result.visual_tokens_in, fusion_sigma=result.extra.get("fusion_noise_std"),
        n_records=result.extra.get("n_records"), cancelled=result.cancelled,
        device="cuda" if torch.cuda.is_available() else "cpu",
        finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    return row


def run_sweep(sweep: Sweep, out_dir: str | os.PathLike, progress: bool = True,
              callback: Callable[[dict], bool | None] | None = None, on_error: str = "raise",
              step_callback: Callable[[dict], bool | None] | None = None, parquet: bool = False) -> pd.DataFrame:
    """Run every cell not yet in ``out_dir/<name>.csv``; return one row per finished cell of this sweep.

    Args:
        sweep: the :class:`Sweep` (see :func:`load_sweep_config`, :func:`named_sweep`).
        out_dir: where ``<name>.csv`` (results, appended row by row) and ``<name>.plan.json`` (the expanded
            plan, skipped cells and their reasons) go.
        progress: a tqdm bar over cells (the per-run bars stay off unless ``base`` sets ``progress: true``).
        callback: ``callback(event)`` after each cell; ``event`` has ``kind`` (``"cached"``: already in the CSV,
            not re-run; ``"done"``: just trained; ``"failed"``), ``index``, ``n_cells``, ``cell_id``, ``label``,
            ``row`` (the result dict; None for ``failed``), ``error``. Returning ``False`` stops the sweep after
            that cell (the rows so far are kept and returned).
        on_error: ``"raise"`` (default; finished rows are already on disk) or ``"continue"`` (a failed cell is
            reported through ``callback`` and not written, so the next run retries it).
        step_callback: passed to :func:`toolkit.train.train` as its per-step callback.
        parquet: also write ``<name>.parquet`` (needs pyarrow).

    Returns:
        DataFrame with the columns documented in the module docstring, in plan order, read back from the CSV
        (so a fresh and a resumed run return identical frames).
    """
    from tqdm.auto import tqdm

    import toolkit.train as train_module

    if on_error not in ("raise", "continue"):
        raise ValueError(f"on_error must be 'raise' or 'continue', got {on_error!r}")
    plan = plan_sweep(sweep)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_csv(sweep, out_dir)
    plan_file = out_dir / f"{sweep.name}.plan.json"
    plan_file.write_text(json.dumps(dict(sweep=sweep.to_dict(), **plan.summary(),
                                         cell_ids={c.cell_id: c.label for c in plan.cells}),
                                    indent=2, default=_csv_value))
    done = set(read_results(path).get("cell_id", pd.Series(dtype=str)).astype(str))
    n = len(plan.cells)
    cached = sum(c.cell_id in done for c in plan.cells)
    bar = tqdm(total=n, initial=cached, desc=f"sweep {sweep.name}", unit="cell", disable=not progress)
    stop = False
    try:
        for cell in plan.cells:
            event = dict(index=cell.index, n_cells=n, cell_id=cell.cell_id, label=cell.label, row=None, error=None)
            if cell.cell_id in done:
                event["kind"] = "cached"
            else:
                bar.set_postfix_str(cell.label[:60])
                config = cell.config
                if "progress" not in sweep.base:
                    config = dataclasses.replace(config, progress=False)
                try:
                    result = train_module.train(config, callback=step_callback)
                except Exception as err:  # noqa: BLE001 - reported, then re-raised or skipped per on_error
                    if on_error == "raise":
                        raise
                    event.update(kind="failed", error=f"{type(err).__name__}: {err}")
                else:
                    row = _result_row(cell, sweep, result)
                    append_row(path, row)
                    done.add(cell.cell_id)
                    event.update(kind="done", row=row)
                bar.update(1)
            if callback is not None and callback(event) is False:
                stop = True
                break
    finally:
        bar.close()
    df = sweep_results(sweep, out_dir, plan=plan)
    if parquet:
        try:
            df.to_parquet(out_dir / f"{sweep.name}.parquet", index=False)
        except ImportError as err:
            raise ImportError(f"parquet output needs pyarrow ({err}); the CSV {path} is complete") from err
    if stop:
        df.attrs["stopped"] = True
    return df


def sweep_results(sweep: Sweep, out_dir: str | os.PathLike, plan: SweepPlan | None = None) -> pd.DataFrame:
    """The finished rows of ``sweep`` in ``out_dir`` (plan order), without running anything."""
    plan = plan or plan_sweep(sweep)
    df = read_results(sweep_csv(sweep, out_dir))
    order = {c.cell_id: c.index for c in plan.cells}
    if "cell_id" not in df or df.empty:
        return df.iloc[0:0]
    df = df[df["cell_id"].isin(order)].drop_duplicates("cell_id", keep="last")
    df = df.assign(cell=df["cell_id"].map(order)).sort_values("cell").reset_index(drop=True)
    return df


# ------------------------------------------------------------------------------------------------ configs

def sweep_from_dict(data: dict, name: str | None = None) -> Sweep:
    """A :class:`Sweep` from a mapping with ``name``, ``base``, ``grid``, ``seeds``, ``description``, ``quick``."""
    allowed = {"name", "base", "grid", "seeds", "description", "quick"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"sweep config: unknown key(s) {unknown}; expected {sorted(allowed)}")
    name = data.get("name") or name
    if not name:
        raise ValueError("sweep config: give a 'name'")
    quick = data.get("quick") or {}
    bad = sorted(set(quick) - {"base", "grid", "seeds"})
    if bad:
        raise ValueError(f"sweep config: unknown key(s) under 'quick': {bad}; expected base, grid, seeds")
    sweep = Sweep(name=name, base=dict(data.get("base") or {}), grid=dict(data.get("grid") or {}),
                  seeds=data.get("seeds", [0]), description=data.get("description", ""), quick=quick)
    plan_sweep(sweep)  # validate now, with the file's name in the message
    return sweep


def load_sweep_config(path: str | os.PathLike) -> Sweep:
    """Read a sweep from ``.yaml``/``.yml`` or ``.json`` (see ``configs/`` for examples)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep config {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    elif path.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        raise ValueError(f"sweep config {str(path)!r}: use a .yaml, .yml or .json file")
    if not isinstance(data, dict):
        raise ValueError(f"sweep config {str(path)!r} must hold a mapping (name, base, grid, seeds)")
    try:
        return sweep_from_dict(data, name=path.stem)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


# ----------------------------------------------------------------------------------- LoRA rank vs pruning

@functools.lru_cache(maxsize=None)
def trainable_count(preset: str, trainable: str, lora_rank: int) -> int:
    """Trainable parameters of ``preset`` in ``trainable`` mode at ``lora_rank`` (built and counted, no training)."""
    from toolkit.models import apply_trainable, build_model

    return int(apply_trainable(build_model(preset), trainable, lora_rank))


def matched_lora_rank(preset: str, trainable: str, rank: int, grad_prune_ratio: float) -> dict:
    """The LoRA rank whose trainable count best matches ``rank`` with update pruning at ``grad_prune_ratio``.

    With global update pruning a step updates U = round((1 - p) · N(r)) coordinates, N(r) the trainable count
    at rank r. N is affine in r: N(r) = N_fixed + r · N_per_rank (projector and head are fixed; every LoRA pair
    on a d_in x d_out linear adds r · (d_in + d_out)); both terms are measured by building the model at two ranks.
    The matched rank r' >= 1 minimises |N(r') - U|; it is *not* round(r · (1 - p)), because the fixed part is
    pruned too. ``r_prime`` is None when even rank 1 updates more than U (the fixed part alone exceeds U).

    Returns dict(rank, grad_prune_ratio, updated_params=U, n_fixed, n_per_rank, r_prime, r_prime_params,
    mismatch (relative)).
    """
    if not 0 < grad_prune_ratio < 1:
        raise ValueError(f"grad_prune_ratio must be in (0, 1), got {grad_prune_ratio}")
    n1, n2 = trainable_count(preset, trainable, 1), trainable_count(preset, trainable, 2)
    per_rank, fixed = n2 - n1, n1 - (n2 - n1)
    target = round((1 - grad_prune_ratio) * (fixed + rank * per_rank))
    ideal = (target - fixed) / per_rank if per_rank else 0
    candidates = [r for r in {math.floor(ideal), math.ceil(ideal)} if 1 <= r <= rank]
    r_prime = min(candidates, key=lambda r: (abs(fixed + r * per_rank - target), r)) if candidates else None
    if r_prime is None and ideal > rank:
        r_prime = rank
    params = None if r_prime is None else fixed + r_prime * per_rank
    return dict(rank=rank, grad_prune_ratio=grad_prune_ratio, updated_params=target, n_fixed=fixed,
                n_per_rank=per_rank, r_prime=r_prime, r_prime_params=params,
                mismatch=None if params is None else (params - target) / target)


def lora_rank_arms(preset: str = "tiny", trainable: str = "lora+head", rank: int = 8,
                   ratios=(0.1, 0.2, 0.3), max_mismatch: float = 0.05) -> list[dict]:
    """Bundled-axis values for the ``lora-rank`` sweep: the reference (rank r, no pruning), and for each ratio p
    the pair "rank r + update pruning p" vs "rank r' without pruning" at (nearly) equal updated parameters
    (see :func:`matched_lora_rank`). A ratio whose best match is off by more than ``max_mismatch`` gives no
    pair (documented, not silently approximated)."""
    full = trainable_count(preset, trainable, rank)
    arms = [dict(label=f"r={rank}, no pruning", lora_rank=rank, grad_prune_ratio=0.0,
                 tags=dict(pair="reference", arm_kind="reference", updated_params_target=full))]
    for p in ratios:
        m = matched_lora_rank(preset, trainable, rank, p)
        if m["r_prime"] is None or abs(m["mismatch"]) > max_mismatch:
            continue
        pair = f"{(1 - p) * 100:.0f}% updated"
        arms.append(dict(label=f"r={rank}, prune {p:g}", lora_rank=rank, grad_prune_ratio=p,
                         tags=dict(pair=pair, arm_kind="update pruning", updated_params_target=m["updated_params"])))
        arms.append(dict(label=f"r={m['r_prime']}, no pruning", lora_rank=m["r_prime"], grad_prune_ratio=0.0,
                         tags=dict(pair=pair, arm_kind="lower rank", updated_params_target=m["r_prime_params"])))
    return arms


# ------------------------------------------------------------------------------------------- named sweeps

EPSILONS = (0.5, 1.0, 3.0, 8.0, math.inf)

# The recipe measured on the embedded task (shared/MEASURED.md): warm-started tiny model, parity task on the
# private split (700 records, one per source image), expected batch 128, 20 epochs, C = 1, δ = 1e-5.
FULL_BASE = dict(preset="tiny", task="parity", expected_batch_size=128, epochs=20.0, delta=1e-5,
                 max_grad_norm=1.0, trainable="lora+head", lora_rank=8)


def _privacy_utility(preset: str) -> Sweep:
    return Sweep(
        "privacy-utility", base=dict(FULL_BASE, preset=preset),
        grid=dict(method=list(METHODS), epsilon=list(EPSILONS)), seeds=[0, 1, 2],
        description="Accuracy of the four methods across ε (one record = one source image); non-private once, "
                    "at ε = ∞ (N1).",
        quick=dict(grid=dict(epsilon=[1.0, math.inf])),
    )


def _ablation(preset: str) -> Sweep:
    return Sweep(
        "ablation", base=dict(FULL_BASE, preset=preset, method="dual-priv", epsilon=3.0),
        grid=dict(token_strategy=["dual-priv", "dual-priv-random"], contextual_tokens=[None, 0],
                  fusion_noise_std=["matched", None], grad_prune_ratio=[0.2, 0.0]),
        seeds=[0, 1, 2],
        description="Dual-Priv at ε = 3 with each mechanism on/off: [CLS]-attention vs random selection (same "
                    "layout), contextual fusion (default k vs 0), fusion noise ('matched' vs off; heuristic, "
                    "outside the DP guarantee), update pruning (0.2 vs 0). Noise without fused tokens is skipped "
                    "(R2), so 12 of the 16 combinations run.",
        # quick: selection x update pruning only (fusion and matched noise on), 4 cells
        quick=dict(grid=dict(contextual_tokens=[None], fusion_noise_std=["matched"])),
    )


def _budget(preset: str) -> Sweep:
    n = preset_patches(preset) or 64
    keeps = [16, 24, 32, 48, 64] if n <= 64 else [32, 64, 128, 192, 288, 576]
    return Sweep(
        "budget", base=dict(FULL_BASE, preset=preset, method="dual-priv", epsilon=3.0, token_prune_ratio=None),
        grid=dict(token_strategy=["dual-priv", "dual-priv-random", "random", "pool"], keep_tokens=keeps),
        seeds=[0, 1, 2],
        description=f"Accuracy vs visual tokens fed to the LLM ({n} patches in), per selection strategy, "
                    "Dual-Priv at ε = 3.",
        quick=dict(grid=dict(token_strategy=["dual-priv", "random"], keep_tokens=[keeps[0], keeps[-1]])),
    )


def _lora_rank(preset: str) -> Sweep:
    trainable = FULL_BASE["trainable"]
    return Sweep(
        "lora-rank", base=dict({k: v for k, v in FULL_BASE.items() if k != "lora_rank"}, preset=preset,
                                method="dual-priv", epsilon=3.0, pruned_state="freeze"),
        grid=dict(arm=lora_rank_arms(preset, trainable, 8)), seeds=[0, 1, 2],
        description="LoRA rank 8 with update pruning p vs a lower rank r' without pruning, at equal updated "
                    "parameters per step (r' from measured trainable counts, see matched_lora_rank). "
                    "pruned_state='freeze', so a pruned coordinate does not move by Adam momentum either: "
                    "exactly (1 - p) of the trainable coordinates change per step.",
        quick=dict(grid=dict(arm=lora_rank_arms(preset, trainable, 8, ratios=(0.2,)))),
    )


NAMED_SWEEPS: dict[str, Callable[[str], Sweep]] = {
    "privacy-utility": _privacy_utility,
    "ablation": _ablation,
    "budget": _budget,
    "lora-rank": _lora_rank,
}


def named_sweep(name: str, quick: bool | None = None, preset: str = "tiny", **base) -> Sweep:
    """A built-in sweep (:data:`NAMED_SWEEPS`): ``privacy-utility``, ``ablation``, ``budget``, ``lora-rank``.

    Args:
        quick: shrink it for CI (:meth:`Sweep.quick_version`); default: :func:`is_quick`.
        preset: the model preset (``tiny``; ``llava576`` for LLaVA-1.5's 576 visual tokens).
        base: extra ``TrainConfig`` fields applied on top (after the quick settings).
    """
    if name not in NAMED_SWEEPS:
        raise ValueError(f"unknown named sweep {name!r}; choose one of {sorted(NAMED_SWEEPS)}")
    sweep = NAMED_SWEEPS[name](preset)
    if quick if quick is not None else is_quick():
        sweep = sweep.quick_version()
    if base:
        _check_fields(base, "named_sweep overrides")
        sweep = dataclasses.replace(sweep, base={**sweep.base, **base})
    return sweep


def summarize(df: pd.DataFrame, by, value: str = "accuracy") -> pd.DataFrame:
    """Mean, standard deviation (over seeds), standard error and count of ``value`` per group ``by``."""
    by = [by] if isinstance(by, str) else list(by)
    grouped = df.groupby(by, dropna=False, sort=True)[value]
    out = grouped.agg(["mean", "std", "count"]).reset_index()
    out["sem"] = out["std"] / out["count"].clip(lower=1) ** 0.5
    return out

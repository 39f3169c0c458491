"""Planning a sweep: from a :class:`Sweep` (base + grid + seeds) to the list of cells that will run.

Contract: :func:`plan_sweep` is pure (it trains nothing, reads and writes no file). It expands the grid,
normalises each cell (N1-N3), skips combinations that match a rule (R1-R5, :data:`RULES`) or repeat an earlier
cell, and keys every cell by :func:`config_key`. A config error (unknown field, bad value, two token budgets)
raises ``ValueError`` naming the sweep and the cell. The normalisations and rules are documented in
:mod:`toolkit.sweeps`.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Callable

from toolkit.models import PRESETS, spec_patches
from toolkit.tokens import STRATEGIES, resolve_keep
from toolkit.config import method_rule, overlay
from toolkit.train import TrainConfig
from toolkit.validation import check_int
from toolkit.methods import get_method, method_names
from toolkit.plan import count_units
from toolkit.privacy.rules import check_private_run
from toolkit.vocabulary import INFINITY_WORDS, epsilon_to_json, format_epsilon

# Bump when the canonical form in config_key changes: every key changes, finished cells re-run (the safe side).
HASH_VERSION = 1
# TrainConfig fields that cannot change a result, so they do not enter the cell key.
UNKEYED_FIELDS = ("progress", "checkpoint_path", "eval_batch_size", "output_dir", "feature_cache")
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))
BUNDLE_KEYS = ("label", "tags")
QUICK_KEYS = ("base", "grid", "seeds")

# Settings that make any sweep run in a second or two per cell on a CPU: for CI and for trying a sweep out. The
# model is not warm-started (warm_start_steps=0), so accuracies are near chance: quick mode checks the plumbing
# only. The RDP accountant replaces the (tighter, default) PRV one because calibrating σ with PRV takes seconds
# per cell; a small sampling rate (4 / 64) keeps Opacus' RDP fast too.
QUICK_BASE = dict(warm_start_steps=0, train_limit=64, eval_limit=32, steps=2, expected_batch_size=4,
                  epochs=None, accountant="rdp", progress=False)


# ------------------------------------------------------------------------------------------------ the sweep

@dataclass
class Sweep:
    """A grid of training runs.

    Attributes:
        name: names the results folder (``<out_dir>/<name>/``); letters, digits, ``-``, ``_`` and ``.``.
        base: ``TrainConfig`` fields shared by every cell.
        grid: axis -> non-empty list of values (a ``TrainConfig`` field, or a bundled axis of dicts, see
            :mod:`toolkit.sweeps`).
        seeds: one cell per seed for every grid point (sets ``TrainConfig.seed``).
        description: what question the sweep answers (kept in the plan file).
        quick: overrides applied by :meth:`quick_version`: ``{"base": {...}, "grid": {...}, "seeds": [...]}``.

    Raises ``ValueError`` at construction for a bad name, seeds, grid axis or ``quick`` key.
    """

    name: str
    base: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)
    seeds: list = field(default_factory=lambda: [0])
    description: str = ""
    quick: dict = field(default_factory=dict)

    def __post_init__(self):
        # the name becomes a folder name: refuse anything that could leave out_dir or surprise a shell
        if not isinstance(self.name, str) or not self.name or self.name in (".", "..") \
                or any(not (ch.isalnum() or ch in "-_.") for ch in self.name):
            raise ValueError(f"sweep name {self.name!r} must be non-empty letters, digits, '-', '_' or '.'")
        for what, value in (("base", self.base), ("grid", self.grid), ("quick", self.quick)):
            if not isinstance(value, dict):
                raise ValueError(f"sweep {self.name!r}: {what} must be a mapping, got {value!r}")
        if isinstance(self.seeds, int) and not isinstance(self.seeds, bool):
            self.seeds = [self.seeds]
        if not isinstance(self.seeds, (list, tuple)):
            raise ValueError(f"sweep {self.name!r}: seeds must be a list of integers, got {self.seeds!r}")
        self.seeds = [check_int("seed", s) for s in self.seeds]
        if not self.seeds:
            raise ValueError("a sweep needs at least one seed")
        if "seed" in self.grid or "seed" in self.base:
            raise ValueError("give seeds with Sweep(seeds=[...]), not as a 'seed' field in base or grid")
        for axis, values in self.grid.items():
            if not isinstance(values, (list, tuple)) or len(values) == 0:
                raise ValueError(f"grid axis {axis!r} must be a non-empty list of values, got {values!r}")
        unknown = sorted(set(self.quick) - set(QUICK_KEYS))
        if unknown:
            raise ValueError(f"sweep {self.name!r}: unknown key(s) under 'quick': {unknown}; "
                             f"expected {', '.join(QUICK_KEYS)}")

    def quick_version(self) -> "Sweep":
        """The same sweep shrunk for CI: :data:`QUICK_BASE`, then this sweep's own ``quick`` overrides."""
        base = overlay(overlay(self.base, QUICK_BASE), self.quick.get("base", {}))
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
    """What :func:`plan_sweep` decided: the cells to run (plan order) and the combinations skipped."""

    sweep: Sweep
    cells: list
    skipped: list

    def summary(self) -> dict:
        return dict(name=self.sweep.name, cells=len(self.cells), skipped=len(self.skipped),
                    skipped_cells=[dataclasses.asdict(s) for s in self.skipped])


# ------------------------------------------------------------------------------------ values and field names

_FLOAT_FIELDS = {name for name, hint in typing.get_type_hints(TrainConfig).items()
                 if float in (typing.get_args(hint) or (hint,))}


def parse_value(name: str, value):
    """A value from YAML/JSON/CLI for field ``name``: an infinity word (:data:`~toolkit.vocabulary.INFINITY_WORDS`)
    in a float field becomes ``math.inf``, an int in a float field a float; anything else is returned as-is
    (``TrainConfig.resolved`` then judges it)."""
    if name in _FLOAT_FIELDS:
        if isinstance(value, str) and value.strip().lower() in INFINITY_WORDS:
            return math.inf
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
    return value


def check_fields(names, where: str) -> None:
    """Raise ``ValueError`` naming every name in ``names`` that is not a ``TrainConfig`` field (with a guess)."""
    unknown = [n for n in names if n not in CONFIG_FIELDS]
    if unknown:
        hints = []
        for n in unknown:
            close = difflib.get_close_matches(str(n), CONFIG_FIELDS, n=1)
            hints.append(f"{n!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"{where}: unknown TrainConfig field(s) {', '.join(hints)}")


def _fmt(value) -> str:
    """A grid value in a cell label: floats as ε is written (``∞``, ``%g``), the rest as ``str``."""
    return format_epsilon(value) if isinstance(value, float) else str(value)


# ------------------------------------------------------------------------------------------------ the rules

def _strategy_spec(name: str):
    if name not in STRATEGIES:
        raise ValueError(f"unknown token strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    return STRATEGIES[name]


def preset_patches(preset: str) -> int | None:
    """Patches the preset's vision tower yields (None for an unknown preset, e.g. a local model)."""
    spec = PRESETS.get(preset)
    return None if spec is None else spec_patches(spec)


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
        return True  # a local model: its patch count is unknown here, assume the default fuses (runs, not skipped)
    if c.keep_tokens is not None and c.keep_tokens > n_patches:
        return True  # an impossible budget: leave the skip to R4 (budget-exceeds-patches), which names it
    keep = resolve_keep(c.token_strategy, n_patches, c.keep_tokens, c.token_prune_ratio)
    return spec.default_contextual(keep) > 0


def _rule_update_pruning(c: TrainConfig) -> str | None:
    if c.grad_prune_ratio and not get_method(c.method).can_prune_update:
        pruners = [m for m in method_names() if get_method(m).can_prune_update]
        return (f"grad_prune_ratio={c.grad_prune_ratio} with method {c.method!r}: update pruning acts on the noisy "
                f"DP-SGD gradient ({' / '.join(pruners)} only)")
    return None



def _rule_fusion_noise(c: TrainConfig) -> str | None:
    if c.fusion_noise_std and not _has_fused_tokens(c):
        return (f"fusion_noise_std={c.fusion_noise_std!r} but strategy {c.token_strategy!r} with contextual_tokens="
                f"{c.contextual_tokens} feeds no fused token: the noise would be a no-op")
    return None


def _rule_matched_noise(c: TrainConfig) -> str | None:
    if c.fusion_noise_std == "matched" and (not get_method(c.method).private or math.isinf(c.epsilon)):
        return "fusion_noise_std='matched' is 0 without DP noise (non-private or ε = ∞): a no-op"
    return None


def _rule_budget(c: TrainConfig) -> str | None:
    n_patches = None if c.model_dir else preset_patches(c.preset)
    if c.keep_tokens is not None and n_patches is not None and c.keep_tokens > n_patches:
        return f"keep_tokens={c.keep_tokens} exceeds the {n_patches} patches of preset {c.preset!r}"
    return None


def _rule_contextual(c: TrainConfig) -> str | None:
    if c.contextual_tokens and c.token_strategy != "none" and _strategy_spec(c.token_strategy).default_contextual \
            is None:
        return f"contextual_tokens={c.contextual_tokens} but strategy {c.token_strategy!r} never fuses tokens"
    return None


# name -> rule(resolved config) -> reason to skip, or None. Documented in toolkit.sweeps (R1-R5), in this order.
RULES: dict[str, Callable[[TrainConfig], str | None]] = {
    "update-pruning-needs-dp-sgd": _rule_update_pruning,
    "fusion-noise-needs-fused-tokens": _rule_fusion_noise,
    "matched-fusion-noise-needs-dp-noise": _rule_matched_noise,
    "budget-exceeds-patches": _rule_budget,
    "contextual-tokens-need-fusing-strategy": _rule_contextual,
}


def _normalise(values: dict) -> dict:
    """Normalisation N1 on a raw cell dict: non-private ignores ε, so it is run (and shown) at ε = ∞."""
    v = dict(values)
    method = v.get("method", TrainConfig.method)
    if method in method_names() and not get_method(method).private:
        v["epsilon"] = math.inf
    return v


def _normalise_resolved(c: TrainConfig) -> TrainConfig:
    """Normalisations N2-N3 on a resolved config: clear the token settings that cannot act."""
    if c.token_strategy == "none":
        return dataclasses.replace(c, keep_tokens=None, token_prune_ratio=None, contextual_tokens=None,
                                   token_layer=None)
    if c.contextual_tokens == 0 and _strategy_spec(c.token_strategy).default_contextual is None:
        return dataclasses.replace(c, contextual_tokens=None)
    return c


# ------------------------------------------------------------------------------------------------- the key

def config_key(config: TrainConfig) -> str:
    """The stable 12-hex-digit key of a resolved config (see "Cell key" in :mod:`toolkit.sweeps`)."""
    canon = {k: epsilon_to_json(parse_value(k, v))
             for k, v in config.to_dict().items() if k not in UNKEYED_FIELDS}
    text = json.dumps(dict(v=HASH_VERSION, config=canon), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------------ expansion

def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(str(name), CONFIG_FIELDS, n=1)
    return f" (did you mean the field {close[0]!r}?)" if close else ""


def _axis_points(sweep: Sweep) -> list[list[tuple[str, object]]]:
    axes = []
    for axis, values in sweep.grid.items():
        if axis in CONFIG_FIELDS:
            axes.append([(axis, parse_value(axis, v)) for v in values])
            continue
        for value in values:
            if not isinstance(value, dict):
                raise ValueError(f"grid axis {axis!r} is not a TrainConfig field, so it must be a bundled axis whose "
                                 f"values are dicts of fields; got {value!r}" + _did_you_mean(axis))
            check_fields([k for k in value if k not in BUNDLE_KEYS], f"bundled axis {axis!r}")
            if not isinstance(value.get("tags") or {}, dict):
                raise ValueError(f"bundled axis {axis!r}: 'tags' must be a mapping of extra columns, "
                                 f"got {value['tags']!r}")
        axes.append([(axis, v) for v in values])
    return axes


def plan_sweep(sweep: Sweep) -> SweepPlan:
    """Expand, normalise, apply :data:`RULES`, key and de-duplicate; raise ``ValueError`` on a config error."""
    check_fields(sweep.base, f"sweep {sweep.name!r} base")
    base = {k: parse_value(k, v) for k, v in sweep.base.items()}
    axes = _axis_points(sweep)
    cells, skipped, seen, counted = [], [], {}, {}
    for point in itertools.product(*axes, [("seed", s) for s in sweep.seeds]):
        values, columns, parts = dict(base), {}, []
        for axis, value in point:
            if axis in CONFIG_FIELDS:
                values = overlay(values, {axis: value})
                parts.append((axis, None))
            else:
                fields = {k: parse_value(k, v) for k, v in value.items() if k not in BUNDLE_KEYS}
                values = overlay(values, fields)
                label = value.get("label") or ", ".join(f"{k}={_fmt(v)}" for k, v in fields.items())
                columns[axis] = label
                columns.update(value.get("tags") or {})
                parts.append((axis, str(label)))
        normalised = _normalise(values)

        def cell_label(shown: dict) -> str:
            return " | ".join(f"{axis}={_fmt(shown[axis])}" if text is None else text for axis, text in parts)

        grid_label, label = cell_label(values), cell_label(normalised)  # a cell is shown as it runs (N1: ε = ∞)
        resolved = _normalise_resolved(_resolve(sweep, label, normalised))
        reason = next(((name, why) for name, rule in RULES.items() if (why := rule(resolved))), None)
        if reason:
            skipped.append(Skipped(grid_label, *reason))
            continue
        if why := method_rule(resolved):
            raise ValueError(f"sweep {sweep.name!r}, cell {label}: {why}")
        _check_against_the_data(sweep, label, resolved, counted)
        key = config_key(resolved)
        if key in seen:   # a skipped point keeps its grid values: which one it was is the information
            skipped.append(Skipped(grid_label, "duplicate", f"same resolved config as cell {seen[key]!r}"))
            continue
        seen[key] = label
        cells.append(Cell(len(cells), key, resolved, label, columns))
    return SweepPlan(sweep, cells, skipped)


def _check_against_the_data(sweep: Sweep, label: str, c: TrainConfig, counted: dict) -> None:
    """Train's rules that need N (batch ≤ N, δ < 1/N), checked when the sweep is planned, not when a cell's turn
    comes after others have trained; N is counted once per data setting (a file's JSON is read, no image)."""
    where = (c.task, c.train_split, c.train_data, c.train_limit, c.privacy_unit, c.dataset_size)
    try:
        if where not in counted:
            counted[where] = count_units(c)[0]
        check_private_run(c, counted[where], warn=False)   # δ above 1/(10N): warned about by the cell's own run
    except (ValueError, OSError) as err:
        raise ValueError(f"sweep {sweep.name!r}, cell {label}: {err}") from None


def _resolve(sweep: Sweep, label: str, values: dict) -> TrainConfig:
    """``TrainConfig(**values).resolved()`` with a known token strategy (the rules look it up), its errors
    prefixed with the sweep and the cell."""
    try:
        config = TrainConfig(**values).resolved(method_rules=False)
        if config.token_strategy != "none":
            _strategy_spec(config.token_strategy)
        return config
    except (TypeError, ValueError) as err:
        raise ValueError(f"sweep {sweep.name!r}, cell {label}: {err}") from err


def expand(sweep: Sweep) -> list[TrainConfig]:
    """The resolved configs the sweep will run, in order (invalid and duplicate combinations left out)."""
    return [cell.config for cell in plan_sweep(sweep).cells]

"""Running a sweep: train the planned cells one at a time, store each the moment it finishes, resume by cell_id.

Contract: :func:`run_sweep` plans the sweep (:func:`~toolkit.sweeps.plan.plan_sweep`), writes the plan to
``<out_dir>/<name>.plan.json``, and trains every cell whose ``<out_dir>/<name>/<cell_id>.json`` does not exist
yet, writing that file atomically (:mod:`toolkit.sweeps.store`) as soon as the cell finishes. A crash or a
Ctrl-C loses at most the cell that was running; running the same sweep again trains only the missing cells.
:func:`sweep_results` reads the finished cells of a sweep back, in plan order, without running anything.
"""
from __future__ import annotations

import dataclasses
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from tqdm.auto import tqdm

# The module, not the function: run_sweep looks up ``train_module.train`` at call time, so tests (and tools)
# can patch ``toolkit.train.train``.
import toolkit.train as train_module
from toolkit.sweeps.plan import Cell, Sweep, SweepPlan, plan_sweep
from toolkit.sweeps.store import finished_cell_ids, read_results, write_cell, write_json_atomic
from toolkit.validation import check_choice, check_int
from toolkit.methods import get_method
from toolkit.warmstart import run_curriculum, start_model_id

ON_ERROR = ("raise", "continue")


def results_folder(sweep: Sweep | str, out_dir: str | os.PathLike) -> Path:
    """``<out_dir>/<sweep name>``: the folder holding one ``<cell_id>.json`` per finished cell."""
    return Path(out_dir) / (sweep if isinstance(sweep, str) else sweep.name)


def plan_file(sweep: Sweep | str, out_dir: str | os.PathLike) -> Path:
    """``<out_dir>/<sweep name>.plan.json``: the expanded plan, next to (not inside) the results folder."""
    return Path(out_dir) / f"{sweep if isinstance(sweep, str) else sweep.name}.plan.json"


def _device(config) -> str:
    """The device the run used (``config.device`` with ``auto`` resolved as :func:`toolkit.train.train` does)."""
    if config.device != "auto":
        return str(config.device)
    return "cuda" if torch.cuda.is_available() else "cpu"


def result_row(cell: Cell, sweep: Sweep, result) -> dict:
    """The stored row of a finished cell: meta columns, bundled-axis columns, the resolved config, the results
    (the columns are documented in :mod:`toolkit.sweeps`)."""
    c = cell.config
    row = dict(cell_id=cell.cell_id, sweep=sweep.name, cell=cell.index, label=cell.label, **cell.columns)
    row.update(c.to_dict())
    row["start_model"] = start_model_id(c.preset, c.model_dir, c.warm_start_steps, run_curriculum(c))
    history = result.history
    losses = history["loss"].dropna() if "loss" in history else pd.Series(dtype=float)
    kept = history["kept_fraction"].dropna() if "kept_fraction" in history else pd.Series(dtype=float)
    pruned = c.grad_prune_ratio if get_method(c.method).can_prune_update else 0.0   # R1: only DP-SGD steps prune
    row.update(
        accuracy=result.accuracy, epsilon_spent=result.epsilon_spent, noise_multiplier=result.noise_multiplier,
        sample_rate=result.sample_rate, steps_done=result.steps,
        final_loss=float(losses.iloc[-1]) if len(losses) else None, peak_memory_mb=result.peak_memory_mb,
        memory_method=result.memory_method, step_time_s=result.step_time_s, wall_time_s=result.wall_time_s,
        trainable_params=result.trainable_params, updated_params=round((1 - pruned) * result.trainable_params),
        kept_fraction=float(kept.mean()) if len(kept) else None, visual_tokens=result.visual_tokens,
        visual_tokens_in=result.visual_tokens_in, fusion_sigma=result.extra.get("fusion_noise_std"),
        n_records=result.extra.get("n_records"), cancelled=result.cancelled, device=_device(c),
        finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    return row


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` (a command-line ``--shard``) as ``(i, n)``; ``ValueError`` unless integers with 0 <= i < n."""
    try:
        index, count = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--shard must be i/n with integers 0 <= i < n, got {text!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"--shard must be i/n with integers 0 <= i < n, got {text!r}")
    return index, count


def _check_shard(shard) -> tuple[int, int] | None:
    if shard is None:
        return None
    if not isinstance(shard, (tuple, list)) or len(shard) != 2:
        raise ValueError(f"shard must be (index, count), got {shard!r}")
    count = check_int("shard count", shard[1], minimum=1)
    return check_int("shard index", shard[0], minimum=0, maximum=count - 1), count


def run_sweep(sweep: Sweep, out_dir: str | os.PathLike, progress: bool = True,
              callback: Callable[[dict], bool | None] | None = None, on_error: str = "raise",
              step_callback: Callable[[dict], bool | None] | None = None, parquet: bool = False,
              shard: tuple[int, int] | None = None) -> pd.DataFrame:
    """Train every cell of ``sweep`` that has no result file yet; return one row per finished cell.

    Args:
        sweep: the :class:`~toolkit.sweeps.plan.Sweep` (see :func:`~toolkit.sweeps.config.load_sweep_config`,
            :func:`~toolkit.sweeps.named.named_sweep`).
        out_dir: ``<out_dir>/<name>/<cell_id>.json`` holds each finished cell (the resume key is the
            ``cell_id``), ``<out_dir>/<name>.plan.json`` the expanded plan with the skipped cells and why.
        progress: a tqdm bar over cells (the per-run bars stay off unless ``base`` sets ``progress: true``).
        callback: ``callback(event)`` after each cell; ``event`` has ``kind`` (``"cached"``: its result file
            exists, not re-run; ``"done"``: just trained; ``"failed"``), ``index``, ``n_cells``, ``cell_id``,
            ``label``, ``row`` (the result dict; None for ``failed``), ``error``. Returning ``False`` stops the
            sweep after that cell (the rows so far are kept and returned).
        on_error: ``"raise"`` (default; finished cells are already on disk) or ``"continue"`` (a failed cell is
            reported through ``callback`` and not written, so the next run retries it).
        step_callback: passed to :func:`toolkit.train.train` as its per-step callback.
        parquet: also write ``<out_dir>/<name>.parquet`` (needs pyarrow).
        shard: ``(i, n)``: run only the plan's cells ``i, i + n, i + 2n, ...`` (parallel workers on one
            ``out_dir``: each cell is its own file, so they never collide). The returned frame still holds
            every finished cell of the sweep.

    Returns:
        DataFrame with the columns documented in :mod:`toolkit.sweeps`, in plan order, read back from the result
        files (so a fresh and a resumed run return identical frames). ``df.attrs["stopped"]`` is True when
        ``callback`` stopped the sweep.

    Raises:
        ValueError: a config error in the sweep, a bad ``on_error``/``shard``, or a corrupt result file
            (:class:`~toolkit.sweeps.store.CorruptResultError`, raised before anything trains).
    """
    check_choice("on_error", on_error, ON_ERROR)
    shard = _check_shard(shard)
    plan = plan_sweep(sweep)
    out_dir = Path(out_dir)
    folder = results_folder(sweep, out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(plan_file(sweep, out_dir),
                      dict(sweep=sweep.to_dict(), **plan.summary(), cell_ids={c.cell_id: c.label for c in plan.cells}))
    done = finished_cell_ids(folder)   # reads every file: a corrupt one fails here, before hours of training
    done -= stale_cell_ids(folder, plan)
    cells = plan.cells if shard is None else plan.cells[shard[0]::shard[1]]
    n = len(plan.cells)
    bar = tqdm(total=len(cells), initial=sum(c.cell_id in done for c in cells), desc=f"sweep {sweep.name}",
               unit="cell", disable=not progress)
    stop = False
    try:
        for cell in cells:
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
                        if isinstance(err, ValueError):   # a config error: say which cell of the grid has it
                            raise ValueError(f"sweep cell {cell.label!r}: {err}") from err
                        raise
                    event.update(kind="failed", error=f"{type(err).__name__}: {err}")
                else:
                    row = result_row(cell, sweep, result)
                    write_cell(folder, row)
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
            raise ImportError(f"parquet output needs pyarrow ({err}); the results in {folder} are complete") from err
    if stop:
        df.attrs["stopped"] = True
    return df


def stale_cell_ids(folder: Path, plan: SweepPlan) -> set[str]:
    """Finished cells trained from other starting weights than the plan's (e.g. a warm-start recipe changed since):
    their configs are equal, so their keys are too, but their results are not this plan's. They are re-run."""
    df = read_results(folder)
    if df.empty or "start_model" not in df.columns:
        return set()   # results written before the start model was recorded: no evidence either way
    expected = {c.cell_id: start_model_id(c.config.preset, c.config.model_dir, c.config.warm_start_steps,
                                          run_curriculum(c.config))
                for c in plan.cells}
    return {cid for cid, start in zip(df["cell_id"], df["start_model"])
            if cid in expected and isinstance(start, str) and start != expected[cid]}


def sweep_results(sweep: Sweep, out_dir: str | os.PathLike, plan: SweepPlan | None = None) -> pd.DataFrame:
    """The finished cells of ``sweep`` in ``out_dir`` (plan order, ``cell`` = index in the current plan),
    without running anything. Result files of cells no longer in the plan (e.g. written before a
    ``TrainConfig`` field was added, which changes every key) and stale ones (:func:`stale_cell_ids`) are left
    out."""
    plan = plan or plan_sweep(sweep)
    folder = results_folder(sweep, out_dir)
    df = read_results(folder)
    order = {c.cell_id: c.index for c in plan.cells}
    df = df[df["cell_id"].isin(order) & ~df["cell_id"].isin(stale_cell_ids(folder, plan))]
    df = df.assign(cell=df["cell_id"].map(order).astype(int)).sort_values("cell", kind="stable")
    return df.reset_index(drop=True)

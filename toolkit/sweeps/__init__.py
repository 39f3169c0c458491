"""Sweeps: a grid of :class:`~toolkit.train.TrainConfig` runs, cell by cell, into one tidy DataFrame.

A :class:`Sweep` is a ``base`` config (any ``TrainConfig`` fields), a ``grid`` (field -> list of values; the
cells are the Cartesian product) and ``seeds``. :func:`plan_sweep` expands it, normalises each cell, skips
invalid combinations **by rule** (:data:`RULES`, listed below, never by catching a training error), and keys
every cell by a stable hash of its resolved config (its ``cell_id``). :func:`run_sweep` trains the cells one at
a time and writes each finished cell to ``<out_dir>/<name>/<cell_id>.json`` the moment it finishes (atomically),
so a crash or a Ctrl-C loses at most the cell that was running; running the same sweep again skips every cell
whose file exists. :func:`read_results` / :func:`sweep_results` read the files back as one DataFrame and
:func:`export_csv` writes it as a CSV for people.

The package, one concern per module:

* :mod:`toolkit.sweeps.plan`: :class:`Sweep`, :class:`Cell`, :class:`Skipped`, :class:`SweepPlan`, the
  normalisations, the rules, :func:`config_key`, :func:`plan_sweep`, :func:`expand`.
* :mod:`toolkit.sweeps.config`: :func:`sweep_from_dict`, :func:`load_sweep_config` (YAML/JSON files).
* :mod:`toolkit.sweeps.store`: one JSON file per finished cell; :func:`read_results`, :func:`export_csv`.
* :mod:`toolkit.sweeps.run`: :func:`run_sweep`, :func:`sweep_results`.
* :mod:`toolkit.sweeps.named`: :data:`NAMED_SWEEPS`, :func:`named_sweep`, quick mode (:func:`is_quick`,
  ``$DUALPRIV_QUICK``), the LoRA-rank control (:func:`matched_lora_rank`, :func:`lora_rank_arms`).
* :mod:`toolkit.sweeps.summary`: :func:`summarize`.

Example: planning is instant and trains nothing::

    >>> from toolkit.sweeps import Sweep, plan_sweep
    >>> sweep = Sweep("demo", base=dict(warm_start_steps=0, train_limit=32, eval_limit=32, steps=2,
    ...                                 expected_batch_size=16),
    ...               grid=dict(method=["non-private", "dp-sgd"], epsilon=[1.0, 8.0]), seeds=[0])
    >>> plan = plan_sweep(sweep)
    >>> for cell in plan.cells:   # non-private runs once, at ε = ∞ (normalisation N1)
    ...     print(cell.label)
    method=non-private | epsilon=∞ | seed=0
    method=dp-sgd | epsilon=1 | seed=0
    method=dp-sgd | epsilon=8 | seed=0
    >>> [(s.rule, s.label) for s in plan.skipped]
    [('duplicate', 'method=non-private | epsilon=8 | seed=0')]
    >>> plan.cells[0].config.epsilon, len(plan.cells[0].cell_id)
    (inf, 12)

Running it (about a minute on a CPU) writes one JSON file per cell; running it again trains nothing::

    >>> from toolkit.sweeps import export_csv, read_results, run_sweep
    >>> df = run_sweep(sweep, "artifacts/sweeps", progress=False)                  # doctest: +SKIP
    >>> len(df), len(read_results("artifacts/sweeps/demo"))                        # doctest: +SKIP
    (3, 3)
    >>> export_csv(df, "artifacts/sweeps/demo.csv")                                 # doctest: +SKIP
    PosixPath('artifacts/sweeps/demo.csv')

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

A config error (unknown field, bad value, both ``keep_tokens`` and ``token_prune_ratio``, a batch above the N
records or δ ≥ 1/N as ``train`` refuses them) is not a combination to skip: :func:`plan_sweep` raises
``ValueError`` for it, naming the cell, before anything runs.

Cell key
--------
``cell_id`` = the first 12 hex digits of SHA-256 over the canonical JSON of the *resolved* config (every
``TrainConfig`` field after :meth:`TrainConfig.resolved`, ints in float fields written as floats, ``inf`` as
``"inf"``), leaving out the fields that cannot change a result (:data:`UNKEYED_FIELDS`). So ``epsilon: 3`` and
``epsilon: 3.0``, or ``method: dual-priv`` with and without an explicit ``token_strategy: dual-priv``, are one
cell; adding a field to ``TrainConfig`` changes every key (finished cells then re-run: the safe side). The
``cell_id`` is the resume key and the result file's name.

Files under ``out_dir``
-----------------------
* ``<name>/<cell_id>.json``: one finished cell, its row as a JSON object (strict JSON: ``inf`` as ``"inf"``).
  Written to a temp file in the same folder, fsync'ed, renamed into place: never half a file. Delete one to
  re-run that cell. Stray ``.*.tmp`` files (a write cut short) are ignored.
* ``<name>.plan.json``: the expanded plan: cells, skipped combinations and the rule that skipped each.
* ``<name>.csv`` / ``<name>.parquet``: only when asked for (:func:`export_csv`, ``run_sweep(parquet=True)``,
  ``python -m toolkit sweep`` writes the CSV): exports, never read back to resume.

Columns of the DataFrame (one row per finished cell)
----------------------------------------------------
``cell_id``, ``sweep``, ``cell`` (index in the plan), ``label`` (a short description), one column per bundled
axis and tag, **every** ``TrainConfig`` field (resolved; ``epsilon`` is the target), then the results:
``accuracy``, ``epsilon_spent``, ``noise_multiplier``, ``sample_rate``, ``steps_done``, ``final_loss``,
``peak_memory_mb``, ``memory_method``, ``step_time_s``, ``wall_time_s``, ``trainable_params``,
``updated_params`` (coordinates a step may update: ``round((1 - grad_prune_ratio) * trainable_params)`` for the
DP-SGD methods, ``trainable_params`` otherwise), ``kept_fraction`` (mean over steps, DP-SGD methods),
``visual_tokens``, ``visual_tokens_in``, ``fusion_sigma`` (the σ_fuse actually used), ``n_records``,
``cancelled``, ``finished_at``; the field ``device`` holds the device the run used (``auto`` resolved), and
``start_model`` the weights it started from (:func:`toolkit.warmstart.start_model_id`: a cell whose stored
``start_model`` differs from the plan's, e.g. after a warm-start recipe change, is stale and re-run). See
:data:`META_COLUMNS` and :data:`RESULT_COLUMNS`.

Privacy unit: one training record = one source image (the embedded private split has one record per image);
``epsilon_spent`` is per record, hence per image.
"""
from toolkit.sweeps.config import SWEEP_KEYS, load_sweep_config, sweep_from_dict
from toolkit.sweeps.named import (
    EPSILONS, FULL_BASE, NAMED_SWEEPS, QUICK_ENV, is_quick, lora_rank_arms, matched_lora_rank, named_sweep,
    trainable_count,
)
from toolkit.sweeps.plan import (
    BUNDLE_KEYS, CONFIG_FIELDS, HASH_VERSION, QUICK_BASE, RULES, UNKEYED_FIELDS, Cell, Skipped, Sweep, SweepPlan,
    config_key, expand, plan_sweep, preset_patches,
)
from toolkit.sweeps.run import parse_shard, plan_file, result_row, results_folder, run_sweep, sweep_results
from toolkit.sweeps.store import (
    META_COLUMNS, RESULT_COLUMNS, CorruptResultError, cell_file, export_csv, read_results, write_cell,
)
from toolkit.sweeps.summary import summarize

__all__ = [
    # planning
    "Sweep", "Cell", "Skipped", "SweepPlan", "plan_sweep", "expand", "config_key", "preset_patches", "RULES",
    "CONFIG_FIELDS", "UNKEYED_FIELDS", "BUNDLE_KEYS", "HASH_VERSION", "QUICK_BASE",
    # sweep files
    "load_sweep_config", "sweep_from_dict", "SWEEP_KEYS",
    # storage
    "read_results", "export_csv", "write_cell", "cell_file", "CorruptResultError", "META_COLUMNS",
    "RESULT_COLUMNS",
    # running
    "run_sweep", "sweep_results", "results_folder", "plan_file", "result_row", "parse_shard",
    # named sweeps and quick mode
    "NAMED_SWEEPS", "named_sweep", "is_quick", "QUICK_ENV", "EPSILONS", "FULL_BASE", "matched_lora_rank",
    "lora_rank_arms", "trainable_count",
    # summaries
    "summarize",
]

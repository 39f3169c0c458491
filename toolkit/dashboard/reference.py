"""What a fine-tune's accuracy should be read against: the task's chance level, the binomial noise of the held-out
set, and a non-private reference run with the same schedule, measured on this server once per settings and cached.

* :func:`result_verdict` and :func:`accuracy_verdict`: a run's accuracy read against the chance and majority-class
  baselines of its evaluation set with a binomial test, and whether it answers one thing for (almost) everything
  (the statistics are :mod:`toolkit.stats`; :func:`task_answers` gives the embedded set's true answers).
* :func:`reference_config` (the non-private run a result is compared with: same preset, warm start, data, steps
  and batch size; the method's default learning rate; every visual token), :func:`reference_key`, and
  :class:`ReferenceStore` (a JSON file of measured references, keyed by that config). Nothing here is a number
  typed in: a reference is shown only once a run on this server has measured it.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import threading
import time
from pathlib import Path

from toolkit import stats
from toolkit.config import TrainConfig
from toolkit.data import TASKS, dataset_sizes, make_vqa
from toolkit.warmstart import DEFAULT_STEPS, RECIPE_VERSION, cache_dir

# The fields of a config that change a non-private run's accuracy (what a cached reference is keyed by).
REFERENCE_FIELDS = ("preset", "model_dir", "warm_start_steps", "trainable", "lora_rank", "lora_variant", "task",
                    "train_split", "eval_split", "train_limit", "eval_limit", "steps", "epochs",
                    "expected_batch_size", "lr", "optimizer", "seed", "eval_batch_size", "token_strategy",
                    "keep_tokens", "token_prune_ratio")


def chance_level(task: str) -> float:
    """Accuracy of a uniform guess among the embedded task's candidate answers (evaluation ranks that closed set)."""
    return stats.chance_level(len(TASKS[task][3]))


def eval_size(task: str, eval_split: str = "test", eval_limit: int | None = None) -> int:
    """Number of held-out records a run of ``task`` is evaluated on."""
    size = dataset_sizes()[task][eval_split]
    return min(size, eval_limit) if eval_limit else size


@functools.lru_cache(maxsize=16)
def task_answers(task: str, eval_split: str = "test", eval_limit: int | None = None) -> tuple[str, ...]:
    """The true answers of the embedded evaluation set, in order (for its majority-class baseline)."""
    return tuple(r.answer for r in make_vqa(task, eval_split, image_size=16, limit=eval_limit).records)


def result_verdict(config: TrainConfig, result, eval_set=None) -> dict | None:
    """:func:`toolkit.stats.verdict` of a finished run: its predictions on the evaluation set (``eval_set`` for the
    user's data, else the embedded task's split) read against that set's chance and majority-class baselines.
    None when the run was not evaluated."""
    answers_given = getattr(result, "eval_answers", None)
    if answers_given is None:
        return None
    if eval_set is not None:
        truth = [r.answer for r in eval_set.records]
        candidates = answers_given.candidates or None
    else:
        truth = list(task_answers(config.task, config.eval_split, config.eval_limit))
        candidates = TASKS[config.task][3]
    return stats.answers_verdict(answers_given.predictions, truth, answers_given.correct, candidates)


def accuracy_verdict(task: str, accuracy: float, eval_split: str = "test", eval_limit: int | None = None) -> dict:
    """:func:`toolkit.stats.verdict` of an accuracy on the embedded task whose predictions were not kept (a sweep
    cell): chance and majority-class baselines and the binomial test, without the one-answer check."""
    truth = list(task_answers(task, eval_split, eval_limit))
    if accuracy is None or not math.isfinite(accuracy):
        return dict(stats.verdict(0, 0, truth), sentence="No accuracy was measured.")
    return stats.verdict(round(accuracy * len(truth)), len(truth), truth, None, TASKS[task][3])


def reference_config(config: TrainConfig) -> TrainConfig:
    """The non-private run a (resolved) ``config`` is compared with: the same model, data, steps and batch size;
    non-private's default learning rate, fixed batches, every visual token, no update pruning."""
    return TrainConfig(
        method="non-private", preset=config.preset, model_dir=config.model_dir,
        warm_start_steps=config.warm_start_steps, trainable=config.trainable, lora_rank=config.lora_rank,
        lora_variant=config.lora_variant, task=config.task, train_split=config.train_split,
        eval_split=config.eval_split, train_limit=config.train_limit, eval_limit=config.eval_limit,
        steps=config.steps, epochs=config.epochs, expected_batch_size=config.expected_batch_size,
        optimizer=config.optimizer, seed=config.seed, eval_batch_size=config.eval_batch_size,
        device=config.device, progress=False,
    ).resolved()


def reference_key(config: TrainConfig) -> str:
    """The cache key of a reference config: its accuracy-relevant fields and the warm-start recipe."""
    fields = {name: getattr(config, name) for name in REFERENCE_FIELDS}
    if fields["warm_start_steps"] is None:  # the preset's default warm start: key it by its actual length
        fields["warm_start_steps"] = DEFAULT_STEPS.get(config.preset, 600)
    fields["warm_start_recipe"] = RECIPE_VERSION
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ReferenceStore:
    """Measured non-private references in one JSON file (``<cache>/dashboard/references.json`` by default):
    ``key -> {accuracy, wall_time_s, measured_at, steps, n_eval}``, the fastest measurement of each kept. Written
    atomically; safe across threads."""

    _lock = threading.Lock()  # one lock for every store: they may share the file

    def __init__(self, path: str | os.PathLike | None = None):
        # resolved now, from $DUALPRIV_CACHE as it is when the store is made (tests point it elsewhere)
        self.path = Path(path) if path else cache_dir() / "dashboard" / "references.json"

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, config: TrainConfig) -> dict | None:
        """The stored reference of ``config`` (a reference config), or None when it was never measured."""
        with self._lock:
            return self._read().get(reference_key(config))

    def put(self, config: TrainConfig, summary: dict) -> dict:
        """Store a finished (not cancelled) non-private run's result as the reference of its settings; an entry
        already measured faster is kept (a run slowed by a busy machine does not replace it). Returns the entry
        that is stored now."""
        entry = dict(accuracy=float(summary["accuracy"]), wall_time_s=round(float(summary["wall_time_s"]), 1),
                     steps=int(summary["steps"]), n_eval=eval_size(config.task, config.eval_split, config.eval_limit),
                     measured_at=time.strftime("%Y-%m-%d %H:%M"))
        key = reference_key(config)
        with self._lock:
            data = self._read()
            kept = data.get(key)
            if isinstance(kept, dict) and float(kept.get("wall_time_s", math.inf)) <= entry["wall_time_s"]:
                return kept
            data[key] = entry
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, self.path)
        return entry


def same_settings(config: TrainConfig, reference: TrainConfig) -> bool:
    """Whether ``config`` (a non-private run) is itself the reference of ``reference``'s settings."""
    return config.method == "non-private" and reference_key(config) == reference_key(reference)

"""One training entry point for every method: non-private, DP-SGD, Dual-Priv and DP-ZO.

``train(config)`` reads top to bottom in three parts:

1. :func:`~toolkit.run_setup.setup` (in named stages, :mod:`toolkit.run_setup`): the (warm-started) model and
   what trains, the data (one record per source image), the visual tokens of every record through mechanism 1's
   pruner, the privacy plan (σ calibrated for q and the planned steps, or taken from a checkpoint), the method's
   optimizer (:mod:`toolkit.optimizers`) and the sampler.
2. :func:`run_steps`: one step per Poisson batch (an empty batch still adds noise and is accounted); a history row
   per step.
3. :func:`finish`: checkpoint if asked, round the trained weights to the model's dtype, evaluate on the
   held-out split, report.

Example (a few seconds on a CPU)::

    >>> from toolkit.train import TrainConfig, train
    >>> result = train(TrainConfig(method="dual-priv", epsilon=3.0, steps=3, train_limit=64, eval_limit=32,
    ...                            warm_start_steps=0, progress=False))
    >>> round(result.epsilon_spent, 2) <= 3.0
    True

Your data: ``TrainConfig(train_data=..., eval_data=..., image_folder=...)`` trains on a LLaVA JSON/JSONL file
(:mod:`toolkit.userdata`) instead of the embedded task, evaluates by ranking a closed set of answers or by
generating (:mod:`toolkit.evaluation`), and ``output_dir`` / :meth:`TrainResult.save` exports the model
(:mod:`toolkit.export`).

Privacy unit: one training record. The embedded private split has one record per source image, so the
guarantee is per image; a user data set is refused unless it has the same property (one image per record,
and one record per ``user_id`` when records carry one).

What leaves a private run: the model, ε spent per step, and the public config. The per-step mean loss and the
realised Poisson batch size are functions of the private batch that ε does not cover (the loss has unbounded
sensitivity), so they are kept out of the history, the progress bar and the callback unless
``release_training_stats=True``; so are the step time and peak memory (they grow with the secret batch size)
unless ``release_cost_stats=True``. :attr:`TrainResult.released_stats` lists what was released, and a resumed
run carries every earlier segment's opt-outs (:mod:`toolkit.privacy.release`).
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Callable

import pandas as pd
import torch
from tqdm.auto import tqdm

from toolkit.checkpoint import save_checkpoint
from toolkit.config import OPTIMIZERS, TrainConfig
from toolkit.data import VQADataset
from toolkit.distributed import check_replicas_identical, share
from toolkit.evaluation import answer_records
from toolkit.forward import answer_losses
from toolkit.metering import StepTimer, live_training_tensors, measure_peak
from toolkit.privacy.release import (COST_STATS, TRAINING_STATS, WITHHELD, outside_the_guarantee, released_stats,
                                     releases_cost_stats, releases_training_stats, segment_record)
from toolkit.quiet import transformers_progress_bars
from toolkit.result import TrainResult
from toolkit.run_setup import Run, load_bundle, make_sampler, public_gradients, setup
from toolkit.stats import answers_verdict
from toolkit.vocabulary import METHODS, PRIVATE_METHODS, format_epsilon

__all__ = ["METHODS", "PRIVATE_METHODS", "OPTIMIZERS", "TrainConfig", "TrainResult", "train", "setup", "run_steps",
           "finish", "load_bundle", "make_sampler", "public_gradients", "TRAINING_STATS", "COST_STATS",
           "outside_the_guarantee"]


# ------------------------------------------------------------------------------------------------ steps

def batch_losses(run: Run, idx: torch.Tensor) -> torch.Tensor:
    """Per-example losses ``[B]`` of the records ``idx``, forwarded through the optimizer's module (the LM head
    runs at the answer positions only: :func:`toolkit.forward.answer_losses`)."""
    batch = {k: v.to(run.device) for k, v in run.collator([run.train_set[i] for i in idx.tolist()]).items()}
    features = run.train_features[idx.to(run.train_features.device)].to(run.device)
    noise = None
    if run.fusion_sigma > 0 and run.pruner.n_contextual > 0:  # heuristic, outside the DP guarantee
        noise = run.pruner.fusion_noise(len(idx), generator=run.fusion_generator, sigma=run.fusion_sigma)
        noise = noise.to(run.device)
    return answer_losses(run.optimizer.module, features, batch, fusion_noise=noise)


def physical_chunks(idx: torch.Tensor, max_physical_batch_size: int | None) -> list[torch.Tensor]:
    """The logical batch ``idx`` in consecutive chunks of at most ``max_physical_batch_size`` records (one chunk
    when None). Chunking changes memory only: the update is the logical batch's (:mod:`toolkit.optimizers`)."""
    if max_physical_batch_size is None or len(idx) <= max_physical_batch_size:
        return [idx]
    return list(idx.split(max_physical_batch_size))


def one_step(run: Run, idx: torch.Tensor) -> float:
    """One optimizer step on the records ``idx``; an empty Poisson batch is still a (noised, accounted) step."""
    idx = idx[idx < len(run.train_set)]  # a declared size above the records held samples "absent" records
    if len(idx) == 0:
        run.optimizer.empty_step()
        return float("nan")
    idx = share(idx, run.dist)  # data-parallel: this rank's share of the global batch
    if len(idx) == 0:
        run.optimizer.empty_step()  # another rank holds the whole batch: this one contributes a zero sum
        return float("nan")
    if getattr(run.optimizer, "group_rows", None) is not None:   # user-level DP: which user each row belongs to
        run.optimizer.group_rows.set_records(idx)
    chunks = physical_chunks(idx, run.config.max_physical_batch_size)
    if len(chunks) == 1:
        return run.optimizer.step(lambda: batch_losses(run, idx))
    return run.optimizer.step([functools.partial(batch_losses, run, chunk) for chunk in chunks])


def epsilon_now(run: Run) -> float:
    """ε spent so far: the accountant's history is the truth; the precomputed curve is the same analysis."""
    accountant = run.optimizer.accountant
    if accountant is None:
        return math.inf
    history = list(accountant.history)
    if run.epsilon_curve is not None and len(history) == 1 and history[0][2] <= run.steps \
            and tuple(history[0][:2]) == (run.plan.noise_multiplier, run.sample_rate):
        return run.epsilon_curve(int(history[0][2]))
    return run.optimizer.epsilon(run.plan.delta)


@dataclass
class Steps:
    """What :func:`run_steps` did: a history row per step, the step timer, the peak memory of one warm step
    (None unless a private run releases it), and whether the callback stopped the loop."""

    rows: list
    timer: StepTimer
    peak: object
    cancelled: bool


def run_steps(run: Run, callback: Callable[[dict], bool | None] | None) -> Steps:
    """The loop: one step per sampled batch, a history row each, until the plan's steps or a cancel."""
    c = run.config
    release, release_cost = releases_training_stats(c), releases_cost_stats(c)
    timer, rows, peak, cancelled = StepTimer(skip=1, device=run.device), [], None, False
    measure_at = run.start_step + min(2, run.steps - run.start_step - 1)  # a warm step (lazy allocations done)
    bar = tqdm(total=run.steps, initial=run.start_step, desc=f"{c.method} ε={format_epsilon(c.epsilon if c.private else None)}",
               disable=not c.progress)
    batches = run.sampler.batches(run.steps - run.start_step)
    for step, idx in zip(range(run.start_step, run.steps), batches):
        if step == measure_at and release_cost:  # withheld costs are not even measured
            box = {}
            baseline = live_training_tensors(run.lm, getattr(run.optimizer, "optimizer", None)) + [run.train_features]
            peak = measure_peak(lambda: box.setdefault("loss", one_step(run, idx)), baseline, device=run.device)
            loss = box["loss"]
            timer.times.append(float("nan"))  # profiled steps are slower: not timed
        else:
            loss = timer.time(lambda: one_step(run, idx))
        row = dict(step=step + 1, steps=run.steps, epsilon_spent=epsilon_now(run), lr=c.lr)
        if release_cost:
            row["step_time_s"] = timer.times[-1]
        if release:
            row.update(loss=loss, batch_size=int(len(idx)))
        if hasattr(run.optimizer, "last_kept_fraction"):
            row["kept_fraction"] = run.optimizer.last_kept_fraction
        rows.append(row)
        bar.update(1)
        bar.set_postfix(dict(loss=f"{loss:.3f}") if release else {}, eps=f"{row['epsilon_spent']:.2f}")
        if callback is not None and callback(row) is False:
            cancelled = True
            break
    bar.close()
    return Steps(rows=rows, timer=timer, peak=peak, cancelled=cancelled)


# ------------------------------------------------------------------------------------------------ finish

def finish(run: Run, done: Steps) -> TrainResult:
    """Checkpoint if asked, round the trained weights to the model's dtype, evaluate, and report."""
    c = run.config
    rows, timer, peak = done.rows, done.timer, done.peak
    check_replicas_identical(run.lm, run.dist)
    steps_done = run.start_step + len(rows)
    released = released_stats(c)
    segments = list(run.past_segments)
    if run.plan is not None and rows:
        segments.append(segment_record(c, run.plan, run.start_step + 1, steps_done, released))
    if c.checkpoint_path and run.dist.is_main:  # the fp32 trained weights, to resume from
        save_checkpoint(c.checkpoint_path, config=c.to_dict(), step=steps_done, module=run.lm,
                        optimizer=run.optimizer, sampler=run.sampler, plan=run.plan, segments=segments)
    # Mixed precision ends here: the trained weights are rounded to the model's dtype (the frozen tower's), so the
    # model that is evaluated, returned and exported is one-dtype, as transformers loads and runs it.
    run.bundle.model.to(run.bundle.vision_tower.dtype)
    answers = None
    if len(run.eval_set):
        answers = answer_records(run.lm, run.eval_features, run.eval_set.records, run.eval_collator,
                                 mode=run.eval_mode, candidates=run.candidates, max_new_tokens=c.max_new_tokens,
                                 batch_size=c.eval_batch_size)
    accuracy = answers.accuracy if answers is not None else None
    timer.times = [t for t in timer.times if not math.isnan(t)]
    cost = releases_cost_stats(c)
    return TrainResult(
        config=c, history=pd.DataFrame(rows), accuracy=accuracy,
        epsilon_spent=epsilon_now(run) if c.private else math.inf,
        noise_multiplier=run.plan.noise_multiplier if run.plan else 0.0, sample_rate=run.sample_rate,
        steps=steps_done, peak_memory_mb=peak.peak_mb if peak else float("nan"),
        memory_method=(peak.method if peak else "not measured") if cost else WITHHELD,
        step_time_s=timer.median if cost else float("nan"),
        trainable_params=run.trainable_params, visual_tokens=run.pruner.n_out,
        visual_tokens_in=run.bundle.n_patches, wall_time_s=time.perf_counter() - run.started, cancelled=done.cancelled,
        released_stats=released, bundle=run.bundle, eval_answers=answers,
        extra=dict(fusion_noise_std=run.fusion_sigma, n_records=run.n_records, world_size=run.dist.world_size,
                   privacy_unit=run.train_set.privacy_unit, train_data=run.train_set.name,
                   eval_data=run.eval_set.name, eval_records=len(run.eval_set),
                   eval_mode=run.eval_mode if answers is not None else "none (no evaluation set)",
                   n_candidates=len(run.candidates), pruner=run.pruner.describe(),
                   privacy_segments=segments,
                   # is the accuracy distinguishable from chance and from always giving the commonest answer?
                   verdict=None if answers is None else answers_verdict(
                       answers.predictions, [r.answer for r in run.eval_set.records], answers.correct,
                       answers.candidates)),
    )


def train(config: TrainConfig, callback: Callable[[dict], bool | None] | None = None, *,
          train_set: VQADataset | None = None, eval_set: VQADataset | None = None) -> TrainResult:
    """Fine-tune with ``config.method`` and evaluate on the held-out split.

    ``callback(row)`` is called after every step with the history row (step, steps, epsilon_spent, lr, and
    step_time_s / loss / batch_size where released); returning ``False`` cancels the run cleanly: training
    stops, the model is still evaluated, and the result has ``cancelled=True``. ``train_set`` / ``eval_set``
    replace the embedded task's splits with data sets of your own (see :func:`setup`).
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train needs a TrainConfig, got {type(config).__name__} (TrainConfig.from_dict(values) "
                        "builds one from a dict, naming any unknown key)")
    config = config.resolved()
    with transformers_progress_bars(config.progress):
        run = setup(config, train_set, eval_set)
        result = finish(run, run_steps(run, callback))
        if run.config.output_dir and run.dist.is_main:  # data-parallel replicas are identical: rank 0 exports
            result.save(run.config.output_dir)
    return result

"""What leaves a private run, and what its (ε, δ) guarantee does not cover, over the run's whole life.

A private run releases the model, ε spent per step and the public config. Everything else that is a function of
the private batches is withheld unless the user opts in, and then named in ``outside_the_guarantee``:

* ``TRAINING_STATS`` (``release_training_stats``): the per-step mean loss (unbounded sensitivity) and the
  realised Poisson batch size.
* ``COST_STATS`` (``release_cost_stats``): the per-step time and the peak memory of a step. Both grow with the
  realised batch size (step time correlated 0.96 with it, peak memory exactly linear in it, issue 20), so
  releasing them releases the secret batch sizes.

A run resumed from a checkpoint is one mechanism with several *segments*. Each segment is recorded
(:func:`segment_record`: its steps, σ, q, δ, target ε, accountant, sampling and opt-outs) and the checkpoint keeps
the list, so a later segment reports every opt-out of an earlier one (a ``noise_seed``, fixed batches, released
statistics) even when its own config has none: a guarantee lost once is lost for the whole run.

Example::

    >>> from toolkit.config import TrainConfig
    >>> from toolkit.privacy.release import released_stats
    >>> released_stats(TrainConfig(method="dp-sgd", steps=1).resolved())
    ()
    >>> released_stats(TrainConfig(method="non-private", steps=1).resolved())
    ('loss', 'batch_size', 'step_time_s', 'peak_memory_mb')
"""
from __future__ import annotations

from types import SimpleNamespace

TRAINING_STATS = ("loss", "batch_size")
COST_STATS = ("step_time_s", "peak_memory_mb")
WITHHELD = "withheld (private run: a function of the secret batch size; release_cost_stats=True releases it)"


def releases_training_stats(c) -> bool:
    return (not c.private) or bool(c.release_training_stats)


def releases_cost_stats(c) -> bool:
    return (not c.private) or bool(getattr(c, "release_cost_stats", False))


def released_stats(c) -> tuple:
    """The per-step statistics of the private batches this config releases (all of them for a non-private run)."""
    return (TRAINING_STATS if releases_training_stats(c) else ()) + (COST_STATS if releases_cost_stats(c) else ())


def own_notes(c, released) -> list[str]:
    """What this config (one segment) releases or does outside the guarantee, in words; never a secret value."""
    notes = []
    if released:
        notes.append(f"statistics of the private batches: {', '.join(released)} (per step)")
    if c.sampling == "fixed":
        notes.append("fixed-size shuffled batches (allow_fixed_batches=True): the reported epsilon is the Poisson "
                     "accountant's, which does NOT bound this sampling scheme: no proven guarantee")
    if c.fusion_noise_std:
        notes.append("fusion noise on the contextual tokens (a heuristic, not part of the DP analysis)")
    if c.noise_seed is not None:
        notes.append(f"noise_seed={c.noise_seed} was given: whoever knows it can re-create the noise and the "
                     "batches, so this run has NO privacy guarantee (reproducible experiments only)")
    if getattr(c, "allow_large_delta", False):
        notes.append(f"delta={c.delta:g} was accepted with allow_large_delta=True although it is not below 1/N: "
                     "such a delta allows releasing a whole record")
    return notes


def _public_note(note: str) -> str:
    """An earlier segment's note as carried forward: the seed's value is secret, its existence is not."""
    if note.startswith("noise_seed="):
        return "a noise_seed was given" + note[note.index(" was given") + len(" was given"):]
    return note


def outside_the_guarantee(c, released, segments=()) -> list[str]:
    """What this run (all its ``segments``, the current config last) released or did that the (ε, δ) guarantee
    does not cover, in words."""
    if not c.private:
        return ["everything: a non-private run has no guarantee"]
    notes = own_notes(c, released)
    for segment in segments[:-1]:
        span = f"steps {segment['first_step']}-{segment['last_step']} (an earlier segment of this run)"
        for note in segment.get("outside", []):
            carried = f"{span}: {_public_note(note)}"
            if carried not in notes:
                notes.append(carried)
    notes.append("hyper-parameters chosen on the private data, if any (their selection is not accounted)")
    return notes


def segment_record(c, plan, first_step: int, last_step: int, released) -> dict:
    """One segment of a private run's life, as the checkpoint, the run JSON and the export keep it."""
    return dict(first_step=int(first_step), last_step=int(last_step), steps=int(last_step - first_step + 1),
                noise_multiplier=float(plan.noise_multiplier), sample_rate=float(plan.sample_rate),
                delta=float(plan.delta), epsilon_target=float(plan.epsilon), accountant=plan.accountant,
                sampling=c.sampling, secure_mode=bool(c.secure_mode), noise_seed_given=c.noise_seed is not None,
                released_stats=list(released), outside=[_public_note(n) for n in own_notes(c, released)])


def checkpoint_segments(saved: list | None, config: dict, plan, step: int) -> list[dict]:
    """The segments a checkpoint holds; a checkpoint written before they were recorded gets one segment rebuilt
    from its saved config and plan (so its opt-outs still follow the run)."""
    if saved:
        return [dict(s) for s in saved]
    if plan is None or step == 0:
        return []
    fields = dict(private=True, sampling="poisson", fusion_noise_std=None, noise_seed=None, secure_mode=False,
                  release_training_stats=False, release_cost_stats=False, allow_large_delta=False)
    fields.update(config)
    c = SimpleNamespace(**fields)  # the saved config as attributes: the same rules as for a live one
    return [segment_record(c, plan, 1, step, released_stats(c))]


def guarantee_lost(segments) -> dict:
    """Machine-readable opt-outs of the whole run: did any segment use a noise_seed, fixed batches, release
    statistics?"""
    return dict(noise_seed_given=any(s["noise_seed_given"] for s in segments),
                fixed_batches=any(s["sampling"] == "fixed" for s in segments),
                released_stats=sorted({name for s in segments for name in s["released_stats"]}))


def privacy_history_lines(segments) -> list[str]:
    """The model card's table of the accountant's whole history: one row per segment (σ, q, steps, δ)."""
    if not segments:
        return []
    lines = ["", "### Privacy history (every segment the accountant composed)", "",
             "| steps | σ | q | δ | target ε | accountant | sampling | opt-outs |", "|---|---|---|---|---|---|---|---|"]
    for s in segments:
        lines.append(f"| {s['first_step']}-{s['last_step']} | {s['noise_multiplier']:.4g} | {s['sample_rate']:.4g} | "
                     f"{s['delta']:.3g} | {s['epsilon_target']:.4g} | {s['accountant']} | {s['sampling']} | "
                     f"{len(s.get('outside', []))} |")
    return lines

"""``python -m toolkit warm-start``: train (or find cached) the public warm start of a preset, with a progress bar.

``make install`` runs it, so the first fine-tune of the dashboard or a notebook does not wait for it.
"""
from __future__ import annotations

from toolkit.cli import subcommand
from toolkit.data import TASKS
from toolkit.models import PRESETS

TRAINABLE_PRESETS = tuple(name for name, spec in PRESETS.items() if not spec.get("shape_only"))


@subcommand("warm-start", help="train and cache the public warm start of a model preset (a few CPU minutes, once)")
def run(args) -> dict:
    from toolkit.validation import check_int
    from toolkit.warmstart import DEFAULT_STEPS, public_curriculum, warm_start, warm_start_path

    if args.preset not in TRAINABLE_PRESETS:   # a shape-only preset is for memory/speed, never trained
        raise ValueError(f"{'shape-only' if args.preset in PRESETS else 'unknown'} preset {args.preset!r} has no "
                         f"warm start; choose one of {', '.join(TRAINABLE_PRESETS)}")
    if args.task not in TASKS:
        raise ValueError(f"unknown --task {args.task!r}; choose one of {sorted(TASKS)}")
    check_int("--seed", args.seed, minimum=0)
    steps = args.steps if args.steps is not None else DEFAULT_STEPS.get(args.preset, 600)
    check_int("--steps", steps, minimum=1)
    curriculum = public_curriculum(args.task)
    path = warm_start_path(args.preset, args.seed, steps, curriculum=curriculum)
    cached = (path / "toolkit_bundle.json").is_file()
    bundle = warm_start(args.preset, seed=args.seed, steps=steps, progress=True, curriculum=curriculum)
    info = bundle.info.get("warm_start", {})
    result = dict(preset=args.preset, curriculum=curriculum, seed=args.seed, steps=steps, path=str(path),
                  was_cached=cached,
                  validation_accuracy=info.get("validation_accuracy"), kept_step=info.get("kept_step"),
                  seconds=info.get("seconds"))
    accuracy = result["validation_accuracy"]
    print(f"warm start of {args.preset!r} {'found in the cache' if cached else 'trained'}: {path}"
          + (f" ({curriculum} accuracy on the validation split {accuracy:.1%})" if accuracy is not None else ""))
    return result


@run.configure
def configure(parser) -> None:
    parser.add_argument("--preset", default="tiny", help=f"model preset: {', '.join(TRAINABLE_PRESETS)} (default tiny)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the warm start (default 0, what runs use)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the preset's default)")
    parser.add_argument("--task", default="parity",
                        help=f"the embedded task whose runs will start from it: {', '.join(TASKS)}. 'scene' has its "
                             "own public curriculum (the colour of each shape), every digit task shares the digit "
                             "one (default parity)")

"""``python -m toolkit train``: one fine-tune with any method; a flag for every ``TrainConfig`` field.

    python -m toolkit train --method dual-priv --epsilon 3 --steps 100 --json run.json
    python -m toolkit train --train-data photos/train.json --eval-data photos/test.json --image-folder photos \\
        --output-dir model --json run.json
    python -m toolkit train --config run.yaml --epsilon 8          # a YAML/JSON file; explicit flags win

In a config file, keys are ``TrainConfig`` field names (``train_data`` or ``train-data``), and relative paths
are relative to the file's folder.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
import typing
from pathlib import Path

import yaml

from toolkit.checkpoint import check_checkpoint_file
from toolkit.cli import subcommand
from toolkit.config import RUN_LENGTHS, TrainConfig, overlay
from toolkit.distributed import context, shutdown
from toolkit.plan import plan
from toolkit.silent_defaults import silent_default_notes
from toolkit.train import train
from toolkit.validation import check_output_dir
from toolkit.schema import choices_of, groups
from toolkit.vocabulary import INFINITY_WORDS, parse_epsilon, strict_json

# Fields holding a path: in a config file they are relative to the file's folder.
PATH_FIELDS = ("model_dir", "train_data", "eval_data", "image_folder", "output_dir", "checkpoint_path", "resume_from")


def _parse_float(text: str) -> float:
    if text.strip().lower() in INFINITY_WORDS:
        return math.inf
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected an integer, got {text!r}") from None


def _parse_epsilon(text: str) -> float:
    try:
        return parse_epsilon(text)
    except ValueError as err:  # argparse shows the message of an ArgumentTypeError as it is
        raise argparse.ArgumentTypeError(str(err)) from None


def _parse_fusion(text: str):
    if text.lower() in ("none", "off", "0"):
        return None
    if text == "matched":
        return text
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"expected a number, 'matched' or none, got {text!r}") from None


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def _or_none(parse):
    """A number field that may be None (its help says what None means): 'none' gives None."""
    def parse_optional(text: str):
        return None if text.strip().lower() == "none" else parse(text)
    return parse_optional


def field_parser(config_cls, name: str):
    """The text parser of a dataclass field, from its annotation; it raises ``ValueError`` with a readable message
    (a config file names the file and key; a flag goes through :func:`flag_type`)."""
    hint = typing.get_type_hints(config_cls)[name]
    args = typing.get_args(hint)
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if name == "fusion_noise_std":
        return _parse_fusion
    if name == "epsilon":
        return _parse_epsilon
    parse = {bool: parse_bool, float: _parse_float, int: _parse_int}.get(base, str)
    return _or_none(parse) if type(None) in args and parse is not str else parse


def flag_type(parse):
    """argparse prints 'invalid <function name> value' for a ValueError; an ArgumentTypeError it prints as it is."""
    def parse_flag(text: str):
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return parse_flag


def add_config_flags(parser, config_cls) -> None:
    """One ``--field-name`` flag per dataclass field, typed from its annotation, with the help, choices and
    default of its schema (:mod:`toolkit.schema`), grouped as the schema groups them. A flag not given leaves no
    attribute (``argparse.SUPPRESS``), so a config file's value is overridden only by flags actually given."""
    for group, fields in groups(config_cls).items():
        section = parser.add_argument_group(group)
        for f in fields:
            choices = choices_of(f)
            text = f.metadata.get("help", "")
            if f.default is None:   # the help says what None means, or there is no value unless one is given
                suffix = "" if "None" in text or "default" in text else " (default: not set)"
            else:
                suffix = f" (default: {f.default})"
            metavar = "{" + ",".join(map(str, choices)) + "}" if choices else None
            if f.type in (bool, "bool"):
                metavar = "{true,false}"
            section.add_argument("--" + f.name.replace("_", "-"), dest=f.name,
                                 type=flag_type(field_parser(config_cls, f.name)), default=argparse.SUPPRESS,
                                 metavar=metavar, help=f"{text}{suffix}".replace("%", "%%"))


def load_config_file(path: str | Path, config_cls=TrainConfig) -> dict:
    """Field values from a YAML or JSON file: unknown keys are refused by name; strings are parsed like flags;
    relative paths are made relative to the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    try:
        raw = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"config file {str(path)!r} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                         f"{str(err).splitlines()[0]}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of TrainConfig fields")
    fields = {f.name for f in dataclasses.fields(config_cls)}
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in fields:  # the same policy as TrainConfig.from_dict(unknown="error"), with the file named
            raise ValueError(f"config file {str(path)!r}: unknown field {key!r} (see python -m toolkit train --help)")
        if isinstance(value, str) and name not in PATH_FIELDS:
            try:
                value = field_parser(config_cls, name)(value)
            except ValueError as err:
                raise ValueError(f"config file {str(path)!r}: {key}: {err}") from None
        if name in PATH_FIELDS and isinstance(value, str) and not Path(value).expanduser().is_absolute():
            value = str(path.parent / value)
        values[name] = value
    return values


def config_from_args(args, config_cls=TrainConfig):
    """Defaults, then the ``--config`` file, then the flags given."""
    from_file = load_config_file(args.config, config_cls) if getattr(args, "config", None) else {}
    defaults = {f.name: f.default for f in dataclasses.fields(config_cls)
                if f.default is not dataclasses.MISSING and f.name in RUN_LENGTHS}   # e.g. audit's steps=200
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls) if hasattr(args, f.name)}
    values = overlay(overlay(defaults, from_file), flags)   # a length given later replaces an earlier other one
    return config_cls.from_dict(values) if hasattr(config_cls, "from_dict") else config_cls(**values)


@subcommand("train", help="fine-tune with non-private, dp-sgd, dual-priv or dp-zo, evaluate, and export "
                         "(data-parallel under torchrun --nproc-per-node N)")
def run(args) -> dict:
    config = config_from_args(args).resolved()
    if config.output_dir:  # checked here too so that nothing runs (not even the data loading) before it fails
        check_output_dir(config.output_dir, "--output-dir")
    if config.resume_from:  # and before the plan line, which would read as if the run were about to start
        check_checkpoint_file(config.resume_from)
    for note in silent_default_notes(config, args):   # issue 22: what would otherwise be ignored silently
        print(f"note: {note}", file=sys.stderr)
    try:                                              # issue 22: what this budget buys, before any work
        print(plan(config).line(), flush=True)
    except (ValueError, OSError) as err:              # bad input: train names it below, in its own words
        print(f"plan: not available ({str(err).splitlines()[0]})", flush=True)
    if not config.progress:
        print(f"training started: {config.method}, {config.steps or config.epochs} "
              f"{'steps' if config.steps else 'epochs'} (progress bar off)", flush=True)
    started = time.perf_counter()
    result = train(config)
    if not config.progress:
        print(f"training finished in {time.perf_counter() - started:.0f} s", flush=True)
    summary = result.summary()
    summary["history"] = result.history.to_dict(orient="records")
    ctx = context()
    if not ctx.is_main:  # data-parallel: rank 0 alone reports ε and writes the JSON
        args.json = None
        shutdown(ctx)
        return strict_json(summary)
    if result.eval_answers is not None:
        summary["eval_predictions"] = [
            dict(id=r, prediction=p, correct=c)
            for r, p, c in zip(result.eval_answers.ids, result.eval_answers.predictions, result.eval_answers.correct)
        ]
    if config.output_dir:
        summary["output_dir"] = str(config.output_dir)
    shown = {k: summary.get(k) for k in ("method", "epsilon", "epsilon_spent", "noise_multiplier", "sample_rate",
                                         "steps", "accuracy", "eval_mode", "peak_memory_mb", "step_time_s",
                                         "visual_tokens", "output_dir")}
    if ctx.enabled:
        shown["world_size"] = ctx.world_size
    print(json.dumps(strict_json({k: v for k, v in shown.items() if v is not None}), indent=2, default=str))
    if summary.get("verdict"):
        print(summary["verdict"]["sentence"])
    shutdown(ctx)
    return strict_json(summary)


@run.configure
def configure(parser) -> None:
    parser.add_argument("--config", metavar="FILE", help="a YAML or JSON file of TrainConfig fields (flags win)")
    add_config_flags(parser, TrainConfig)

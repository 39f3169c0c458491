"""``python -m toolkit train``: one fine-tune with any method; a flag for every ``TrainConfig`` field."""
from __future__ import annotations

import dataclasses
import json
import math
import typing

from toolkit.cli import subcommand
from toolkit.config import TrainConfig
from toolkit.distributed import context, shutdown
from toolkit.train import train
from toolkit.vocabulary import INFINITY_WORDS


def _parse_float(text: str) -> float:
    return math.inf if text.strip().lower() in INFINITY_WORDS else float(text)


def _parse_fusion(text: str):
    if text.lower() in ("none", "off", "0"):
        return None
    return text if text == "matched" else float(text)


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def add_config_flags(parser, config_cls) -> None:
    """One ``--field-name`` flag per dataclass field, typed from its annotation."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        if f.name == "fusion_noise_std":
            kind = _parse_fusion
        elif base is bool:
            kind = _parse_bool
        elif base is float:
            kind = _parse_float
        elif base is int:
            kind = int
        else:
            kind = str
        parser.add_argument(flag, dest=f.name, type=kind, default=f.default,
                            help=f"(default: {f.default})")


def config_from_args(args, config_cls):
    return config_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)})


@subcommand("train", help="fine-tune with non-private, dp-sgd, dual-priv or dp-zo and evaluate "
                         "(data-parallel under torchrun --nproc-per-node N)")
def run(args) -> dict:
    result = train(config_from_args(args, TrainConfig))
    summary = result.summary()
    summary["history"] = result.history.to_dict(orient="records")
    ctx = context()
    if not ctx.is_main:  # data-parallel: rank 0 alone reports ε and writes the JSON
        args.json = None
        shutdown(ctx)
        return summary
    shown = {k: summary[k] for k in ("method", "epsilon", "epsilon_spent", "noise_multiplier", "sample_rate",
                                      "steps", "accuracy", "peak_memory_mb", "step_time_s", "visual_tokens")}
    if ctx.enabled:
        shown["world_size"] = ctx.world_size
    print(json.dumps(shown, indent=2, default=str))
    shutdown(ctx)
    return summary


@run.configure
def configure(parser) -> None:
    add_config_flags(parser, TrainConfig)

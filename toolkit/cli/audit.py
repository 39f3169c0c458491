"""``python -m toolkit audit``: the one-run empirical privacy audit (:mod:`toolkit.audit`) of one training config.

    python -m toolkit audit --method dp-sgd --epsilon 1 --canaries 128 --k 16 --canary-seed 0 --json audit.json

Every ``train`` flag is accepted (the run under audit); the schedule defaults to :data:`toolkit.audit.AUDIT_DEFAULTS`
(the tiny-preset settings under which the audit has power), not to ``train``'s defaults.
"""
from __future__ import annotations

import dataclasses
import json
import typing

from toolkit.audit import AUDIT_DEFAULTS, run_audit
from toolkit.cli import subcommand
from toolkit.cli.train import add_config_flags, config_from_args
from toolkit.config import TrainConfig
from toolkit.validation import check_int
from toolkit.vocabulary import epsilon_to_json

HONESTY = ("What it proves: a lower bound ABOVE the reported ε proves a bug (the run leaks more than its "
           "accountant says), at the stated confidence. What it does not: a lower bound BELOW the reported ε does "
           "not prove the run private; one run with a few hundred canaries is a weak attack, and it can never "
           "show more than its ceiling (all guesses right; about 2.3 for 128 canaries, k = 16).")

# TrainConfig with the audit's schedule as defaults, so that --help shows the defaults that apply.
_AuditFlags = dataclasses.make_dataclass(
    "AuditFlags", [(name, typing.get_type_hints(TrainConfig)[name], dataclasses.field(default=value))
                   for name, value in AUDIT_DEFAULTS.items()], bases=(TrainConfig,))

_EPSILON_FIELDS = ("epsilon_target", "epsilon_reported", "epsilon_lower_bound", "epsilon_ceiling",
                   "fdp_epsilon_lower_bound", "fdp_epsilon_ceiling")


def audit_config(args) -> TrainConfig:
    """The run under audit: :data:`AUDIT_DEFAULTS` fill what the flags do not give (a length given replaces the
    default other one: ``--epochs 5`` clears the default ``steps``)."""
    return TrainConfig(**dataclasses.asdict(config_from_args(args, _AuditFlags)))


@subcommand("audit", help="empirical privacy audit in one run (Steinke et al. 2023; f-DP, Mahloujifar et al. "
                          "2025): ε lower bounds from canaries; above the reported ε proves a bug, below it proves "
                          "nothing")
def run(args) -> dict:
    if args.canary_seed is not None:     # named as the flag: "seed" alone reads like --seed
        check_int("--canary-seed", args.canary_seed, minimum=0)
    config = audit_config(args)
    result = run_audit(config, canaries=args.canaries, k=args.k, seed=args.canary_seed,
                       confidence=args.confidence)
    summary = result.summary()
    for key in _EPSILON_FIELDS:
        summary[key] = epsilon_to_json(summary[key])
    shown = {key: summary[key] for key in ("method", "epsilon_reported", "epsilon_lower_bound", "epsilon_ceiling",
                                           "fdp_epsilon_lower_bound", "fdp_epsilon_ceiling", "correct", "guesses",
                                           "canaries", "violation", "what_it_proves")}
    print(json.dumps(shown, indent=2, ensure_ascii=False))
    return summary


@run.configure
def configure(parser) -> None:
    add_config_flags(parser, _AuditFlags)
    parser.add_argument("--canaries", type=int, default=128,
                        help="m, canary records (each in with prob. 1/2; default 128)")
    parser.add_argument("--k", type=int, default=None,
                        help="guesses per side: 'in' for the k highest scores, 'out' for the k lowest "
                             "(default: canaries // 8); fix it before looking at the scores")
    parser.add_argument("--canary-seed", type=int, default=None,
                        help="seed of the canaries and the coin flips (default: fresh entropy, recorded in the "
                             "output); the training noise is seeded by --noise-seed (default: secret)")
    parser.add_argument("--confidence", type=float, default=0.95, help="confidence of the lower bound (default 0.95)")
    parser.epilog = HONESTY

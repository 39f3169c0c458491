"""``python -m toolkit plan``: what a training config's privacy budget buys, before training (``train``'s flags).

    python -m toolkit plan --train-data photos/train.json --image-folder photos --epsilon 3 --steps 30 \\
        --expected-batch-size 100 --json plan.json

Prints N, q, σ, steps, ε and δ reached, the averaged update's noise against the clipped signal, the verdict of
the measured calibration table and a proposal (see :mod:`toolkit.plan`); no model is built, no image opened.
"""
from __future__ import annotations

import json

from toolkit.cli import subcommand
from toolkit.cli.train import config_from_args
from toolkit.cli.train import configure as train_flags
from toolkit.plan import plan


@subcommand("plan", help="before training: N, q, σ, ε reached, the update's noise vs its signal, and a measured "
                        "verdict (same flags as train)")
def run(args) -> dict:
    result = plan(config_from_args(args)).to_dict()
    print(result["line"])
    print(result["unit_sentence"])
    if result["proposal"] and not result["proposal"]["same_as_config"]:
        p = result["proposal"]
        print(f"proposal: --expected-batch-size {p['expected_batch_size']} --steps {p['steps']}: {p['effect']}")
    print(json.dumps({k: result[k] for k in ("n", "unit", "sample_rate", "steps", "noise_multiplier",
                                             "epsilon_reached", "delta", "noise_std", "noise_ratio")}, indent=2))
    return result


run.configure(train_flags)

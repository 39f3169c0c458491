"""Issue 23's scene gate, probed: one run of the ``scene`` task on its own split layout, scored per question kind.

The scene task's private split holds 10000 generated scenes (``toolkit.data.SCENE_SPLITS``); ``--n`` trains on the
first N of them and ``--nval`` scores on the first N of the 500 validation scenes, printing the accuracy per
question kind and appending one JSON line to ``--log``. It starts from the ``scene-colour`` public warm start,
like every scene run.

    python benchmarks/scene_gate_probe.py --steps 1200 --lr 1e-3 --trainable lm-full
    python benchmarks/scene_gate_probe.py --steps 1200 --lr 2e-3 --method dp-sgd --epsilon 3

A probe, not the study: one seed, scored on validation; the gate (non-private >= 90 %, DP-SGD at epsilon = 3 at
least 10 points below) decides whether the study's protocol is worth running on the task.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from toolkit.config import TrainConfig
from toolkit.data import make_vqa
from toolkit.models import PRESETS
from toolkit.train import train


def question_kind(question: str) -> str:
    return "colour" if question.startswith("what colour") else "count" if question.startswith("how many") else "relation"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="non-private")
    parser.add_argument("--trainable", default="lora+head")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--epsilon", type=float, default=3.0)
    parser.add_argument("--batch", type=int, default=64, help="expected batch size")
    parser.add_argument("--token-prune-ratio", type=float, default=None,
                        help="Dual-Priv: share of the visual tokens dropped")
    parser.add_argument("--grad-prune-ratio", type=float, default=None,
                        help="Dual-Priv: share of the update dropped")
    parser.add_argument("--seed", type=int, default=0, help="model init and data order")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--render-size", type=int, default=None,
                        help="draw the scenes at this size (the model's input resizes them; default: its image size)")
    parser.add_argument("--n", type=int, default=None, help="train on the first N private scenes (default: all)")
    parser.add_argument("--nval", type=int, default=None, help="score on the first N validation scenes (default: all)")
    parser.add_argument("--log", default="runs/scene-gate-probes.jsonl")
    args = parser.parse_args(argv)
    started = time.time()
    image_size = args.render_size or PRESETS[args.preset]["image_size"]
    train_set = make_vqa("scene", "private", image_size, limit=args.n)
    eval_set = make_vqa("scene", "validation", image_size, limit=args.nval)
    pruning = {name: value for name, value in (("token_prune_ratio", args.token_prune_ratio),
                                                ("grad_prune_ratio", args.grad_prune_ratio)) if value is not None}
    config = TrainConfig(preset=args.preset, method=args.method, task="scene", steps=args.steps, lr=args.lr,
                         trainable=args.trainable, epsilon=args.epsilon, expected_batch_size=args.batch,
                         eval_split="validation", seed=args.seed, **pruning)
    result = train(config, train_set=train_set, eval_set=eval_set)
    kinds: dict[str, list[bool]] = {}
    for record, correct in zip(eval_set.records, result.eval_answers.correct):
        kinds.setdefault(question_kind(record.question), []).append(bool(correct))
    row = dict(preset=args.preset, n=len(train_set), nval=len(eval_set), method=args.method,
               trainable=args.trainable, steps=args.steps, lr=args.lr,
               epsilon=args.epsilon if config.private else None, batch=args.batch, **pruning,
               render_size=image_size, seed=args.seed,
               accuracy=result.accuracy, kinds={k: round(sum(v) / len(v), 3) for k, v in sorted(kinds.items())},
               wall_s=round(time.time() - started, 1))
    print(json.dumps(row), flush=True)
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    with open(args.log, "a") as log:
        log.write(json.dumps(row) + "\n")
    return row


if __name__ == "__main__":
    main()

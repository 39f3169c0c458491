"""Issue 23's scene gate, probed: one run of the ``scene`` task on its own split layout, scored per question kind.

The scene task's private split holds 10000 generated scenes (``toolkit.data.SCENE_SPLITS``); ``--n`` trains on the
first N of them and ``--nval`` scores on the first N of the 500 validation scenes, printing the accuracy per
question kind and appending one JSON line to ``--log``. It starts from the ``scene-colour`` public warm start,
like every scene run.

    python benchmarks/scene_gate_probe.py --steps 1200 --lr 1e-3 --trainable lm-full
    python benchmarks/scene_gate_probe.py --steps 1200 --lr 2e-3 --method dp-sgd --epsilon 3
    python benchmarks/scene_gate_probe.py --steps 4800 --lr 1e-3 --trainable lm-full --train-score 500

``--train-score N`` also scores the first N training records (one evaluation pass over both sets): a kind learned
on them but not on validation is memorised; one at chance on both is under-fit.

A probe, not the study: one seed, scored on validation; the gate (non-private >= 90 %, DP-SGD at epsilon = 3 at
least 10 points below) decides whether the study's protocol is worth running on the task.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from toolkit.config import TrainConfig
from toolkit.data import VQADataset, make_vqa
from toolkit.models import PRESETS
from toolkit.train import train


def question_kind(question: str) -> str:
    return "colour" if question.startswith("what colour") else "count" if question.startswith("how many") else "relation"


def per_kind(records, correct: list[bool]) -> dict[str, float]:
    """Accuracy per question kind of ``records`` answered ``correct``."""
    kinds: dict[str, list[bool]] = {}
    for record, ok in zip(records, correct):
        kinds.setdefault(question_kind(record.question), []).append(ok)
    return {kind: round(sum(v) / len(v), 3) for kind, v in sorted(kinds.items())}


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
    parser.add_argument("--train-score", type=int, default=0, metavar="N",
                        help="also score the first N training records (memorised or under-fit?)")
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
    if not 0 <= args.train_score <= len(train_set):
        parser.error(f"--train-score {args.train_score}: between 0 and the {len(train_set)} training records")
    scored = train_set.records[:args.train_score]
    both = VQADataset(scored + eval_set.records, eval_set.candidates, name=eval_set.name)
    result = train(config, train_set=train_set, eval_set=both)
    correct = [bool(c) for c in result.eval_answers.correct]
    on_train, on_validation = correct[:len(scored)], correct[len(scored):]
    row = dict(preset=args.preset, n=len(train_set), nval=len(eval_set), method=args.method,
               trainable=args.trainable, steps=args.steps, lr=args.lr,
               epsilon=args.epsilon if config.private else None, batch=args.batch, **pruning,
               render_size=image_size, seed=args.seed,
               accuracy=round(sum(on_validation) / len(eval_set), 4), kinds=per_kind(eval_set.records, on_validation),
               **(dict(train_scored=len(scored), train_kinds=per_kind(scored, on_train)) if scored else {}),
               wall_s=round(time.time() - started, 1))
    print(json.dumps(row), flush=True)
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    with open(args.log, "a") as log:
        log.write(json.dumps(row) + "\n")
    return row


if __name__ == "__main__":
    main()

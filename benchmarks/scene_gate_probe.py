"""Issue 23's scene gate, probed: one run on a LARGER generated private set than the embedded ``scene`` split.

The embedded scene task has 700 private scenes (the digit task's split layout). This probe draws ``--n`` scenes
with the same generator from indices 10000+ (disjoint from every embedded split and from the public curriculum's
scenes, 0-699) and scores on ``--nval`` scenes from indices 20000+, printing the accuracy per question kind and
appending one JSON line to ``--log``. It starts from the ``scene-colour`` public warm start, like a scene run.

    python benchmarks/scene_gate_probe.py --n 5000 --steps 1200 --lr 1e-3 --trainable lm-full
    python benchmarks/scene_gate_probe.py --n 5000 --steps 1200 --lr 2e-3 --method dp-sgd --epsilon 3

A probe, not the study: one seed, a validation set of its own; the gate (non-private >= 90 %, DP-SGD at
epsilon = 3 at least 10 points below) decides whether the study's protocol is worth running on such a split.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from toolkit.config import TrainConfig
from toolkit.data import TASKS, VQADataset, VQARecord, _scene_question, _scene_shapes, render_scene
from toolkit.train import train


def generated_scenes(start: int, count: int, name: str) -> VQADataset:
    """Scenes ``start .. start + count - 1`` drawn exactly as :func:`toolkit.data.make_scenes` draws its own."""
    records = []
    for i in range(start, start + count):
        rng = np.random.default_rng([0, 7919, i])
        shapes = _scene_shapes(rng)
        question, answer = _scene_question(shapes, rng)
        records.append(VQARecord(f"scene-probe-{i}", render_scene(shapes, 96), question, answer, (i,)))
    return VQADataset(records, TASKS["scene"][3], name=name)


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
    parser.add_argument("--n", type=int, default=5000, help="generated private scenes")
    parser.add_argument("--nval", type=int, default=500, help="generated validation scenes")
    parser.add_argument("--log", default="runs/scene-gate-probes.jsonl")
    args = parser.parse_args(argv)
    started = time.time()
    train_set = generated_scenes(10000, args.n, f"scene-probe/{args.n}")
    eval_set = generated_scenes(20000, args.nval, "scene-probe/validation")
    config = TrainConfig(method=args.method, task="scene", steps=args.steps, lr=args.lr, trainable=args.trainable,
                         epsilon=args.epsilon, expected_batch_size=args.batch)
    result = train(config, train_set=train_set, eval_set=eval_set)
    kinds: dict[str, list[bool]] = {}
    for record, correct in zip(eval_set.records, result.eval_answers.correct):
        kinds.setdefault(question_kind(record.question), []).append(bool(correct))
    row = dict(n=args.n, method=args.method, trainable=args.trainable, steps=args.steps, lr=args.lr,
               epsilon=args.epsilon if config.private else None, batch=args.batch, accuracy=result.accuracy,
               kinds={k: round(sum(v) / len(v), 3) for k, v in sorted(kinds.items())},
               wall_s=round(time.time() - started, 1))
    print(json.dumps(row), flush=True)
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    with open(args.log, "a") as log:
        log.write(json.dumps(row) + "\n")
    return row


if __name__ == "__main__":
    main()

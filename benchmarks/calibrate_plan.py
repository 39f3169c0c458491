"""The plan's calibration table: accuracy against the noise ratio σ/B and the data set size N, measured.

    python benchmarks/calibrate_plan.py --out runs/plan-calibration [--seeds 0,1] [--publish]

Every cell is one short training run of the README's own-data recipe (Dual-Priv, no warm start, 8 visual
tokens, 30 steps, q = 0.1) on the bundled photo set (:mod:`toolkit.samples`, temple / flower, majority class
50 %), at a few (N, ε) pairs, several seeds. Each finished cell is one JSON file under ``--out``: re-running
resumes, so the script can be stopped at any time. ``--publish`` writes the summary table to
``toolkit/measured/plan_calibration.json``, which :func:`toolkit.plan.plan` reads for its verdict.

What a cell records: N, the expected batch B, σ (calibrated by the toolkit's accountant for ε), the noise ratio
``σ / B`` (the standard deviation of the averaged update's noise, ``σ·C/B``, in units of the clipped signal's
bound ``C``), the accuracy on the held-out set, its size and majority share, and whether it beat the majority
class by more than two binomial standard errors ("learned").
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toolkit.plan import CALIBRATION_PATH, summarize_calibration  # noqa: E402
from toolkit.samples import make_photo_dataset  # noqa: E402
from toolkit.stats import NOISE_SE, answers_verdict  # noqa: E402
from toolkit.train import TrainConfig, train  # noqa: E402
from toolkit.userdata import load_llava_json  # noqa: E402

RECIPE = dict(method="dual-priv", warm_start_steps=0, steps=30, keep_tokens=8, progress=False)
SAMPLE_RATE = 0.1   # B = q·N: the README recipe's 100 of 1000
EVAL_RECORDS = 200
# (N, ε) cells, cheapest first; ε = inf is clipping without noise (ratio 0)
CELLS = [(250, math.inf), (250, 8.0), (250, 2.0), (250, 0.5), (1000, math.inf), (1000, 8.0), (1000, 2.0),
         (1000, 0.5), (1000, 0.125), (500, math.inf), (500, 8.0), (500, 2.0), (500, 0.5), (250, 4.0),
         (1000, 1.0)]


def cell_name(task: str, n: int, epsilon: float, seed: int) -> str:
    return f"{task}-n{n}-eps{'inf' if math.isinf(epsilon) else format(epsilon, 'g')}-s{seed}.json"


def run_cell(data_root: Path, n: int, epsilon: float, seed: int) -> dict:
    folder = data_root / f"photo-{n}"
    if (folder / "test.json").is_file():  # the same set for every cell of this N (and the feature cache hits)
        paths = dict(image_folder=str(folder), train=str(folder / "train.json"), test=str(folder / "test.json"))
    else:
        paths = make_photo_dataset(folder, n_train=n, n_test=EVAL_RECORDS, seed=0)
    batch = max(1, round(SAMPLE_RATE * n))
    started = time.perf_counter()
    result = train(TrainConfig(**RECIPE, epsilon=epsilon, expected_batch_size=batch, seed=seed, noise_seed=seed,
                               train_data=paths["train"], eval_data=paths["test"],
                               image_folder=paths["image_folder"]))
    answers = result.eval_answers
    truth = [r.answer for r in load_llava_json(paths["test"], paths["image_folder"], privacy_unit=False).records]
    verdict = answers_verdict(answers.predictions, truth, answers.correct, answers.candidates)
    return dict(task="photo", n=n, epsilon=None if math.isinf(epsilon) else epsilon, seed=seed,
                method=RECIPE["method"], steps=result.steps, expected_batch_size=batch,
                sample_rate=result.sample_rate, noise_multiplier=result.noise_multiplier,
                noise_ratio=result.noise_multiplier / batch, accuracy=result.accuracy,
                eval_records=len(answers.correct), majority=verdict["majority"],
                learned=bool(verdict["gap_se"] > NOISE_SE),   # the published table's rule: > 2 s.e. above the baseline
                wall_s=round(time.perf_counter() - started, 1))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/plan-calibration", help="one JSON file per finished cell")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--publish", action="store_true", help=f"write the summary to {CALIBRATION_PATH}")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for seed in [int(s) for s in args.seeds.split(",")]:
        for n, epsilon in CELLS:
            path = out / cell_name("photo", n, epsilon, seed)
            if path.is_file():
                continue
            row = run_cell(out / "data", n, epsilon, seed)
            path.write_text(json.dumps(row, indent=1))
            print(json.dumps(row), flush=True)
            if args.publish:  # after every cell: stopping at any time leaves a table of what finished
                publish(out)
    if args.publish:
        publish(out)


def publish(out: Path) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("photo-*.json"))]
    table = summarize_calibration(rows)
    table["script"] = "benchmarks/calibrate_plan.py"
    table["recipe"] = dict(RECIPE, sample_rate=SAMPLE_RATE, eval_records=EVAL_RECORDS, task="photo (toolkit.samples)")
    CALIBRATION_PATH.write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""The audit's power, measured: Steinke's and the f-DP one-run bounds of real audited runs, by canary count and ε.

    PYTHONPATH=. python benchmarks/audit_power.py --out runs/audit-power [--seeds 0,1,2] [--canaries 128,512]

One JSON file per finished (method, ε, m, seed) cell under ``--out`` (re-running resumes); at the end a markdown
table: per cell the mean ± s.d. of each bound over seeds next to its ceiling (every guess right) and the
reported ε, with the share of the ceiling reached. The run under audit is :data:`toolkit.audit.AUDIT_DEFAULTS`
on the tiny preset, ``noise_seed`` fixed (reproducible, hence not private: a measurement, not a release).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from toolkit.audit import AUDIT_DEFAULTS, run_audit
from toolkit.config import TrainConfig

EPSILONS = (math.inf, 8.0, 3.0)


def cell(out: Path, method: str, epsilon: float, m: int, seed: int) -> dict:
    path = out / f"{method}-eps{'inf' if math.isinf(epsilon) else format(epsilon, 'g')}-m{m}-s{seed}.json"
    if path.is_file():
        return json.loads(path.read_text())
    config = TrainConfig(method=method, epsilon=epsilon, progress=False, seed=seed, noise_seed=seed, **AUDIT_DEFAULTS)
    r = run_audit(config, canaries=m, seed=seed)
    row = dict(method=method, epsilon=None if math.isinf(epsilon) else epsilon, canaries=m, k=r.k, seed=seed,
               epsilon_reported=None if math.isinf(r.epsilon_reported) else r.epsilon_reported,
               steinke=r.epsilon_lower_bound, steinke_ceiling=r.epsilon_ceiling, correct=r.correct,
               guesses=r.guesses, fdp=r.fdp_epsilon_lower_bound, fdp_ceiling=r.fdp_epsilon_ceiling,
               fdp_correct=r.fdp_correct, fdp_guesses=r.fdp_guesses, wall_s=round(r.wall_time_s, 1))
    path.write_text(json.dumps(row, indent=1))
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict]) -> str:
    groups: dict[tuple, list] = {}
    for row in rows:
        groups.setdefault((row["method"], row["epsilon"], row["canaries"]), []).append(row)
    lines = ["| method | ε | m | seeds | Steinke bound (ceiling) | f-DP bound (ceiling) | f-DP share of ceiling | "
             "max bound ≤ reported ε |", "|---|---|---|---|---|---|---|---|"]
    for (method, epsilon, m), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], -(kv[0][1] or 1e9), kv[0][2])):
        def stat(key):
            values = [r[key] for r in runs]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.2f} ± {sd:.2f}"
        share = statistics.mean(r["fdp"] / r["fdp_ceiling"] for r in runs if r["fdp_ceiling"] > 0)
        top = max(max(r["steinke"], r["fdp"]) for r in runs)
        below = "–" if epsilon is None else ("yes" if all(max(r["steinke"], r["fdp"]) <= r["epsilon_reported"]
                                                           for r in runs) else f"NO ({top:.2f})")
        lines.append(f"| {method} | {'∞' if epsilon is None else epsilon:g} | {m} | {len(runs)} | {stat('steinke')} "
                     f"({runs[0]['steinke_ceiling']:.2f}) | {stat('fdp')} ({runs[0]['fdp_ceiling']:.2f}) | "
                     f"{100 * share:.0f} % | {below} |" if epsilon is not None else
                     f"| {method} | ∞ | {m} | {len(runs)} | {stat('steinke')} ({runs[0]['steinke_ceiling']:.2f}) | "
                     f"{stat('fdp')} ({runs[0]['fdp_ceiling']:.2f}) | {100 * share:.0f} % | {below} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/audit-power")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--canaries", default="128,512")
    parser.add_argument("--method", default="dp-sgd")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for m in [int(x) for x in args.canaries.split(",")]:
        for epsilon in EPSILONS:
            for seed in [int(x) for x in args.seeds.split(",")]:
                rows.append(cell(out, args.method, epsilon, m, seed))
    print(table(rows))


if __name__ == "__main__":
    main()

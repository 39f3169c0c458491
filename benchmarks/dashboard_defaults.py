"""The numbers behind the dashboard's defaults (docs/DASHBOARD.md): the Fine-tune tab's defaults and the
privacy-utility tab's default ε, each a real run built exactly as the tab builds it.

    python benchmarks/dashboard_defaults.py [--repeats 3] [--epsilons 0.3,1,3,8] [--json out.json]

Every run uses the app's settings (tiny preset, its public warm start, the parity task) and the tab's widget
defaults (batch 32, method-default learning rate, token prune ratio 0.75, update prune ratio 0.2) with fresh
secret noise, as a user's click would. Reported: test accuracy, its verdict against chance (the page's own
``toolkit.dashboard.reference.result_verdict``) and CPU seconds of one thread (``time.process_time`` with one torch
thread: comparable on a loaded machine, an upper bound for wall time on a quiet core).
"""
from __future__ import annotations

import argparse
import json
import time

import pandas as pd
import torch
from tqdm.auto import tqdm

from toolkit.dashboard.budget import BUDGET_RATIO
from toolkit.dashboard.common import AppSettings
from toolkit.dashboard.reference import result_verdict
from toolkit.dashboard.tabs.finetune import DEFAULT_BATCH_SIZE, DEFAULT_STEPS, build_train_config
from toolkit.train import train
from toolkit.vocabulary import format_epsilon, parse_epsilons


def tab_config(settings: AppSettings, method: str, epsilon: float, steps: int):
    """The ``TrainConfig`` the Fine-tune tab runs for these values and its other widgets at their defaults."""
    return build_train_config(settings, method, epsilon, 1e-5, BUDGET_RATIO, 0.75, 16, None, 0.2, steps,
                              DEFAULT_BATCH_SIZE, "")


def measure(settings: AppSettings, method: str, epsilon: float, steps: int) -> dict:
    config = tab_config(settings, method, epsilon, steps)
    started = time.process_time()
    result = train(config)
    read = result_verdict(config, result)
    return dict(method=method, epsilon=epsilon, steps=steps, accuracy=100 * result.accuracy,
                verdict="learned" if read["learned"] else f"not learned (baseline: {read['baseline']})",
                cpu_s=time.process_time() - started)


def plan(repeats: int, epsilons: list[float]) -> list[tuple[str, float, int]]:
    runs = []
    for steps in (20, DEFAULT_STEPS):                       # the old default and the current one
        runs += [("dual-priv", 3.0, steps)] * repeats + [("dp-sgd", 3.0, steps), ("non-private", float("inf"), steps)]
    for epsilon in epsilons:                                 # the privacy-utility tab's curve at the default steps
        if epsilon != 3.0:
            runs += [("dual-priv", epsilon, DEFAULT_STEPS), ("dp-sgd", epsilon, DEFAULT_STEPS)]
    return runs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="Dual-Priv runs at the Fine-tune defaults")
    parser.add_argument("--epsilons", default="0.3,1,3,8", help="the privacy-utility curve's ε")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    try:
        epsilons = parse_epsilons(args.epsilons)
    except ValueError as err:
        parser.error(f"--epsilons: {err}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    torch.set_num_threads(1)
    settings = AppSettings()
    rows = [measure(settings, *run) for run in tqdm(plan(args.repeats, epsilons), desc="dashboard defaults")]
    table = pd.DataFrame(rows)
    table["epsilon"] = table["epsilon"].map(lambda e: format_epsilon(e, 2))
    print(table.round(1).to_string(index=False))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2, default=str)


if __name__ == "__main__":
    main()

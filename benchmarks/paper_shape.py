"""The paper's memory table at LLaVA-1.5-7B shapes: measured on a GPU, or estimated from shallow models on a CPU.

    # a GPU with ~40 GB free: the real 32-layer / 24-layer shapes, measured
    python benchmarks/paper_shape.py --device cuda --full
    # a CPU (or a small GPU): the 7B widths at a few depths, extrapolated to 32 LM / 24 vision layers
    python benchmarks/paper_shape.py --device cpu --batch-size 4 --json paper_shape.json

Preset ``llava-7b-shape`` (random weights: CLIP ViT-L/14-336 = 576 patches + [CLS], Llama 4096 x 32 layers,
vocab 32000), bf16, LoRA r=8 on every LM linear + the projector (the paper's trainable set), AdamW; the vision tower
runs inside every step (frozen, no grad). Dual-Priv keeps 64 of 576 visual tokens and zeroes 20% of the noisy
update; the other methods see all 576. Each method runs in a fresh subprocess (:mod:`toolkit.bench`).

The estimate (``--full`` not given). Every peak and step time is measured at three depths: (L, V) = (l1, v1),
(l2, v1), (l1, v2) LM / vision layers. Memory and time of a transformer step are affine in the number of
identical layers, so per method::

    per_lm     = M(l2, v1) - M(l1, v1)          / (l2 - l1)
    per_vision = M(l1, v2) - M(l1, v1)          / (v2 - v1)
    fixed      = M(l1, v1) - l1 * per_lm - v1 * per_vision   (embeddings, LM head, projector, logits, optimizer)
    M(32, 24)  = fixed + 32 * per_lm + 24 * per_vision

and the same for the step time (tokens/s = tokens per step / estimated time). The ratios and the targets are
computed from these estimates, all from one run. On a CPU the result is labelled "CPU estimate; GPU measurement
pending": CPU tensor bytes are what a CUDA caching allocator would need at least (no fragmentation, no cuBLAS
workspaces), and CPU step times say nothing about GPU throughput ratios.

Targets (issue 11), ratios from one run:
  * Dual-Priv(576 -> 64) peak memory <= 0.6 x DP-SGD(576) and <= 1.0 x DP-ZO(576)
  * DP-SGD <= 1.1 x non-private memory and >= 0.8 x its throughput at equal tokens (576)
A missed target is printed as MISSED, never hidden.
"""
from __future__ import annotations

import argparse
import json
import math

import pandas as pd

from toolkit.bench import add_ratios, format_table, run_bench

METHODS = ("non-private", "dp-sgd", "dual-priv", "dp-zo")
TARGETS = (  # (label, numerator, denominator, column, target, "<=" or ">=")
    ("dual-priv(64) memory / dp-sgd(576)", "dual-priv", "dp-sgd", "peak_memory_mb", 0.6, "<="),
    ("dual-priv(64) memory / dp-zo(576)", "dual-priv", "dp-zo", "peak_memory_mb", 1.0, "<="),
    ("dp-sgd / non-private memory (576)", "dp-sgd", "non-private", "peak_memory_mb", 1.1, "<="),
    ("dp-sgd / non-private tokens/s (576)", "dp-sgd", "non-private", "tokens_per_s", 0.8, ">="),
)


def measure(depth: tuple[int, int] | None, args) -> pd.DataFrame:
    lm_layers, vision_layers = depth if depth is not None else (None, None)
    table = run_bench(args.methods.split(","), preset=args.preset, batch_size=args.batch_size, steps=args.steps,
                      keep_tokens=args.keep, token_prune_ratio=None, trainable="lora", device=args.device,
                      dtype=args.dtype, lm_layers=lm_layers, vision_layers=vision_layers,
                      activation_checkpointing=args.activation_checkpointing)
    return table


def extrapolate(tables: dict, l1: int, l2: int, v1: int, v2: int, lm_target: int, vision_target: int) -> pd.DataFrame:
    """Affine-in-depth estimate at (lm_target, vision_target) layers (see the module docstring)."""
    base, deeper_lm, deeper_vision = (tables[k].set_index("method") for k in ((l1, v1), (l2, v1), (l1, v2)))
    rows = []
    for method in base.index:
        row = dict(method=method, visual_tokens=int(base.loc[method, "visual_tokens"]))
        for column in ("peak_memory_mb", "step_time_s"):
            per_lm = (deeper_lm.loc[method, column] - base.loc[method, column]) / (l2 - l1)
            per_vision = (deeper_vision.loc[method, column] - base.loc[method, column]) / (v2 - v1)
            fixed = base.loc[method, column] - l1 * per_lm - v1 * per_vision
            row[column] = round(float(fixed + lm_target * per_lm + vision_target * per_vision), 4)
            row[f"{column}_fixed"] = round(float(fixed), 4)
            row[f"{column}_per_lm_layer"] = round(float(per_lm), 4)
            row[f"{column}_per_vision_layer"] = round(float(per_vision), 4)
        row["tokens_per_step"] = int(base.loc[method, "tokens_per_step"])
        if row["step_time_s_per_lm_layer"] <= 0 or row["step_time_s"] <= 0:
            # a deeper model measured faster: timing noise (a shared machine) exceeds the signal; no estimate
            row["step_time_s"] = float("nan")
        row["tokens_per_s"] = round(row["tokens_per_step"] / row["step_time_s"], 2)
        for column in ("batch_size", "preset", "dtype", "memory_method", "device", "trainable_params"):
            row[column] = base.loc[method, column]
        row["lm_layers"], row["vision_layers"] = lm_target, vision_target
        rows.append(row)
    return add_ratios(pd.DataFrame(rows)).join(pd.DataFrame(rows).set_index("method").filter(regex="_fixed$|_per_lm_layer$|_per_vision_layer$"),
                                               on="method")


def check_targets(table: pd.DataFrame) -> list[dict]:
    row = table.set_index("method")
    out = []
    for label, num, den, column, target, sense in TARGETS:
        if num not in row.index or den not in row.index:
            continue  # a method left out with --methods
        value = float(row.loc[num, column] / row.loc[den, column])
        if math.isnan(value):
            out.append(dict(check=label, ratio=value, target=f"{sense} {target}",
                            status="NOT ESTIMABLE (timing noise: a deeper model measured faster)"))
            continue
        met = value <= target if sense == "<=" else value >= target
        out.append(dict(check=label, ratio=round(value, 3), target=f"{sense} {target}", status="met" if met else "MISSED"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llava-7b-shape")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all four)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--keep", type=int, default=64, help="visual tokens Dual-Priv keeps (of 576)")
    parser.add_argument("--steps", type=int, default=3, help="warm-up + profiled + timed steps (>= 3)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                        help="default: the preset's (on for llava-7b-shape)")
    parser.add_argument("--full", action="store_true", help="measure the preset's real depth (needs a GPU)")
    parser.add_argument("--lm-layers", default="1,2", help="two LM depths for the estimate")
    parser.add_argument("--vision-layers", default="2,3", help="two vision depths for the estimate (>= 2)")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--measured", metavar="PATH",
                        help="re-use the per-depth tables of an earlier run's --json instead of measuring again")
    args = parser.parse_args()
    earlier = {}
    if args.measured:
        with open(args.measured) as f:
            earlier = {key: pd.DataFrame(rows) for key, rows in json.load(f)["measured"].items()}

    if args.full:
        table = measure(None, args)
        label = f"measured on {table.device.iloc[0]}"
        depths = {}
    else:
        l1, l2 = (int(x) for x in args.lm_layers.split(","))
        v1, v2 = (int(x) for x in args.vision_layers.split(","))
        depths = {}
        for depth in ((l1, v1), (l2, v1), (l1, v2)):
            key = f"{depth[0]}lm_{depth[1]}vision"
            depths[depth] = earlier[key] if key in earlier else measure(depth, args)
            if args.json:  # keep what was measured so far: a later failure need not cost the measurements
                with open(args.json, "w") as f:
                    json.dump(dict(measured={f"{k[0]}lm_{k[1]}vision": v.to_dict(orient="records")
                                             for k, v in depths.items()}), f, indent=2, default=str)
            print(f"\n== measured: {args.preset} at {depth[0]} LM / {depth[1]} vision layers, batch {args.batch_size}, "
                  f"{depths[depth].dtype.iloc[0]} on {depths[depth].device.iloc[0]} ==")
            print(format_table(depths[depth]))
        table = extrapolate(depths, l1, l2, v1, v2, 32, 24)
        on_cpu = str(table.device.iloc[0]).startswith("cpu")
        label = ("CPU estimate; GPU measurement pending" if on_cpu else f"estimate on {table.device.iloc[0]}") + \
            f" (affine in depth from {l1}/{l2} LM and {v1}/{v2} vision layers)"
    print(f"\n== {args.preset}, 32 LM / 24 vision layers, batch {args.batch_size}: {label} ==")
    print(format_table(table))
    if not args.full:
        per = table[["method", "peak_memory_mb_fixed", "peak_memory_mb_per_lm_layer", "peak_memory_mb_per_vision_layer",
                     "step_time_s_fixed", "step_time_s_per_lm_layer"]]
        print("\nper-layer terms (MB, s):")
        print(per.to_string(index=False))
    checks = check_targets(table)
    print(f"\n== targets ({label}) ==")
    print(pd.DataFrame(checks).to_string(index=False))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(label=label, table=table.to_dict(orient="records"), checks=checks,
                           measured={f"{k[0]}lm_{k[1]}vision": v.to_dict(orient="records") for k, v in depths.items()}),
                      f, indent=2, default=str)


if __name__ == "__main__":
    main()

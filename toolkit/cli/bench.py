"""``python -m toolkit bench``: peak memory and step time of several methods, side by side, in one run."""
from __future__ import annotations

import sys
import time

from toolkit.cli import subcommand
from toolkit.cli.train import flag_type, parse_bool
from toolkit.config import LORA_VARIANTS, OPTIMIZERS
from toolkit.models import PRESETS
from toolkit.precision import TRAINABLE_DTYPES


@subcommand("bench", help="side-by-side peak memory and step time of the methods on one model and batch")
def run(args) -> list[dict]:
    from toolkit.bench import bench_defaults, format_table, run_bench

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    # a preset may name its own defaults (llava-7b-shape: the paper's LoRA and 576 -> 64 tokens)
    defaults = bench_defaults(args.preset)
    trainable = args.trainable or defaults["trainable"]
    keep_tokens = args.keep_tokens if args.keep_tokens is not None else defaults["keep_tokens"]
    started = time.perf_counter()

    def tell(method: str, text: str) -> None:   # stderr: stdout holds the table (and --json's rows)
        print(f"[{time.perf_counter() - started:7.0f} s] {method}: {text}", file=sys.stderr, flush=True)

    table = run_bench(methods=methods, preset=args.preset, batch_size=args.batch_size, steps=args.steps,
                      token_strategy=args.token_strategy, keep_tokens=keep_tokens,
                      token_prune_ratio=None if keep_tokens else args.token_prune_ratio,
                      grad_prune_ratio=args.grad_prune_ratio, trainable=trainable,
                      grad_sample_mode=args.grad_sample_mode, tower_in_step=not args.cached_features,
                      isolate=not args.in_process, device=args.device, dtype=args.dtype, lm_layers=args.lm_layers,
                      vision_layers=args.vision_layers, activation_checkpointing=args.activation_checkpointing,
                      optimizer=args.optimizer, lora_variant=args.lora_variant, trainable_dtype=args.trainable_dtype,
                      progress=lambda method, i, n: tell(method, f"method {i + 1} of {n}"), on_phase=tell)
    print(format_table(table))
    first = table.iloc[0]
    backward = table[table["method"] != "dp-zo"]   # DP-ZO's update has no inner optimizer
    optimizer = backward.iloc[0]["optimizer"] if len(backward) else "none"
    print(f"\nmemory: {first['memory_method']} on {first['device']}; {first['dtype']}; preset {first['preset']} with "
          f"{first['lm_layers']} LM / {first['vision_layers']} vision layers; batch {first['batch_size']}; "
          f"tower {'inside' if not args.cached_features else 'outside'} the step; optimizer {optimizer} "
          f"(DP-ZO: its own SGD update, no state); LoRA {args.lora_variant}; trained weights in "
          f"{first['trainable_dtype']}")
    return table.to_dict(orient="records")


@run.configure
def configure(parser) -> None:
    parser.add_argument("--methods", default="non-private,dp-sgd,dual-priv,dp-zo",
                        help="comma-separated, each in a fresh subprocess (default: all four)")
    parser.add_argument("--preset", default="tiny",
                        help=f"model preset: {', '.join(PRESETS)} (default tiny; llava-7b-shape is LLaVA-1.5-7B's "
                             "size, 14 GB of weights in bf16: shallower with --lm-layers / --vision-layers)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples in the measured batch (default 8)")
    parser.add_argument("--steps", type=int, default=4,
                        help="warm-up + profiled + timed steps (>= 3; default 4)")
    parser.add_argument("--token-strategy", default="dual-priv",
                        help="how Dual-Priv chooses its visual tokens (default dual-priv)")
    parser.add_argument("--keep-tokens", type=int, default=None,
                        help="visual tokens Dual-Priv keeps (default: the preset's, else --token-prune-ratio)")
    parser.add_argument("--token-prune-ratio", type=float, default=0.75,
                        help="share of visual tokens Dual-Priv prunes, in [0, 1) (default 0.75; --keep-tokens wins)")
    parser.add_argument("--grad-prune-ratio", type=float, default=0.2,
                        help="share of Dual-Priv's noisy update zeroed, in [0, 1) (default 0.2)")
    parser.add_argument("--trainable", default=None, help="default: the preset's, else lora+head")
    parser.add_argument("--grad-sample-mode", default=None,
                        help="per-example clipping: hooks, functorch, ghost, ghost-fp32, ghost-fp32-bk (default: the preset's, "
                             "ghost-fp32 for llava-7b-shape, else hooks)")
    parser.add_argument("--cached-features", action="store_true", help="run the vision tower outside the step")
    parser.add_argument("--in-process", action="store_true", help="no fresh subprocess per method")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16")
    parser.add_argument("--lm-layers", type=int, default=None, help="override the preset's LM depth (same widths)")
    parser.add_argument("--vision-layers", type=int, default=None,
                        help="override the preset's vision depth (>= 2, same widths)")
    parser.add_argument("--optimizer", default=None, choices=OPTIMIZERS,
                        help="the inner optimizer of the methods with a backward (its state is part of their memory); "
                             "default: the preset's (sgd, with momentum, for llava-7b-shape), else adam")
    parser.add_argument("--trainable-dtype", default=None, choices=TRAINABLE_DTYPES,
                        help="the trained weights' dtype: float32 (mixed precision beside a bf16 model) or model "
                             "(the model's dtype); default: the preset's, else float32")
    parser.add_argument("--lora-variant", default="standard", choices=LORA_VARIANTS,
                        help="'ffa': LoRA's A matrices frozen (FFA-LoRA), for every method")
    # spelled as train spells it (--activation-checkpointing true); the bare switch and --no- form still work
    parser.add_argument("--activation-checkpointing", nargs="?", const=True, default=None, metavar="{true,false}",
                        type=flag_type(parse_bool),
                        help="recompute LM layer activations in backward (not for dp-zo, which has no backward); "
                             "default: the preset's (on for llava-7b-shape), else off")
    parser.add_argument("--no-activation-checkpointing", dest="activation_checkpointing", action="store_const",
                        const=False, help="the same as --activation-checkpointing false")

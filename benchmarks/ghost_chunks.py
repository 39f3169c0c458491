"""ghost-fp32's per-example products: one example at a time (the CPU budget) against chunks of examples (the CUDA
budget, ``CHUNK_BYTES``), side by side in one run, at LLaVA-7B's trainable shapes.

    OMP_NUM_THREADS=1 python benchmarks/ghost_chunks.py [--repeats 5] [--device cpu]

For each layer shape and batch, the norms (pass 1) and the clipped sum (pass 2) are computed from the same bf16
input and output gradient with both budgets, alternately, ``--repeats`` times; the median times and their ratio
(chunks / one at a time: below 1 means chunks are faster) are printed, and the results are checked equal. Why
it exists: the CPU default (one example at a time) rests on this measurement (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from toolkit.privacy.linear_grads import CHUNK_BYTES, linear_clipped_sum_blocks, linear_norms_sq

# (name, d_in, d_out, tokens per example): LoRA rank 8 on a 4096-wide attention projection, the projector's two
# layers over the kept visual tokens; 77 tokens = 64 kept visual + 13 text (Dual-Priv), 589 = 576 + 13 (DP-SGD)
LAYERS = (("lora_A", 4096, 8), ("lora_B", 8, 4096), ("projector.0", 1024, 4096), ("projector.2", 4096, 4096))
CASES = ((16, 77), (4, 589))


def one_pass(a: torch.Tensor, g: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    norms = linear_norms_sq(a, g, True, False, torch.float32, budget=budget)
    factors = (1.0 / norms.sqrt().clamp(min=1.0)).float()
    blocks = [block for _, _, block in linear_clipped_sum_blocks(a, g, factors, True, False, torch.float32,
                                                                 budget=budget)]
    return norms, torch.cat(blocks)


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    print(f"torch threads {torch.get_num_threads()}, device {args.device}, chunk budget {CHUNK_BYTES >> 20} MiB")
    print(f"{'layer':<12} {'batch':>5} {'tokens':>6} {'one at a time':>14} {'chunks':>10} {'chunks / one':>13}")
    for batch, tokens in CASES:
        for name, d_in, d_out in LAYERS:
            a = torch.randn(batch, tokens, d_in, generator=gen).to(args.device, torch.bfloat16)
            g = torch.randn(batch, tokens, d_out, generator=gen).to(args.device, torch.bfloat16)
            times = {0: [], CHUNK_BYTES: []}
            results = {}
            for _ in range(args.repeats):
                for budget in times:     # alternately, so a load change hits both
                    seconds, results[budget] = timed(lambda: one_pass(a, g, budget))
                    times[budget].append(seconds)
            for x, y in zip(results[0], results[CHUNK_BYTES]):
                torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
            loop, chunked = statistics.median(times[0]), statistics.median(times[CHUNK_BYTES])
            print(f"{name:<12} {batch:>5} {tokens:>6} {loop * 1e3:>11.1f} ms {chunked * 1e3:>7.1f} ms "
                  f"{chunked / loop:>12.2f}x")


if __name__ == "__main__":
    main()

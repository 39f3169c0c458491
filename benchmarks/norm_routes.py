"""ghost-fp32's two routes to an example's weight-gradient norm, side by side in one run: the ghost norm
``Σ (A_iA_iᵀ)⊙(G_iG_iᵀ)`` against the example's gradient ``G_iᵀA_i`` itself, at LLaVA-7B's and the tiny preset's
trainable shapes, with the route :func:`toolkit.privacy.linear_grads.direct_route` picks; and what book-keeping
holds per example for each layer (its A and G, or its fp32 gradient).

    OMP_NUM_THREADS=1 python benchmarks/norm_routes.py [--repeats 5]

Both routes run alternately on the same bf16 A and G, ``--repeats`` times; the medians, their ratio (direct /
ghost: below 1 means the gradient itself is faster) and the picked route are printed, and the norms are checked
equal. Why it exists: the rule ``d_in·d_out ≤ T·(d_in + d_out)`` rests on this (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from toolkit.privacy.linear_grads import direct_route, linear_norms_sq

# (name, d_in, d_out, batch, tokens per example): LoRA rank 8 on a 4096-wide projection and the 7B projector over
# 77 tokens (64 kept visual + 13 text, Dual-Priv) and 589 (576 + 13, DP-SGD); the tiny preset's rank-8 LoRA on its
# 128-wide LM over 93 tokens (64 visual + 29 text), batch 128 as in the utility study
SHAPES = (("7B lora_A", 4096, 8, 16, 77), ("7B lora_B", 8, 4096, 16, 77), ("7B lora_A", 4096, 8, 4, 589),
          ("7B projector.0", 1024, 4096, 16, 77), ("7B projector.2", 4096, 4096, 16, 77),
          ("tiny lora_A", 128, 8, 128, 93), ("tiny lora_B", 8, 128, 128, 93))


def median_seconds(fn, times: list[float]):
    start = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - start)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    print(f"torch threads {torch.get_num_threads()}")
    print(f"{'layer':<15} {'batch':>5} {'tokens':>6} {'ghost':>10} {'direct':>10} {'direct / ghost':>15} {'picked':>7} "
          f"{'bk keeps A+G':>13} {'or fp32 grad':>13}")
    for name, d_in, d_out, batch, tokens in SHAPES:
        a = torch.randn(batch, tokens, d_in, generator=gen).to(torch.bfloat16)
        g = torch.randn(batch, tokens, d_out, generator=gen).to(torch.bfloat16)
        times = {False: [], True: []}
        norms = {}
        for _ in range(args.repeats):
            for direct in times:   # alternately, so a load change hits both
                norms[direct] = median_seconds(
                    lambda: linear_norms_sq(a, g, True, False, torch.float32, budget=0, direct=direct), times[direct])
        torch.testing.assert_close(norms[True], norms[False], rtol=1e-3, atol=1e-3)
        ghost, direct = statistics.median(times[False]), statistics.median(times[True])
        picked = "direct" if direct_route(tokens, d_in, d_out) else "ghost"
        print(f"{name:<15} {batch:>5} {tokens:>6} {ghost * 1e3:>7.1f} ms {direct * 1e3:>7.1f} ms {direct / ghost:>14.2f}x "
              f"{picked:>7} {tokens * (d_in + d_out) * 2 / 1024:>10.0f} KiB {d_in * d_out * 4 / 1024:>9.0f} KiB")


if __name__ == "__main__":
    main()

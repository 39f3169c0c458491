"""Mechanism 2's global top-k mask: the former selection (concatenate + ``kthvalue`` + int64 ``cumsum``) against
the radix select of :mod:`toolkit.privacy.magnitude_select`, side by side in one run.

    PYTHONPATH=. python benchmarks/update_mask_selection.py                 # 7B-shape LoRA set, 2 and 32 LM layers
    PYTHONPATH=. python benchmarks/update_mask_selection.py --lm-layers 2 --repeats 3

The tensors are random N(0, 1) "noisy gradients" with the shapes of the ``llava-7b-shape`` preset's trainable set
(LoRA r=8 on every LM linear + the projector, taken from a meta-device build: no weights are allocated), in bf16
as on the GPU. For each implementation: the median wall time over ``--repeats`` calls (the two alternate, so load
from other jobs hits both alike), and the peak tensor bytes allocated during one call (torch profiler allocation
events, :func:`toolkit.metering.measure_peak` with no baseline), split into the output masks (1 byte per
coordinate, the same for both) and the transient beyond them. The masks of the two are checked equal.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from toolkit.metering import MB, measure_peak
from toolkit.models import apply_trainable, build_model
from toolkit.privacy.update_masks import _n_pruned, magnitude_mask


def former_magnitude_mask(tensors: list[torch.Tensor], ratio: float) -> list[torch.Tensor]:
    """The selection as it was before issue 23 (global scope), kept here as the reference to beat."""
    dtype = torch.float32
    for g in tensors:
        dtype = torch.promote_types(dtype, g.dtype)
    flat = torch.cat([g.detach().reshape(-1).abs().to(dtype) for g in tensors])
    n_prune = _n_pruned(flat.numel(), ratio)
    threshold = torch.kthvalue(flat, n_prune).values
    below = flat < threshold
    at = flat == threshold
    still_needed = n_prune - int(below.sum())
    keep = ~(below | (at & (torch.cumsum(at, dim=0) <= still_needed)))
    return [piece.view(g.shape) for piece, g in zip(keep.split([g.numel() for g in tensors]), tensors)]


def trainable_shapes(lm_layers: int, vision_layers: int = 2) -> list[torch.Size]:
    bundle = build_model("llava-7b-shape", device="meta", dtype=torch.bfloat16, lm_layers=lm_layers,
                         vision_layers=vision_layers)
    apply_trainable(bundle, "lora", lora_rank=8)
    return [p.shape for p in bundle.model.parameters() if p.requires_grad]


def compare(lm_layers: int, ratio: float, repeats: int, dtype: torch.dtype) -> list[dict]:
    shapes = trainable_shapes(lm_layers)
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=generator).to(dtype) for s in shapes]
    n = sum(g.numel() for g in grads)
    impls = {"former (cat + kthvalue + cumsum)": lambda: former_magnitude_mask(grads, ratio),
             "radix select (magnitude_select)": lambda: magnitude_mask(grads, ratio, "global")}
    reference, current = (impl() for impl in impls.values())
    if not all(torch.equal(a, b) for a, b in zip(reference, current)):
        raise AssertionError("the two selections disagree")
    del reference, current
    times = {name: [] for name in impls}
    for _ in range(repeats):
        for name, impl in impls.items():
            started = time.perf_counter()
            impl()
            times[name].append(time.perf_counter() - started)
    rows = []
    for name, impl in impls.items():
        peak = measure_peak(impl, baseline_tensors=[]).peak_mb
        rows.append(dict(lm_layers=lm_layers, tensors=len(shapes), coordinates=n, largest=max(s.numel() for s in shapes),
                         impl=name, time_s=statistics.median(times[name]), peak_mb=peak,
                         transient_mb=peak - n / MB))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm-layers", type=int, nargs="+", default=[2, 32])
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, ratio {args.ratio}, "
          f"median of {args.repeats}")
    header = (f"{'LM layers':>9} {'coords':>11} {'largest':>9}  {'selection':<34} {'time s':>7} {'peak MB':>8} "
              f"{'transient MB':>12} {'B/coord':>7}")
    print(header)
    for layers in args.lm_layers:
        rows = compare(layers, args.ratio, args.repeats, getattr(torch, args.dtype))
        for r in rows:
            print(f"{r['lm_layers']:>9} {r['coordinates']:>11,} {r['largest']:>9,}  {r['impl']:<34} {r['time_s']:>7.3f} "
                  f"{r['peak_mb']:>8.1f} {r['transient_mb']:>12.1f} {r['transient_mb'] * MB / r['coordinates']:>7.2f}")
        old, new = rows
        print(f"{'':>9} new / former: time {new['time_s'] / old['time_s']:.2f}x, "
              f"transient {new['transient_mb'] / old['transient_mb']:.3f}x "
              f"(largest tensor: {new['largest'] * 4 / MB:.1f} MB as fp32)")


if __name__ == "__main__":
    main()

"""Mechanism 2's selection (issue 23): the radix-select keep-mask equals the exact sort/top-k mask, ties included,
for every dtype and block layout, and its transient stays bounded by the block size, not the parameter count."""
from __future__ import annotations

import pytest
import torch

from toolkit.metering import measure_peak
from toolkit.privacy import magnitude_select
from toolkit.privacy.magnitude_select import keep_largest
from toolkit.privacy.update_masks import magnitude_mask

SHAPES = [(37, 5), (1000,), (3, 4, 5), (0,), (2049,), (1,), (64, 33)]


def exact_keep(tensors: list[torch.Tensor], k: int) -> torch.Tensor:
    """The reference: a stable full sort of all magnitudes (fp64), the first k dropped (ties: earliest first)."""
    flat = torch.cat([t.reshape(-1).double().abs() for t in tensors])
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[flat.argsort(stable=True)[:k]] = False
    return keep


def random_tensors(dtypes, kind: str, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i, shape in enumerate(SHAPES):
        t = torch.randn(shape, generator=generator, dtype=torch.float64)
        if kind == "ties":  # few distinct magnitudes: most of the threshold's bin is ties, across tensor borders
            t = (t * 2).round()
        elif kind == "zeros":
            t = t * 0
        elif kind == "neg-zero":
            t = -(t * 0)
        out.append(t.to(dtypes[i % len(dtypes)]))
    return out


@pytest.mark.parametrize("block", [7, 256, 1 << 20])
@pytest.mark.parametrize("kind", ["continuous", "ties", "zeros", "neg-zero"])
@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.bfloat16,), (torch.float16,), (torch.float64,),
                                    (torch.bfloat16, torch.float32)], ids=["fp32", "bf16", "fp16", "fp64", "mixed"])
def test_keep_mask_equals_the_exact_sorted_mask_ties_included(monkeypatch, block, kind, dtypes):
    monkeypatch.setattr(magnitude_select, "_BLOCK_ELEMENTS", block)
    tensors = random_tensors(dtypes, kind, seed=block)
    n = sum(t.numel() for t in tensors)
    for k in (0, 1, n // 10, n // 3, n // 2, n - 1, n):
        masks = keep_largest(tensors, k)
        assert [m.shape for m in masks] == [t.shape for t in tensors]
        assert all(m.dtype == torch.bool for m in masks)
        assert torch.equal(torch.cat([m.reshape(-1) for m in masks]), exact_keep(tensors, k)), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropped_values_are_the_topk_smallest(dtype):
    tensors = random_tensors((dtype,), "continuous", seed=3)
    flat = torch.cat([t.reshape(-1).float().abs() for t in tensors])
    k = flat.numel() // 5
    keep = torch.cat([m.reshape(-1) for m in keep_largest(tensors, k)])
    smallest = torch.topk(flat, k, largest=False).values
    assert torch.equal(flat[~keep].sort().values, smallest.sort().values)


def test_the_threshold_bin_is_refined_when_too_many_values_share_its_top_bits(monkeypatch):
    # fp32 values differing only in the low 16 bits: one 16-bit bin holds them all, more than a block
    monkeypatch.setattr(magnitude_select, "_BLOCK_ELEMENTS", 64)
    base = torch.tensor(1.0).view(torch.int32)
    bits = base + torch.randperm(5000, generator=torch.Generator().manual_seed(0)).to(torch.int32) % 700
    tensors = [bits[:3000].view(torch.float32).reshape(30, 100), -bits[3000:].view(torch.float32)]
    for k in (1, 999, 2500, 4999):
        got = torch.cat([m.reshape(-1) for m in keep_largest(tensors, k)])
        assert torch.equal(got, exact_keep(tensors, k))


def test_nan_magnitudes_rank_above_infinity():
    t = torch.tensor([float("nan"), float("inf"), 1.0, -float("inf"), 0.0])
    assert keep_largest([t], 2)[0].tolist() == [True, True, False, True, False]
    assert keep_largest([t], 3)[0].tolist() == [True, False, False, True, False]  # the earlier inf goes first
    assert keep_largest([t], 4)[0].tolist() == [True, False, False, False, False]


def test_global_and_per_tensor_masks_use_the_exact_selection():
    tensors = random_tensors((torch.float32,), "ties", seed=1)
    n = sum(t.numel() for t in tensors)
    glob = magnitude_mask(tensors, 0.3, "global")
    assert torch.equal(torch.cat([m.reshape(-1) for m in glob]), exact_keep(tensors, int(0.3 * n)))
    for t, m in zip(tensors, magnitude_mask(tensors, 0.3, "per-tensor")):
        assert torch.equal(m.reshape(-1), exact_keep([t], int(0.3 * t.numel() + 1e-9)))


def test_transient_memory_is_bounded_by_the_block_not_the_parameter_count(monkeypatch):
    block = 1 << 14
    monkeypatch.setattr(magnitude_select, "_BLOCK_ELEMENTS", block)
    tensors = [torch.randn(1 << 20), torch.randn(300, 1000), torch.randn(5000)]
    n = sum(t.numel() for t in tensors)
    peak = measure_peak(lambda: keep_largest(tensors, n // 5), baseline_tensors=[]).peak_mb * (1 << 20)
    # the output masks (1 byte per coordinate), at most ~40 bytes per block element and a few 65536-bin int64
    # histograms (0.5 MiB each); the former selection took ≈ 21 bytes per coordinate on top of the masks
    assert peak <= n + 40 * block + 4 * (1 << 19), (peak, n)


@pytest.mark.parametrize("k", [-1, 10, 2.0, True])
def test_bad_k_is_a_value_error(k):
    with pytest.raises(ValueError, match="k must be"):
        keep_largest([torch.ones(3), torch.ones(2, 2) * 0], k)


def test_integer_tensors_are_refused_with_a_named_error():
    with pytest.raises(TypeError, match="float tensors"):
        keep_largest([torch.arange(4, dtype=torch.float32), torch.tensor([1 + 2j])], 1)


@pytest.mark.parametrize("sample", [1, 3, 1 << 16])
@pytest.mark.parametrize("kind", ["continuous", "ties"])
def test_the_result_never_depends_on_the_bracketing_sample(monkeypatch, sample, kind):
    """The one-pass bracket (fast path) and the radix fallback (when a tiny sample misses) give the exact mask."""
    monkeypatch.setattr(magnitude_select, "_SAMPLE", sample)
    tensors = random_tensors((torch.float32,), kind, seed=sample)
    n = sum(t.numel() for t in tensors)
    for k in (1, n // 7, n // 2, n - 1):
        assert torch.equal(torch.cat([m.reshape(-1) for m in keep_largest(tensors, k)]), exact_keep(tensors, k))


def test_the_fast_path_takes_continuous_data_in_one_pass():
    tensors = random_tensors((torch.bfloat16,), "continuous", seed=5)
    masks = [torch.ones(t.shape, dtype=torch.bool) for t in tensors]
    flats = [t.reshape(-1) for t in tensors]
    blocks = magnitude_select._plan_blocks(tensors, magnitude_select._BLOCK_ELEMENTS)
    assert magnitude_select._bracketed_selection(masks, tensors, flats, blocks, torch.bfloat16, 1000)
    assert torch.equal(torch.cat([m.reshape(-1) for m in masks]), exact_keep(tensors, 1000))

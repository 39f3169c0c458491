"""Sampling: Poisson batches vary in size and match q in expectation, empty batches happen, resumption
continues the same stream, fixed batches are refused in private mode without an explicit opt-in."""
from __future__ import annotations

import warnings

import pytest
import torch

from toolkit.privacy.sampling import (
    FixedBatchSampler,
    FixedBatchesInPrivateModeError,
    PoissonSampler,
    check_sampling,
    sample_rate_for,
)


def test_poisson_batch_sizes_vary_and_match_q():
    n, q, steps = 1000, 0.05, 400
    batches = list(PoissonSampler(n, q, seed=0, steps=steps))
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    assert len(batches) == steps
    assert sizes.std() > 3  # Binomial(1000, 0.05): sd ≈ 6.9; fixed-size batches would give 0
    # mean of 400 Binomial draws: sd ≈ 6.9 / 20 ≈ 0.34
    assert abs(sizes.mean() - n * q) < 5 * 0.35
    counts = torch.zeros(n)
    for b in batches:
        assert b.dtype == torch.int64 and b.dim() == 1
        assert len(b) == len(torch.unique(b))  # without replacement within a step
        counts[b] += 1
    # each record joins with probability q at each step, independently of the others
    freq = counts / steps
    assert abs(freq.mean() - q) < 0.005
    assert freq.std() == pytest.approx((q * (1 - q) / steps) ** 0.5, rel=0.2)


def test_poisson_empty_batches_happen_and_are_empty_long_tensors():
    batches = list(PoissonSampler(10, 0.05, seed=1, steps=200))
    empty = [b for b in batches if len(b) == 0]
    assert 0.45 < len(empty) / 200 < 0.75  # P(empty) = 0.95^10 ≈ 0.60
    assert all(b.dtype == torch.int64 and b.shape == (0,) for b in empty)


def test_poisson_is_reproducible_and_resumable():
    a = list(PoissonSampler(50, 0.2, seed=3, steps=10))
    b = list(PoissonSampler(50, 0.2, seed=3, steps=10))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    first = PoissonSampler(50, 0.2, seed=3)
    head = list(first.batches(4))
    state = first.state_dict()
    resumed = PoissonSampler(50, 0.2, seed=999)
    resumed.load_state_dict(state)
    skipped = PoissonSampler(50, 0.2, seed=3)
    skipped.skip(4)
    tail, tail_skipped = list(resumed.batches(6)), list(skipped.batches(6))
    for x, y, z in zip(head + tail, a, head + tail_skipped):
        assert torch.equal(x, y) and torch.equal(z, y)
    with pytest.raises(ValueError):
        PoissonSampler(51, 0.2).load_state_dict(state)


def test_sample_rate_comes_from_declared_size():
    assert sample_rate_for(8, 700) == 8 / 700
    for bad in [(0, 10), (11, 10), (2, 0), (2.0, 10)]:
        with pytest.raises(ValueError):
            sample_rate_for(*bad)
    for bad in [dict(n_records=0, sample_rate=0.1), dict(n_records=10, sample_rate=0.0),
                dict(n_records=10, sample_rate=1.1), dict(n_records=10, sample_rate=0.1, steps=-1)]:
        with pytest.raises(ValueError):
            PoissonSampler(**bad)


def test_fixed_batches_are_shuffled_epochs():
    sampler = FixedBatchSampler(10, 4, seed=0, steps=6)
    batches = list(sampler)
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]
    assert sorted(torch.cat(batches[:3]).tolist()) == list(range(10))
    assert [len(b) for b in FixedBatchSampler(10, 4, seed=0, drop_last=True)] == [4, 4]


def test_fixed_batches_refused_in_private_mode_without_opt_in():
    check_sampling(private=True, sampling="poisson", allow_fixed_batches=False)
    check_sampling(private=False, sampling="fixed", allow_fixed_batches=False)
    with pytest.raises(FixedBatchesInPrivateModeError, match="Poisson"):
        check_sampling(private=True, sampling="fixed", allow_fixed_batches=False)
    with pytest.warns(UserWarning, match="NOT a proven guarantee"):
        check_sampling(private=True, sampling="fixed", allow_fixed_batches=True)
    with pytest.raises(ValueError, match="unknown sampling"):
        check_sampling(private=False, sampling="shuffle", allow_fixed_batches=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_sampling(private=False, sampling="fixed", allow_fixed_batches=True)

"""Batch sampling: Poisson for private runs (what the accountant assumes), fixed-size batches otherwise.

The PRV/RDP accountants of :mod:`toolkit.privacy.accounting` bound the *Poisson-subsampled* Gaussian
mechanism: at every step each of the ``n`` records joins the batch independently with probability
``q``, so the batch size is random (Binomial(n, q), possibly 0) and the privacy amplification comes
from that independence. Shuffled fixed-size batches ("sampling without replacement" / shuffling) are a
different mechanism with a different (and, under substitution adjacency, weaker) analysis; running
them under a Poisson accountant reports an ε that was not proven. :func:`check_sampling` therefore
refuses fixed batches in private mode unless the caller opts in explicitly.

The sampling randomness is part of the mechanism: privacy amplification by subsampling assumes an
adversary does not know which records were drawn. A ``seed`` anyone can guess (e.g. a config's
``seed=0``) makes the batches public; use it for reproducible experiments, and ``seed=None`` (OS
entropy) or a secret seed for a run whose ε is meant as a guarantee.

``n_records`` is the *declared* size of the private data set (public by convention); the caller
derives ``q = expected_batch_size / n_records`` from it (:func:`sample_rate_for`), never from a data
loader's length, which can differ (drop_last, filtering) and would silently change q.

Example::

    >>> from toolkit.privacy.sampling import PoissonSampler, sample_rate_for
    >>> q = sample_rate_for(expected_batch_size=4, n_records=100)
    >>> sampler = PoissonSampler(100, q, seed=0, steps=3)
    >>> [batch.dtype for batch in sampler]
    [torch.int64, torch.int64, torch.int64]
"""
from __future__ import annotations

import math
import warnings

import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from toolkit.secret_random import reseed_from_os

SAMPLINGS = ("poisson", "fixed")


class FixedBatchesInPrivateModeError(ValueError):
    """Fixed-size shuffled batches were asked for in a private run without an explicit opt-in."""


def _check_n_records(n_records: int) -> int:
    if isinstance(n_records, bool) or not isinstance(n_records, int) or n_records < 1:
        raise ValueError(f"n_records must be an integer >= 1, got {n_records!r}")
    return n_records


def _make_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()  # non-deterministic
    else:
        generator.manual_seed(int(seed))
    return generator


def sample_rate_for(expected_batch_size: int, n_records: int) -> float:
    """``q = expected_batch_size / n_records`` (the declared data set size), checked to lie in (0, 1]."""
    n_records = _check_n_records(n_records)
    if isinstance(expected_batch_size, bool) or not isinstance(expected_batch_size, int) or expected_batch_size < 1:
        raise ValueError(f"expected_batch_size must be an integer >= 1, got {expected_batch_size!r}")
    if expected_batch_size > n_records:
        raise ValueError(f"expected_batch_size={expected_batch_size} exceeds the {n_records} records")
    return expected_batch_size / n_records


class StepSampler:
    """What every sampler of a run offers on top of its ``sample()`` (one step's record indices): the next
    ``steps`` batches, and ``skip`` past batches already used (a resumed run)."""

    def sample(self) -> torch.Tensor:
        raise NotImplementedError

    def batches(self, steps: int):
        """Yield the next ``steps`` batches (continuing from the current generator state)."""
        for _ in range(steps):
            yield self.sample()

    def skip(self, steps: int) -> None:
        """Advance past ``steps`` batches without using them: a run resumed at step k calls ``skip(k)`` on a
        sampler built with the same seed and then draws exactly the batches of the uninterrupted run (re-drawing
        batches 0.. again would correlate steps, which the accountant assumes independent)."""
        for _ in range(steps):
            self.sample()


class PoissonSampler(StepSampler, UniformWithReplacementSampler):
    """Poisson sampling: every step includes each record independently with probability ``sample_rate``.

    Opacus' ``UniformWithReplacementSampler`` (the same draw, ``torch.rand(n) < q`` per step), yielding
    ``LongTensor`` indices (possibly empty). Iterating yields ``steps`` batches (default: one epoch in
    expectation, ``round(1 / q)``). The randomness comes from ``generator`` (or a generator seeded from ``seed``,
    OS entropy when both are None); :meth:`state_dict` saves it so a resumed run draws the batches an
    uninterrupted one would have.
    """

    def __init__(self, n_records: int, sample_rate: float, seed: int | None = None, steps: int | None = None,
                 generator: torch.Generator | None = None, secure: bool = False):
        n_records = _check_n_records(n_records)
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) \
                or not 0.0 < float(sample_rate) <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        if steps is None:
            steps = max(1, round(1.0 / float(sample_rate)))
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
        if generator is not None and seed is not None:
            raise ValueError("give seed or generator, not both")
        if secure and seed is not None:
            raise ValueError("a secure sampler draws every batch from fresh OS randomness: a seed is refused")
        super().__init__(num_samples=n_records, sample_rate=float(sample_rate),
                         generator=generator if generator is not None else _make_generator(seed), steps=steps)
        self.secure = bool(secure)

    @property
    def n_records(self) -> int:
        return self.num_samples

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.num_samples

    def sample(self) -> torch.Tensor:
        """One Poisson batch: the sorted indices of the records drawn this step (``int64``, maybe empty)."""
        if self.secure:  # secure mode: the generator's whole state from the OS before every batch
            reseed_from_os(self.generator)
        mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
        return mask.nonzero(as_tuple=False).reshape(-1)

    def skip(self, steps: int) -> None:
        """As :meth:`StepSampler.skip`, without the index extraction (only the generator must advance)."""
        for _ in range(steps):
            torch.rand(self.num_samples, generator=self.generator)

    def __iter__(self):
        return self.batches(self.steps)

    def state_dict(self) -> dict:
        return {"n_records": self.num_samples, "sample_rate": self.sample_rate, "steps": self.steps,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if state["n_records"] != self.num_samples or state["sample_rate"] != self.sample_rate:
            raise ValueError(
                f"sampler state is for n_records={state['n_records']}, sample_rate={state['sample_rate']}; "
                f"this sampler has n_records={self.num_samples}, sample_rate={self.sample_rate}")
        self.generator.set_state(state["generator"])


class FixedBatchSampler(StepSampler):
    """Shuffled fixed-size batches (an epoch is a permutation cut into ``batch_size`` pieces).

    For NON-private runs. In a private run its ε is not what the Poisson accountant reports; see
    :func:`check_sampling`, and the run names it outside the guarantee. With ``drop_last=False`` the last batch
    of an epoch may be smaller. Iterating yields ``steps`` batches (default: one epoch), reshuffling at every
    epoch boundary. The order comes from ``generator`` (a private run passes its secret one: which records share
    a batch is secret too) or a generator seeded from ``seed``; :meth:`state_dict` saves it for a resume.
    """

    def __init__(self, n_records: int, batch_size: int, seed: int | None = None, steps: int | None = None,
                 drop_last: bool = False, generator: torch.Generator | None = None):
        self.n_records = _check_n_records(n_records)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= n_records:
            raise ValueError(f"batch_size must be an integer in [1, {n_records}], got {batch_size!r}")
        self.batch_size = batch_size
        self.drop_last = drop_last
        per_epoch = n_records // batch_size if drop_last else math.ceil(n_records / batch_size)
        self.batches_per_epoch = per_epoch
        self.steps = per_epoch if steps is None else steps
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
        if generator is not None and seed is not None:
            raise ValueError("give seed or generator, not both")
        self.generator = generator if generator is not None else _make_generator(seed)
        self._epoch: list[torch.Tensor] = []

    def sample(self) -> torch.Tensor:
        if not self._epoch:
            order = torch.randperm(self.n_records, generator=self.generator)
            self._epoch = list(order[: self.batches_per_epoch * self.batch_size].split(self.batch_size)) \
                if self.drop_last else list(order.split(self.batch_size))
        return self._epoch.pop(0)

    def __iter__(self):
        return self.batches(self.steps)

    def __len__(self) -> int:
        return self.steps

    def state_dict(self) -> dict:
        return {"n_records": self.n_records, "batch_size": self.batch_size, "generator": self.generator.get_state(),
                "epoch": [b.clone() for b in self._epoch]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n_records") != self.n_records or state.get("batch_size") != self.batch_size:
            raise ValueError(f"sampler state is for n_records={state.get('n_records')}, batch_size="
                             f"{state.get('batch_size')}; this sampler has n_records={self.n_records}, "
                             f"batch_size={self.batch_size}")
        self.generator.set_state(state["generator"])
        self._epoch = [b.clone() for b in state["epoch"]]


def check_sampling(private: bool, sampling: str, allow_fixed_batches: bool = False) -> None:
    """Refuse a sampling scheme the privacy accounting does not cover.

    * ``"poisson"``: always fine.
    * ``"fixed"``: fine when ``private`` is False. When private, raises
      :class:`FixedBatchesInPrivateModeError` unless ``allow_fixed_batches=True``; with the opt-in it
      warns, because the reported ε then comes from a Poisson analysis that does not describe shuffled
      fixed-size batches (substitution adjacency, no amplification by independent sampling): treat it
      as an approximation, not a guarantee.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"unknown sampling {sampling!r}; choose one of {SAMPLINGS}")
    if sampling == "fixed" and private:
        if not allow_fixed_batches:
            raise FixedBatchesInPrivateModeError(
                "private training needs Poisson sampling (sampling='poisson'): the PRV/RDP accountant assumes "
                "each record joins each batch independently with probability q. Shuffled fixed-size batches "
                "are a different mechanism whose epsilon this accountant does not bound; pass "
                "allow_fixed_batches=True only if you accept a reported epsilon that is not a proven guarantee.")
        warnings.warn(
            "fixed-size shuffled batches in a private run: the reported epsilon is computed as if batches "
            "were Poisson-sampled and is NOT a proven guarantee for this sampling scheme", stacklevel=2)

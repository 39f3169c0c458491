"""User-level DP: ε protects every record of one user (a patient, a person), not one image.

Implemented variant: **user-level sampling (ULS)** of Charles et al. 2024 ("Fine-tuning large language models with
user-level differential privacy"), which Chua et al. 2024 ("Mind the privacy unit!") also analyse as
user-level DP-SGD with per-user gradient averaging:

1. users, not records, are Poisson-sampled: each of the N users joins a step independently with probability
   ``q = expected_batch_size / N`` (``expected_batch_size`` counts users in this mode);
2. of a sampled user, at most K records (``user_records_per_step``) are used, chosen at random by the secret
   sampling generator;
3. the user's contribution is the **mean** of the per-example gradients of those records, and that mean is
   clipped to norm ≤ C as one unit (:class:`UserGrouping`, called by the DP engine between the backward and the
   clipping): whatever the number of records, one user moves the noised sum by at most C;
4. ``N(0, σ²C²)`` noise is added to the sum of the clipped user contributions, which is divided by the expected
   number of users; σ is calibrated, and the accountant steps, with the users' rate q. Adding or removing one user
   is then exactly the add/remove-one adjacency of record-level DP-SGD with users as records, so the same PRV/RDP
   accounting gives a user-level (ε, δ).

What is not done yet (refused with a message): DP-ZO (its per-example scalars would need the same grouping),
physical chunks (a user split across two chunks would be clipped twice), data-parallel ``torchrun`` (a user's
records could land on two ranks) and ghost clipping (it clips per row without materialising the gradients).

Example::

    >>> import torch
    >>> sampler = UserPoissonSampler([[0, 1, 2], [3], [4, 5]], sample_rate=1.0, records_per_user=2,
    ...                              generator=torch.Generator().manual_seed(0))
    >>> batch = sampler.sample()
    >>> len(batch), sorted(set(sampler.user_of[batch].tolist()))
    (5, [0, 1, 2])
"""
from __future__ import annotations

import torch

from toolkit.privacy.engine import GHOST_MODES
from toolkit.privacy.rules import declared_units
from toolkit.privacy.sampling import StepSampler

UNITS = ("record", "user")


def unit_words(epsilon_text: str, records_per_user: int) -> str:
    """What ε protects in user mode, in words (the card, run JSON and plan use it)."""
    return (f"ε = {epsilon_text} protects all records of one user (every image of one person), at most "
            f"{records_per_user} of them used per step")


def users_of(records) -> tuple[list[list[int]], list[str]]:
    """(record indices per user, user ids) of records that all carry a ``user_id``; refuses one without."""
    by_user: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        if getattr(record, "user_id", None) is None:
            raise ValueError(f"privacy_unit='user' needs a user_id on every training record; record "
                             f"{getattr(record, 'id', i)!r} has none")
        by_user.setdefault(str(record.user_id), []).append(i)
    return list(by_user.values()), list(by_user)


def check_user_mode(method: str, grad_sample_mode: str, max_physical_batch_size, world_size: int) -> None:
    """Refuse, by name, what user-level DP does not cover yet (see the module docstring)."""
    if method not in ("dp-sgd", "dual-priv"):
        raise ValueError(f"privacy_unit='user' works with dp-sgd and dual-priv; {method} is not supported yet "
                         "(dp-zo: its per-example scalars are not grouped by user)")
    if grad_sample_mode in GHOST_MODES:
        raise ValueError("privacy_unit='user' needs per-example gradients to average per user; ghost clipping never "
                         "materialises them: use grad_sample_mode='hooks'")
    if max_physical_batch_size is not None:
        raise ValueError("privacy_unit='user' with max_physical_batch_size is not supported yet (a user split "
                         "across two chunks would be clipped twice)")
    if world_size > 1:
        raise ValueError("privacy_unit='user' does not run data-parallel yet (a user's records could reach two "
                         "ranks); launch it with one process")


class UserPoissonSampler(StepSampler):
    """Poisson sampling of users; at most ``records_per_user`` random records of each sampled user per step.

    ``user_records[u]``: the record indices of user u. Yields record indices (users in order); ``user_of`` maps a
    record index to its user's index. The generator is the run's secret sampling generator."""

    def __init__(self, user_records: list[list[int]], sample_rate: float, records_per_user: int,
                 generator: torch.Generator, n_users: int | None = None):
        if not 0.0 < float(sample_rate) <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        if isinstance(records_per_user, bool) or not isinstance(records_per_user, int) or records_per_user < 1:
            raise ValueError(f"user_records_per_step must be an integer >= 1, got {records_per_user!r}")
        self.user_records = [torch.as_tensor(r, dtype=torch.long) for r in user_records]
        self.n_users = n_users or len(user_records)   # a declared (public) count may exceed the users held
        self.sample_rate, self.records_per_user, self.generator = float(sample_rate), records_per_user, generator
        n_records = sum(len(r) for r in user_records)
        self.user_of = torch.empty(n_records, dtype=torch.long)
        for u, records in enumerate(self.user_records):
            self.user_of[records] = u

    def sample(self) -> torch.Tensor:
        chosen = (torch.rand(self.n_users, generator=self.generator) < self.sample_rate).nonzero().reshape(-1)
        parts = []
        for u in chosen.tolist():
            if u >= len(self.user_records):
                continue   # a declared user not held: contributes nothing (like a record-level absent record)
            records = self.user_records[u]
            keep = torch.randperm(len(records), generator=self.generator)[:self.records_per_user]
            parts.append(records[keep.sort().values])
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)

    def state_dict(self) -> dict:
        return {"n_users": self.n_users, "sample_rate": self.sample_rate, "records_per_user": self.records_per_user,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if (state.get("n_users"), state.get("sample_rate")) != (self.n_users, self.sample_rate):
            raise ValueError(f"sampler state is for {state.get('n_users')} users at q={state.get('sample_rate')}; "
                             f"this run has {self.n_users} users at q={self.sample_rate}")
        self.generator.set_state(state["generator"])


def check_user_sampler(sampler) -> None:
    """User mode must sample users: a record-level sampler would let one user in through several records, each
    clipped and accounted as if it were a different person."""
    if not isinstance(sampler, UserPoissonSampler):
        raise ValueError(f"privacy_unit='user' needs a UserPoissonSampler (users Poisson-sampled); got "
                         f"{type(sampler).__name__}, which samples records: the user-level ε would not hold")


class UserGrouping:
    """Turns per-record gradients into per-user ones before the engine clips: the rows of ``p.grad_sample``
    ``[B, ...]`` become ``[U, ...]``, each the mean of one user's rows. ``rows`` (set before every step) gives the
    user index of each row; a user with more than K rows in one step is refused (a record-level sampler)."""

    def __init__(self, user_of: torch.Tensor, records_per_user: int):
        self.user_of, self.records_per_user = user_of, records_per_user
        self.rows: torch.Tensor | None = None

    def set_records(self, record_idx: torch.Tensor) -> None:
        self.rows = self.user_of[record_idx.cpu()]

    def __call__(self, params) -> None:
        if self.rows is None:
            raise RuntimeError("user-level step without its rows' users (set_records was not called)")
        users, inverse, counts = torch.unique(self.rows, return_inverse=True, return_counts=True)
        if int(counts.max()) > self.records_per_user:
            raise ValueError(f"user {int(users[counts.argmax()])} has {int(counts.max())} records in one step, more "
                             f"than user_records_per_step={self.records_per_user}: the batch was not drawn by the "
                             "user-level sampler")
        for p in params:
            g = p.grad_sample
            if g.shape[0] != len(self.rows):
                raise ValueError(f"per-example gradients of {g.shape[0]} rows for {len(self.rows)} records")
            index = inverse.to(g.device)
            summed = g.new_zeros((len(users), *g.shape[1:])).index_add_(0, index, g)
            p.grad_sample = summed / counts.to(g.device, g.dtype).view(-1, *([1] * (g.dim() - 1)))
        self.rows = None


class UserLevelRun:
    """What ``train`` needs for a user-level run: the users of the training set, their sampler, and the
    grouping the DP engine calls before clipping."""

    def __init__(self, c, train_set, world_size: int = 1):
        check_user_mode(c.method, c.grad_sample_mode, c.max_physical_batch_size, world_size)
        self.user_records, self.user_ids = users_of(train_set.records)
        self.n_users = declared_units(c.dataset_size, len(self.user_records), "users")
        self.records_per_user = c.user_records_per_step
        eps = "∞" if c.epsilon == float("inf") else f"{c.epsilon:g}"
        train_set.privacy_unit = unit_words(eps, self.records_per_user)

    def sampler(self, sample_rate: float, generator: torch.Generator) -> UserPoissonSampler:
        return UserPoissonSampler(self.user_records, sample_rate, self.records_per_user, generator, self.n_users)

    def attach(self, optimizer, sampler) -> None:
        """Check the sampler samples users, and make the engine average per user before it clips."""
        check_user_sampler(sampler)
        if not hasattr(optimizer, "group_rows"):
            raise ValueError(f"{type(optimizer).__name__} cannot group gradients per user")
        optimizer.group_rows = UserGrouping(sampler.user_of, self.records_per_user)

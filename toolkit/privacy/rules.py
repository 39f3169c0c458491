"""Rules a private run's parameters must keep, checked once the data set's size N is known, before any step.

* δ < 1/N. An (ε, δ) guarantee with δ ≥ 1/N is met by a mechanism that publishes one whole record chosen at
  random (it leaks a record with probability 1/N ≤ δ), so it protects nobody; the usual choice is δ ≤ 1/(10N)
  or smaller. δ ≥ 1/N is refused unless ``allow_large_delta=True`` (then named outside the guarantee and in the
  card); 1/(10N) < δ < 1/N is accepted with a warning.
* N is the units the training data holds (records, or users for user-level DP), or a declared ``dataset_size``
  when the data is a sample of a larger private set. A declared size below the units actually held contradicts
  the data, so it is refused rather than believed.
* The expected batch is at most N: q = expected_batch_size / N ≤ 1. A larger batch would be silently clamped to
  q = 1 (every record in every step), so it is refused; a batch of exactly N is q = 1, reported as such.

Example::

    >>> from toolkit.privacy.rules import check_delta
    >>> check_delta(1e-5, 400)
    >>> check_delta(0.5, 400)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: delta=0.5 is not below 1/N = 1/400 = 0.0025 (N = 400 records): ...
"""
from __future__ import annotations

import warnings


class LargeDeltaWarning(UserWarning):
    """δ is below 1/N but above the customary 1/(10N)."""


def check_delta(delta: float, n_records: int, allow_large_delta: bool = False, warn: bool = True) -> None:
    """Refuse δ ≥ 1/N (unless ``allow_large_delta``) and warn when δ > 1/(10N) (``warn=False``: a planner that
    leaves the warning to the run itself); see the module docstring."""
    limit = 1.0 / n_records
    if delta >= limit:
        if not allow_large_delta:
            raise ValueError(
                f"delta={delta:g} is not below 1/N = 1/{n_records} = {limit:.3g} (N = {n_records} records): "
                "a guarantee with delta >= 1/N allows publishing a whole record, so it protects nobody. Choose "
                f"delta <= 1/(10N) = {limit / 10:.3g} or smaller, or set allow_large_delta=True to accept it "
                "(then marked outside the guarantee and in the model card)")
    elif warn and delta > limit / 10:
        warnings.warn(f"delta={delta:g} is above 1/(10N) = {limit / 10:.3g} (N = {n_records} records): the usual "
                      "choice is delta <= 1/(10N), since delta bounds the chance the guarantee fails for a record",
                      LargeDeltaWarning, stacklevel=2)


def declared_units(dataset_size: int | None, held: int, unit: str = "records") -> int:
    """N: the ``held`` units of the training data, or a declared ``dataset_size``, refused when it is below them."""
    if dataset_size is None:
        return held
    if dataset_size < held:
        raise ValueError(f"dataset_size {dataset_size} is smaller than the training set's {held} {unit}: declare "
                         f"at least {held}, or leave dataset_size unset to use the count")
    return dataset_size


def check_batch_within_records(expected_batch_size: int, n_records: int) -> float:
    """q = expected_batch_size / N, refusing a batch larger than the N records (q would exceed 1)."""
    if expected_batch_size > n_records:
        raise ValueError(
            f"expected_batch_size={expected_batch_size} is larger than the N = {n_records} records: the sampling "
            f"rate q = batch / N would exceed 1. Use expected_batch_size <= {n_records} (= {n_records} is q = 1: "
            "every record in every step, no amplification by sampling), or declare dataset_size")
    return expected_batch_size / n_records


def check_private_run(c, n_records: int, warn: bool = True) -> float:
    """The rules for a resolved config ``c`` over ``n_records`` declared records; returns q."""
    sample_rate = check_batch_within_records(c.expected_batch_size, n_records) if c.private \
        else min(1.0, c.expected_batch_size / n_records)
    if c.private:
        check_delta(c.delta, n_records, getattr(c, "allow_large_delta", False), warn)
    return sample_rate

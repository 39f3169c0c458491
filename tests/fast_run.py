"""The settings of a fast real run, shared by the tests: a few steps on a few records of the embedded task, no
public warm start, no progress bar. A test adds what it checks (method, ε, steps, data sizes) with :func:`fast`."""
from __future__ import annotations

FAST = dict(steps=3, train_limit=32, eval_limit=8, warm_start_steps=0, expected_batch_size=8, progress=False)


def fast(**overrides) -> dict:
    """:data:`FAST` with ``overrides`` on top."""
    return {**FAST, **overrides}

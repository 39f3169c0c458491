"""What the toolkit used to do silently, said out loud (issue 22): notes on ignored settings, JSON-safe numbers.

* :func:`silent_default_notes`: settings a run accepts but does not use (ε or δ given to a non-private run);
* :func:`json_safe`: a result made strict JSON: ``inf`` becomes the string ``"inf"`` (``float("inf")`` reads it
  back), NaN becomes ``null``; Python's ``json`` would otherwise write ``Infinity`` / ``NaN``, which JSON does not
  allow and strict readers (``jq``, JavaScript's ``JSON.parse``) refuse.

Example::

    >>> json_safe({"epsilon": float("inf"), "loss": float("nan"), "steps": [1, 2.5]})
    {'epsilon': 'inf', 'loss': None, 'steps': [1, 2.5]}
"""
from __future__ import annotations

import math

from toolkit.config import TrainConfig


def silent_default_notes(config: TrainConfig, given=None) -> list[str]:
    """Sentences naming settings of ``config`` that the run ignores. A value other than the field's default
    counts as given, and so does a flag in ``given`` (parsed command-line arguments: a flag not given leaves no
    attribute), even one repeating the default."""
    notes = []
    defaults = TrainConfig()
    for name in ("epsilon", "delta", "max_grad_norm", "accountant"):
        was_given = hasattr(given, name) or getattr(config, name) != getattr(defaults, name)
        if not config.private and was_given:
            notes.append(f"{name}={getattr(config, name)!r} is ignored: method {config.method!r} is non-private "
                         "(no clipping, no noise, no guarantee); choose dp-sgd, dual-priv or dp-zo for a private run")
    return notes


def json_safe(value):
    """``value`` with every non-finite float replaced: ±inf by ``"inf"`` / ``"-inf"``, NaN by None."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value

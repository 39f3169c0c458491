"""What the toolkit used to do silently, said out loud (issue 22): notes on settings a run accepts but does not
use (ε or δ given to a non-private run). Strict JSON numbers are :func:`toolkit.vocabulary.strict_json`.

Example::

    >>> from toolkit.config import TrainConfig
    >>> silent_default_notes(TrainConfig(method="non-private", delta=1e-6))[0][:34]
    "delta=1e-06 is ignored: method 'no"
"""
from __future__ import annotations

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


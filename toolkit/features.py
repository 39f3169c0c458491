"""Visual tokens fed to the LLM: the frozen vision tower, then mechanism 1's pruner, once per record.

The tower is frozen and the pruner works on each example on its own, so every row depends on its own record
only: computing the features once before training is legitimate under per-record DP (a memory benchmark must
say whether the tower runs inside the step; :mod:`toolkit.bench` can do both).

Example::

    >>> from toolkit.models import build_model
    >>> from toolkit.config import TrainConfig
    >>> from toolkit.features import make_pruner_for
    >>> bundle = build_model("tiny")
    >>> make_pruner_for(bundle, TrainConfig(method="dual-priv", steps=1).resolved()).n_out
    16
"""
from __future__ import annotations

import torch

from toolkit.config import TrainConfig
from toolkit.forward import tower_hidden_states
from toolkit.tokens import make_pruner


def make_pruner_for(bundle, config: TrainConfig, strategy: str | None = None):
    """The token pruner a (resolved) config asks for; ``strategy`` overrides the config's (e.g. ``"none"``)."""
    strategy = strategy or config.token_strategy
    if strategy == "none":
        return make_pruner("none", bundle)
    options = {}
    if config.contextual_tokens is not None:
        options["n_contextual"] = config.contextual_tokens
    return make_pruner(strategy, bundle, keep=config.keep_tokens, token_prune_ratio=config.token_prune_ratio,
                       layer=config.token_layer, **options)


@torch.no_grad()
def encode_records(bundle, pruner, records, batch_size: int = 64) -> torch.Tensor:
    """Visual tokens for each record: ``[N, pruner.n_out, d_vision]``. Images are read (a user's from disk) and
    decoded one chunk of ``batch_size`` at a time, so a large set is never held in memory as pictures."""
    chunks = []
    for start in range(0, len(records), batch_size):
        images = [r.load_image() for r in records[start:start + batch_size]]
        pixels = bundle.preprocess(images)
        chunks.append(pruner(tower_hidden_states(bundle, pixels)).features.float())
    if not chunks:
        return torch.zeros(0, pruner.n_out, pruner.hidden_size)
    return torch.cat(chunks)

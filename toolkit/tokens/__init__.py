"""Mechanism 1 of Dual-Priv Pruning: pluggable visual token pruning, one example at a time.

A LLaVA-style model feeds its language model one visual token per image patch (LLaVA-1.5: 576). A
:class:`TokenPruner` cuts that to a budget (e.g. 64) with a strategy from :data:`STRATEGIES`:

* ``dual-priv`` (the paper): [CLS] + the K patches [CLS] attends to most,
  s_j = mean_h softmax(Q_h K_h^T / sqrt(d))[cls, j] at a chosen encoder layer, + k contextual tokens fused from
  the rest (uniform-stride centres, cosine assignment, c_i = centre_i + mean(members_i)): keep = 1 + K + k.
* baselines: ``random`` (seeded per image), ``uniform`` (spatial stride), ``pool`` (average pooling to a grid),
  ``divprune`` (max-min diversity), ``mean-attention`` (attention received; towers without [CLS], e.g. SigLIP),
  ``none`` (everything: exactly HF's features).

Every strategy acts on each example alone (nothing computed across the batch, which would break the
per-example privacy unit), is deterministic, and breaks ties by the lowest patch index.

Fusion noise (``fusion_noise``, ``TokenPruner.fusion_noise``, ``matched_fusion_sigma``) is a **heuristic
outside the DP guarantee**: the guarantee comes from DP-SGD on the per-example gradient, which already covers
everything the forward pass computes from an example.

Example::

    >>> import torch
    >>> from toolkit.models import build_model
    >>> from toolkit.forward import tower_hidden_states
    >>> from toolkit.tokens import make_pruner
    >>> bundle = build_model("tiny")                     # 64 patches + [CLS]
    >>> pruner = make_pruner("dual-priv", bundle, keep=16)
    >>> pruner.n_out, pruner.n_kept, pruner.n_contextual  # 1 [CLS] + 13 dominant + 2 contextual
    (16, 13, 2)
    >>> out = pruner(tower_hidden_states(bundle, torch.zeros(2, 3, 32, 32)))
    >>> out.features.shape, out.kept_indices.shape, out.contextual_slots.tolist()
    (torch.Size([2, 16, 64]), torch.Size([2, 13]), [14, 15])
    >>> make_pruner("pool", bundle, token_prune_ratio=0.75).n_out   # 64 - 48 = 16 tokens, a 4 x 4 grid
    16

Feed ``out.features`` to :class:`toolkit.forward.LlavaLM` with a ``Collator(n_visual_tokens=pruner.n_out)``.
New strategies: see :mod:`toolkit.tokens.registry`.
"""
from toolkit.tokens.attention import attention_probs, cls_attention, encoder_layers, mean_received_attention
from toolkit.tokens.fusion import fuse_contextual, uniform_centres
from toolkit.tokens.noise import fusion_noise, matched_fusion_sigma
from toolkit.tokens.pruner import PruneOutput, TokenPruner, make_pruner, resolve_keep
from toolkit.tokens.registry import STRATEGIES, Budget, ExampleView, Selection, register_strategy
from toolkit.tokens.strategies import default_contextual_tokens

__all__ = [
    "make_pruner", "TokenPruner", "PruneOutput", "STRATEGIES", "register_strategy", "Budget", "ExampleView",
    "Selection", "fusion_noise", "matched_fusion_sigma", "fuse_contextual", "uniform_centres", "cls_attention",
    "mean_received_attention", "attention_probs", "encoder_layers", "resolve_keep", "default_contextual_tokens",
]

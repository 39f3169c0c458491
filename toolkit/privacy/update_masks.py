"""Where mechanism 2's update goes: the update-mask strategies, chosen before or after the noise.

``noisy`` (the paper's mechanism) zeroes the smallest coordinates of the *noisy* gradient after the noise is
added: post-processing, no privacy cost, but with a noise-dominated update it removes little noise (zeroing
20 % of N(0, 1) coordinates removes 0.4 % of the noise energy). The other strategies fix the support **before**
the noise, so noise is only added where the update goes::

    m_t   = mask chosen from public information only              (this module)
    ḡ_i   = clip(g_i ⊙ m_t, C)                                    (per example, masked BEFORE clipping)
    g̃     = (Σ_i ḡ_i + N(0, σ²C² I) ⊙ m_t) / B_expected           (noise on the kept coordinates only)

Privacy argument: if ``m_t`` does not depend on the private data of step t, the step is the Gaussian mechanism
on the sub-vector ``m_t`` selects, with L2 sensitivity C (clipping happens after masking), so the accountant's
(σ, q) analysis holds unchanged; zero coordinates outside ``m_t`` are a fixed public pattern. Sources:

* ``past-noisy``: top fraction of an exponential moving average of the *released noisy updates of earlier
  steps* (post-processing of what is already public); step 0 keeps everything.
* ``public``: top fraction of |gradient| on public data (the warm-start split), computed once.
* ``random``: a fresh random mask of the same size each step (the control), from a generator seeded from the
  public config seed — independent of the data.

Example::

    >>> import torch
    >>> from toolkit.privacy.update_masks import RandomMask
    >>> masks = RandomMask(grad_prune_ratio=0.5, seed=0).mask([torch.zeros(4), torch.zeros(2, 2)])
    >>> int(sum(m.sum() for m in masks))
    4
"""
from __future__ import annotations

import math

import torch

from toolkit.privacy.magnitude_select import keep_largest

UPDATE_MASKS = ("noisy", "past-noisy", "public", "random")
PRUNE_SCOPES = ("global", "per-tensor")


def check_ratio(grad_prune_ratio: float) -> float:
    if isinstance(grad_prune_ratio, bool) or not isinstance(grad_prune_ratio, (int, float)) \
            or not 0.0 <= float(grad_prune_ratio) < 1.0:
        raise ValueError(f"grad_prune_ratio must be in [0, 1), got {grad_prune_ratio!r}")
    return float(grad_prune_ratio)


def check_scope(scope: str) -> str:
    if scope not in PRUNE_SCOPES:
        raise ValueError(f"unknown prune_scope {scope!r}; choose one of {PRUNE_SCOPES}")
    return scope


def _n_pruned(n: int, ratio: float) -> int:
    # floor, with a little slack so 0.3 * 10 (= 3.0000000000000004) and 0.29 * 100 (= 28.999999999999996)
    # give the obvious 3 and 29.
    return min(n, int(math.floor(ratio * n + 1e-9)))


def magnitude_mask(tensors: list[torch.Tensor], grad_prune_ratio: float, scope: str = "global") -> list[torch.Tensor]:
    """Keep-masks (True = keep) that drop the ``grad_prune_ratio`` fraction of smallest-|t| coordinates.

    ``floor(ratio · n)`` coordinates are dropped (n = all coordinates for ``global``, each tensor's own size for
    ``per-tensor``). Ties are broken by position (flattened, in list order). Magnitudes compared in ≥ fp32.
    Exact, with O(block) extra memory whatever the number of coordinates (:mod:`toolkit.privacy.magnitude_select`).
    """
    ratio = check_ratio(grad_prune_ratio)
    check_scope(scope)
    if not isinstance(tensors, (list, tuple)) or not all(torch.is_tensor(g) for g in tensors):
        raise TypeError("the mask needs a list of tensors")
    tensors = list(tensors)
    if ratio == 0.0 or not tensors:
        return [torch.ones_like(g, dtype=torch.bool) for g in tensors]

    if scope == "per-tensor":
        return [keep_largest([g], _n_pruned(g.numel(), ratio))[0] for g in tensors]
    return keep_largest(tensors, _n_pruned(sum(g.numel() for g in tensors), ratio))


class PreNoiseMask:
    """A mask fixed before the step's noise, from public information only. ``mask(params)`` gives the keep-masks
    of the coming step (``None``: keep everything); ``observe(released)`` sees the released noisy update after
    each step (the only private-data-dependent input any strategy may use, and it is already public)."""

    name = "pre-noise"

    def __init__(self, grad_prune_ratio: float, scope: str = "global"):
        self.grad_prune_ratio = check_ratio(grad_prune_ratio)
        self.scope = check_scope(scope)

    def mask(self, params: list[torch.Tensor]) -> list[torch.Tensor] | None:
        raise NotImplementedError

    def observe(self, released: list[torch.Tensor]) -> None:
        """Default: nothing to learn from past releases."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Default: stateless."""


class PastNoisyMask(PreNoiseMask):
    """Top fraction of |EMA of the released noisy updates| of steps < t (signal accumulates, noise averages)."""

    name = "past-noisy"

    def __init__(self, grad_prune_ratio: float, scope: str = "global", ema_decay: float = 0.9):
        super().__init__(grad_prune_ratio, scope)
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay!r}")
        self.ema_decay = float(ema_decay)
        self.ema: list[torch.Tensor] | None = None

    def mask(self, params):
        if self.ema is None:
            return None  # step 0: nothing released yet, keep everything
        self.ema = [e.to(p.device) for e, p in zip(self.ema, params)]   # a checkpoint loads it on the CPU
        return magnitude_mask(self.ema, self.grad_prune_ratio, self.scope)

    def observe(self, released):
        released = [r.detach().to(torch.promote_types(r.dtype, torch.float32)) for r in released]
        if self.ema is None:
            self.ema = [r.clone() for r in released]
            return
        self.ema = [e.to(r.device) for e, r in zip(self.ema, released)]
        for e, r in zip(self.ema, released):
            e.mul_(self.ema_decay).add_(r, alpha=1.0 - self.ema_decay)

    def state_dict(self) -> dict:
        return {"ema": None if self.ema is None else [e.clone() for e in self.ema]}

    def load_state_dict(self, state: dict) -> None:
        self.ema = None if state.get("ema") is None else [e.clone() for e in state["ema"]]


class PublicGradientMask(PreNoiseMask):
    """Top fraction of |gradient on public data| (given once, e.g. from the warm-start split)."""

    name = "public"

    def __init__(self, grad_prune_ratio: float, public_gradients: list[torch.Tensor], scope: str = "global"):
        super().__init__(grad_prune_ratio, scope)
        if not public_gradients:
            raise ValueError("the 'public' update mask needs gradients computed on public data")
        self._masks = magnitude_mask(list(public_gradients), self.grad_prune_ratio, self.scope)

    def mask(self, params):
        if [m.shape for m in self._masks] != [p.shape for p in params]:
            raise ValueError("the public gradients do not have the shapes of the trained parameters")
        return [m.to(p.device) for m, p in zip(self._masks, params)]


class RandomMask(PreNoiseMask):
    """A fresh uniformly random mask of the same size every step (data-independent control)."""

    name = "random"

    def __init__(self, grad_prune_ratio: float, scope: str = "global", seed: int = 0):
        super().__init__(grad_prune_ratio, scope)
        self.generator = torch.Generator().manual_seed(int(seed))

    def mask(self, params):
        scores = [torch.rand(p.shape, generator=self.generator) for p in params]
        return [m.to(p.device) for m, p in zip(magnitude_mask(scores, self.grad_prune_ratio, self.scope), params)]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("generator") is not None:
            self.generator.set_state(state["generator"])


def make_pre_noise_mask(update_mask: str, grad_prune_ratio: float, scope: str = "global", *,
                        public_gradients: list[torch.Tensor] | None = None, seed: int = 0) -> PreNoiseMask | None:
    """The pre-noise mask source for ``update_mask`` (``None`` for ``noisy``, the post-noise mechanism)."""
    if update_mask not in UPDATE_MASKS:
        raise ValueError(f"unknown update_mask {update_mask!r}; choose one of {UPDATE_MASKS}")
    if update_mask == "noisy":
        return None
    if update_mask == "past-noisy":
        return PastNoisyMask(grad_prune_ratio, scope)
    if update_mask == "public":
        return PublicGradientMask(grad_prune_ratio, public_gradients or [], scope)
    return RandomMask(grad_prune_ratio, scope, seed=seed)


def kept_count(masks: list[torch.Tensor]) -> int:
    """How many coordinates the masks keep, read back once (one device sync per step, not one per tensor)."""
    return int(torch.stack([mask.count_nonzero() for mask in masks]).sum()) if masks else 0

"""The strategy registry: one small function per pruning rule, registered by name.

A strategy sees **one example** (an :class:`ExampleView`) and returns a :class:`Selection`: which patches
survive as themselves, which fused tokens it built, and which cluster every fused patch went into. It never
sees the batch, so nothing can be computed across examples (that would couple examples and break the
per-example privacy unit). The pruner (:mod:`toolkit.tokens.pruner`) loops over examples, assembles the tokens
in a fixed layout and checks that every example gets the same layout.

Adding a rule is one function::

    @register_strategy("every-other", summary="keep patches 0, 2, 4, ...")
    def every_other(view, budget):
        kept = torch.arange(0, budget.n_patches, 2, device=view.patches.device)[: budget.keep]
        return Selection.keep_only(kept, budget.n_patches, view.patches)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

# Which attention-derived score a strategy needs; the pruner computes it (see toolkit.tokens.attention).
SCORE_KINDS = ("cls-attention", "mean-attention")


@dataclass(frozen=True)
class Budget:
    """What a strategy must produce, fixed when the pruner is made (identical for every example)."""

    keep: int                    # visual tokens fed to the LLM for this example (= the pruner's n_out)
    n_patches: int               # patches the tower produced (n_in), [CLS] not counted
    grid: tuple[int, int]        # (rows, cols) of the patch grid; patch j sits at (j // cols, j % cols)
    n_contextual: int = 0        # fused (contextual) tokens among the ``keep`` (fusing strategies only)
    hf_feeds_cls: bool = False   # does HF LLaVA feed [CLS] to the LLM for this model (select strategy "full")
    options: Mapping = field(default_factory=dict)  # strategy-specific options (e.g. ``seed``)


@dataclass
class ExampleView:
    """One example's inputs to a strategy: never more than one example."""

    patches: torch.Tensor                 # [n_patches, d] features at LLaVA's feature layer, [CLS] excluded
    cls: torch.Tensor | None              # [d] the [CLS] feature at the same layer (None: tower without [CLS])
    scores: torch.Tensor | None = None    # [n_patches] attention score, filled when the strategy asks for one
    seed: int | None = None               # explicit per-example seed, when the caller gives one


@dataclass
class Selection:
    """What a strategy decided for one example.

    The pruner feeds, in this order: [CLS] (if ``with_cls``), ``patches[kept]``, then ``fused``.
    ``clusters[j]`` is the index (into ``fused``) of the fused token that patch ``j`` went into, or -1 when
    patch ``j`` is kept as itself or dropped. ``centres`` are the patch indices the fused tokens were centred
    on (centre-based fusion only; empty otherwise).
    """

    kept: torch.Tensor                    # [n_kept] patch indices kept as themselves, ascending
    fused: torch.Tensor                   # [n_fused, d] fused (contextual) tokens
    clusters: torch.Tensor                # [n_patches] long, -1 or the fused token's index
    centres: torch.Tensor                 # [n_centres] long patch indices (n_centres is n_fused or 0)
    with_cls: bool = False

    @classmethod
    def keep_only(cls, kept: torch.Tensor, n_patches: int, patches: torch.Tensor,
                  with_cls: bool = False) -> "Selection":
        """A selection that keeps ``kept`` (sorted here) and drops every other patch; nothing is fused."""
        device = patches.device
        return cls(
            kept=torch.sort(kept.to(device=device, dtype=torch.long)).values,
            fused=patches.new_zeros((0, patches.shape[-1])),
            clusters=torch.full((n_patches,), -1, dtype=torch.long, device=device),
            centres=torch.zeros(0, dtype=torch.long, device=device),
            with_cls=with_cls,
        )


@dataclass(frozen=True)
class StrategySpec:
    """A registered strategy: its function and what the pruner must prepare for it."""

    name: str
    select: Callable[[ExampleView, Budget], Selection]
    score: str | None = None              # one of SCORE_KINDS, or None
    needs_cls: bool = False               # refuse towers without a [CLS] token
    keeps_all: bool = False               # ``none``: the budget is the full token count
    default_contextual: Callable[[int], int] | None = None  # keep -> default n_contextual; None: never fuses
    options: tuple[str, ...] = ()         # strategy-specific option names accepted by make_pruner
    summary: str = ""


STRATEGIES: dict[str, StrategySpec] = {}


def register_strategy(name: str, *, score: str | None = None, needs_cls: bool = False, keeps_all: bool = False,
                      default_contextual: Callable[[int], int] | None = None, options: tuple[str, ...] = (),
                      summary: str = ""):
    """Register ``select(view, budget) -> Selection`` under ``name`` in :data:`STRATEGIES` (decorator)."""
    if score is not None and score not in SCORE_KINDS:
        raise ValueError(f"unknown score kind {score!r}; choose one of {SCORE_KINDS}")

    def wrap(select: Callable[[ExampleView, Budget], Selection]):
        if name in STRATEGIES:
            raise ValueError(f"a token pruning strategy named {name!r} is already registered")
        if default_contextual is not None:
            options_all = tuple(options) + ("n_contextual",)
        else:
            options_all = tuple(options)
        STRATEGIES[name] = StrategySpec(
            name=name, select=select, score=score, needs_cls=needs_cls, keeps_all=keeps_all,
            default_contextual=default_contextual, options=options_all,
            summary=summary or (select.__doc__ or "").strip().splitlines()[0],
        )
        return select

    return wrap

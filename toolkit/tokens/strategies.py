"""The token pruning strategies: one small function each, registered in ``STRATEGIES``.

Every function sees one example and returns a :class:`~toolkit.tokens.registry.Selection`. Ties are broken
by patch index (lowest first) everywhere, so results are deterministic.

| name             | feeds the LLM                                               | score                |
|------------------|-------------------------------------------------------------|----------------------|
| ``dual-priv``    | [CLS] + top-K patches by [CLS] attention + k fused tokens    | [CLS]-row attention  |
| ``mean-attention``| top-K patches by attention received (+ k fused, optional)  | mean attention       |
| ``random``       | ``keep`` patches drawn per image (seed from the image)      | -                    |
| ``uniform``      | the centre patch of each cell of a rows x cols grid          | -                    |
| ``pool``         | the mean of each cell of a rows x cols grid                  | -                    |
| ``divprune``     | greedy max-min cosine diversity (DivPrune)                   | -                    |
| ``none``         | everything, exactly HF LLaVA's features                      | -                    |
"""
from __future__ import annotations

import functools
import hashlib
import math

import torch
import torch.nn.functional as F

from toolkit.tokens.fusion import fuse_contextual
from toolkit.tokens.registry import Budget, ExampleView, Selection, register_strategy


def default_contextual_tokens(keep: int) -> int:
    """k = max(1, keep // 8) when keep >= 3, else 0 (the paper gives no default; VisionZip uses about 1/6)."""
    return max(1, keep // 8) if keep >= 3 else 0


def top_k_stable(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k indices, the rest), each ascending; equal scores rank the lower patch index first."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return torch.sort(order[:k]).values, torch.sort(order[k:]).values


def dominant_plus_contextual(view: ExampleView, n_dominant: int, n_contextual: int, with_cls: bool) -> Selection:
    """Keep the ``n_dominant`` best-scored patches; fuse the rest into ``n_contextual`` tokens (drop if 0)."""
    n_patches = view.patches.shape[0]
    dominant, remaining = top_k_stable(view.scores, n_dominant)
    selection = Selection.keep_only(dominant, n_patches, view.patches, with_cls=with_cls)
    if n_contextual > 0:
        fused, assignment, centre_positions = fuse_contextual(view.patches[remaining], n_contextual)
        selection.fused = fused
        selection.clusters[remaining] = assignment
        selection.centres = remaining[centre_positions]
    return selection


@register_strategy("dual-priv", score="cls-attention", needs_cls=True, default_contextual=default_contextual_tokens,
                   summary="[CLS] + top-K patches by [CLS] attention + k contextual tokens fused from the rest")
def dual_priv(view: ExampleView, budget: Budget) -> Selection:
    """Dual-Priv mechanism 1: keep = 1 [CLS] + K dominant + k contextual.

    s_j = mean_h softmax(Q_h K_h^T / sqrt(d))[cls, j] at the scoring layer; the top K = keep - 1 - k patches
    survive; the others are fused (see toolkit.tokens.fusion) into k = ``n_contextual`` tokens.
    """
    n_dominant = budget.keep - 1 - budget.n_contextual
    return dominant_plus_contextual(view, n_dominant, budget.n_contextual, with_cls=True)


@register_strategy("mean-attention", score="mean-attention", default_contextual=lambda keep: 0,
                   summary="top-K patches by mean attention received (towers without [CLS]); optional fusion")
def mean_attention(view: ExampleView, budget: Budget) -> Selection:
    """s_j = mean over heads and queries of the attention patch j receives; keep = K top patches + k fused.

    k (``n_contextual``) defaults to 0: a pure selection baseline. With k > 0 it is Dual-Priv's fusion for a
    tower without [CLS].
    """
    n_dominant = budget.keep - budget.n_contextual
    return dominant_plus_contextual(view, n_dominant, budget.n_contextual, with_cls=False)


def example_seed(patches: torch.Tensor, seed: int = 0) -> int:
    """A 63-bit seed from the example's own feature bytes (and a run-level ``seed``): same image, same draw."""
    digest = hashlib.blake2b(digest_size=8, key=int(seed).to_bytes(8, "little", signed=True))
    digest.update(patches.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return int.from_bytes(digest.digest(), "little") >> 1


@register_strategy("random", options=("seed",), summary="keep patches drawn at random, seeded per image")
def random_patches(view: ExampleView, budget: Budget) -> Selection:
    """Keep ``keep`` patches drawn uniformly without replacement.

    Seeded per example: by the caller's explicit per-example seed, else by a hash of the example's features
    mixed with the ``seed`` option. Same image -> same draw, whatever batch it is in.
    """
    n_patches = budget.n_patches
    seed = view.seed if view.seed is not None else example_seed(view.patches, budget.options.get("seed", 0))
    generator = torch.Generator().manual_seed(seed)
    kept = torch.randperm(n_patches, generator=generator)[: budget.keep]
    return Selection.keep_only(kept, n_patches, view.patches)


def grid_shape(keep: int, grid: tuple[int, int], strategy: str) -> tuple[int, int]:
    """The rows x cols = keep arrangement closest to the patch grid's aspect ratio (ties: fewer rows)."""
    rows, cols = grid
    pairs = [(r, keep // r) for r in range(1, rows + 1) if keep % r == 0 and keep // r <= cols]
    if not pairs:
        valid = sorted({r * c for r in range(1, rows + 1) for c in range(1, cols + 1)})
        below = max((v for v in valid if v < keep), default=None)
        above = min((v for v in valid if v > keep), default=None)
        nearest = " or ".join(str(v) for v in (below, above) if v is not None)
        raise ValueError(
            f"strategy {strategy!r} lays the kept tokens on a grid: keep={keep} must be rows x cols with "
            f"rows <= {rows} and cols <= {cols} (the patch grid); nearest valid budgets: {nearest}"
        )
    target = math.log(rows / cols)
    return min(pairs, key=lambda rc: (abs(math.log(rc[0] / rc[1]) - target), rc[0]))


@functools.lru_cache(maxsize=64)  # a pure function of the budget: the same for every example
def grid_cells(keep: int, grid: tuple[int, int], strategy: str) -> tuple[tuple[range, range], ...]:
    """Partition the patch grid into keep = r x c near-equal cells (row-major); each a (rows, cols) range pair."""
    rows, cols = grid
    n_rows, n_cols = grid_shape(keep, grid, strategy)
    row_edges = [i * rows // n_rows for i in range(n_rows + 1)]
    col_edges = [i * cols // n_cols for i in range(n_cols + 1)]
    return tuple((range(row_edges[a], row_edges[a + 1]), range(col_edges[b], col_edges[b + 1]))
                 for a in range(n_rows) for b in range(n_cols))


@functools.lru_cache(maxsize=64)
def cell_of_patch(keep: int, grid: tuple[int, int], strategy: str) -> tuple[int, ...]:
    """For every patch (raster order), the index of its cell in :func:`grid_cells`."""
    cols = grid[1]
    cell_of = [0] * (grid[0] * cols)
    for cell, (cell_rows, cell_cols) in enumerate(grid_cells(keep, grid, strategy)):
        for r in cell_rows:
            for c in cell_cols:
                cell_of[r * cols + c] = cell
    return tuple(cell_of)


@register_strategy("dual-priv-random", default_contextual=default_contextual_tokens, options=("seed",),
                   summary="[CLS] + K random patches (seeded per image) + k fused: control for [CLS] selection")
def dual_priv_random(view: ExampleView, budget: Budget) -> Selection:
    """Dual-Priv's layout with the K patches drawn at random instead of by [CLS] attention: the control the
    reviewers asked for (same token count, same fusion, only the selection rule differs)."""
    seed = view.seed if view.seed is not None else example_seed(view.patches, budget.options.get("seed", 0))
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(view.patches.shape[0], generator=generator).to(view.patches.device)
    with_cls = view.cls is not None
    random_view = ExampleView(patches=view.patches, cls=view.cls, scores=scores, seed=view.seed)
    n_dominant = budget.keep - int(with_cls) - budget.n_contextual
    return dominant_plus_contextual(random_view, n_dominant, budget.n_contextual, with_cls=with_cls)


@register_strategy("uniform", summary="the centre patch of each cell of a rows x cols grid (spatial stride)")
def uniform_patches(view: ExampleView, budget: Budget) -> Selection:
    """Spatial stride: split the grid into keep = r x c cells, keep each cell's centre patch (upper-left of the
    middle on even sizes). r x c is the factorisation of ``keep`` closest to the grid's aspect ratio."""
    cols = budget.grid[1]
    kept = [cell_rows[(len(cell_rows) - 1) // 2] * cols + cell_cols[(len(cell_cols) - 1) // 2]
            for cell_rows, cell_cols in grid_cells(budget.keep, budget.grid, "uniform")]
    return Selection.keep_only(torch.tensor(kept), budget.n_patches, view.patches)


@register_strategy("pool", summary="average pooling of the patch grid to keep = rows x cols cells")
def pool_patches(view: ExampleView, budget: Budget) -> Selection:
    """Average pooling: token i = mean of the patches in cell i of a keep = r x c partition of the grid.

    Every token is a fusion, so every patch's cluster is its cell and no patch is kept as itself.
    """
    patches = view.patches
    selection = Selection.keep_only(torch.zeros(0, dtype=torch.long), budget.n_patches, patches)
    cells = torch.tensor(cell_of_patch(budget.keep, budget.grid, "pool"), device=patches.device)
    one_hot = F.one_hot(cells, budget.keep).to(patches.dtype)       # [n_patches, keep]
    # Cell means as a matrix product: deterministic (no atomic adds) and one call for all cells.
    selection.fused = (one_hot.T @ patches) / one_hot.sum(dim=0)[:, None]
    selection.clusters = cells
    return selection


@register_strategy("divprune", summary="greedy max-min cosine diversity (DivPrune)")
def divprune(view: ExampleView, budget: Budget) -> Selection:
    """DivPrune (Alvar et al., 2025): with cosine distance D = 1 - cos(v_i, v_j), start from the patch whose
    nearest neighbour is farthest, then repeatedly add argmax_j min_{i in S} D[i, j] (ties: lowest index)."""
    unit = F.normalize(view.patches.float(), dim=-1)
    distance = 1.0 - unit @ unit.T
    distance.fill_diagonal_(float("inf"))
    first = int(distance.min(dim=1).values.argmax())
    distance.fill_diagonal_(0.0)
    chosen = [first]
    min_distance = distance[first].clone()
    min_distance[first] = float("-inf")      # never re-pick a chosen patch
    for _ in range(budget.keep - 1):
        pick = int(min_distance.argmax())
        chosen.append(pick)
        min_distance = torch.minimum(min_distance, distance[pick])
        min_distance[pick] = float("-inf")
    return Selection.keep_only(torch.tensor(chosen), budget.n_patches, view.patches)


@register_strategy("none", keeps_all=True, summary="keep every token: exactly HF LLaVA's features")
def keep_everything(view: ExampleView, budget: Budget) -> Selection:
    """No pruning: every patch in order, plus [CLS] exactly when HF LLaVA feeds it (select strategy "full")."""
    kept = torch.arange(budget.n_patches)
    return Selection.keep_only(kept, budget.n_patches, view.patches, with_cls=budget.hf_feeds_cls)

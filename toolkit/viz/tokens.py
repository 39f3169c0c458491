"""Pictures of one pruning decision (mechanism 1): pure functions from one example's
:class:`toolkit.tokens.PruneOutput` to plotly figures.

* :func:`token_overlay_figure`: on the exact preprocessed image (normalisation undone), the attention heatmap
  (optional), the patches kept as themselves (outlined), each contextual cluster outlined and lightly filled in its
  own colour with its own legend entry in that colour (its centre marked), and the dropped patches dimmed; the
  title counts "576 -> 64".
* :func:`score_map_figure`: the pruning score of every patch on the grid, the kept patches outlined: the score
  apart from the image, so neither hides the other.
* :func:`spatial_histogram_figure`: how many kept patches fall in each grid row and column, against the flat
  line a spatially unbiased rule would give (exposes e.g. a bias toward the bottom rows).
* :func:`denormalize`: the image exactly as the tower saw it, from its normalised pixel values.

How accuracy varies with the token budget over a sweep is :func:`toolkit.viz.ablation.tokens_accuracy_figure`.
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from toolkit.viz.style import with_alpha

KEPT_COLOUR = "#00e5ff"
DROPPED_FILL = "rgba(0, 0, 0, 0.55)"   # dimmed, still visible: what was dropped stays readable
CLUSTER_FILL_ALPHA = 0.25                # light: the image shows through the cluster colours
CLUSTER_PALETTE = ("#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
                   "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000", "#aaffc3")


def denormalize(pixel_values: torch.Tensor, image_mean, image_std) -> np.ndarray:
    """Undo the tower's normalisation: ``[3, H, W]`` (or ``[1, 3, H, W]``) -> uint8 ``[H, W, 3]``.

    x_pixel = clip(x_norm * std + mean, 0, 1) * 255, rounded: the image exactly as the tower saw it.
    """
    x = pixel_values.detach().float().cpu()
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"pixel_values must be [3, H, W] or [1, 3, H, W], got {list(pixel_values.shape)}")
    mean = torch.tensor(image_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(image_std, dtype=torch.float32).view(3, 1, 1)
    rgb = (x * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
    return rgb.permute(1, 2, 0).numpy()


def _as_rgb(image, image_mean, image_std) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        if image_mean is None or image_std is None:
            raise ValueError("pixel_values are normalised: pass image_mean and image_std (e.g. bundle.image_mean/std)")
        return denormalize(image, image_mean, image_std)
    if hasattr(image, "convert"):  # a PIL image
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image must be normalised pixel_values, a PIL image or an [H, W, 3] array, got {array.shape}")
    return array.astype(np.uint8)


def _single(output) -> None:
    if output.batch_size != 1:
        raise ValueError(f"a figure shows one example; got a batch of {output.batch_size}: pass output.example(i)")


def _rectangles(patches, cols: int, patch_h: float, patch_w: float) -> tuple[list, list]:
    """Closed outlines of patches as one scatter path (None between rectangles)."""
    xs, ys = [], []
    for j in patches:
        r, c = divmod(int(j), cols)
        x0, y0 = c * patch_w, r * patch_h
        xs += [x0, x0 + patch_w, x0 + patch_w, x0, x0, None]
        ys += [y0, y0, y0 + patch_h, y0 + patch_h, y0, None]
    return xs, ys


def _counts_line(output) -> str:
    parts = []
    if output.cls_slot is not None:
        parts.append("[CLS]")
    parts.append(f"{output.kept_indices.shape[1]} kept")
    if output.contextual_slots.numel():
        parts.append(f"{output.contextual_slots.numel()} fused")
    return " + ".join(parts) + f"; {output.n_dropped} dropped"


def token_overlay_figure(output, image, image_mean=None, image_std=None, show_scores: bool = True,
                         title: str | None = None) -> go.Figure:
    """Overlay one example's pruning decision on its preprocessed image.

    Args:
        output: a :class:`PruneOutput` of one example (``out.example(i)``).
        image: the normalised ``pixel_values`` the tower saw (``[3, H, W]``; give ``image_mean``/``image_std``),
            or an RGB ``[H, W, 3]`` uint8 array / PIL image of the same size.
        show_scores: draw the attention heatmap (when the strategy has scores).
    Returns:
        ``plotly.graph_objects.Figure``.
    """
    _single(output)
    rgb = _as_rgb(image, image_mean, image_std)
    height, width = rgb.shape[:2]
    rows, cols = output.grid
    if height % rows or width % cols:
        raise ValueError(f"image {width}x{height} does not split into the {rows}x{cols} patch grid")
    patch_h, patch_w = height / rows, width / cols
    kept = output.kept_indices[0].tolist()
    clusters = output.clusters[0].cpu()
    kept_set = set(kept)
    dropped = [j for j in range(output.n_in) if clusters[j] < 0 and j not in kept_set]

    fig = go.Figure(go.Image(z=rgb, name="image", hoverinfo="skip"))
    if show_scores and output.scores is not None:
        scores = output.scores[0].detach().float().cpu().view(rows, cols).numpy()
        fig.add_trace(go.Heatmap(
            z=scores, x=(np.arange(cols) + 0.5) * patch_w, y=(np.arange(rows) + 0.5) * patch_h,
            customdata=np.arange(output.n_in).reshape(rows, cols), colorscale="Inferno", opacity=0.45,
            name="attention", colorbar=dict(title="score", thickness=12),
            hovertemplate="patch %{customdata}<br>score %{z:.4g}<extra></extra>",
        ))
    if dropped:
        xs, ys = _rectangles(dropped, cols, patch_h, patch_w)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", fill="toself", fillcolor=DROPPED_FILL, line=dict(width=0),
                                 name=f"dropped ({len(dropped)})", hoverinfo="skip"))
    n_fused = int(output.contextual_slots.numel())
    for cluster in range(n_fused):
        members = torch.nonzero(clusters == cluster).flatten().tolist()
        colour = CLUSTER_PALETTE[cluster % len(CLUSTER_PALETTE)]
        xs, ys = _rectangles(members, cols, patch_h, patch_w)
        # one legend entry per cluster, drawn in the cluster's own colour (a single entry showed one colour only)
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="lines", fill="toself", fillcolor=with_alpha(colour, CLUSTER_FILL_ALPHA),
            line=dict(width=1.5, color=colour), legendgroup="clusters",
            legendgrouptitle_text=f"contextual clusters ({n_fused})" if cluster == 0 else None,
            name=f"cluster {cluster + 1}: {len(members)} patches",
            hovertemplate=f"cluster {cluster + 1}: {len(members)} patches fused into one token<extra></extra>",
        ))
    centres = output.centre_indices[0].tolist()
    if centres:
        fig.add_trace(go.Scatter(
            x=[(j % cols + 0.5) * patch_w for j in centres], y=[(j // cols + 0.5) * patch_h for j in centres],
            mode="markers", marker=dict(symbol="x", size=7, color="white", line=dict(width=1, color="black")),
            name="cluster centres", text=[f"centre of cluster {i} (patch {j})" for i, j in enumerate(centres)],
            hoverinfo="text",
        ))
    if kept:
        xs, ys = _rectangles(kept, cols, patch_h, patch_w)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line=dict(color=KEPT_COLOUR, width=2),
                                 name=f"kept ({len(kept)})", hoverinfo="skip"))
    layer = f", scored at layer {output.layer}" if output.layer is not None else ""
    heading = title or f"{output.strategy}: {output.n_in} -> {output.n_out} visual tokens"
    fig.update_layout(
        title=dict(text=f"{heading}<br><sup>{_counts_line(output)}{layer}</sup>"),
        width=620, height=600, margin=dict(l=10, r=10, t=70, b=10), legend=dict(orientation="h", y=-0.02),
        plot_bgcolor="white",
    )
    fig.update_xaxes(range=[0, width], showticklabels=False, showgrid=False, zeroline=False)
    fig.update_yaxes(range=[height, 0], showticklabels=False, showgrid=False, zeroline=False,
                     scaleanchor="x", scaleratio=1)
    return fig


SCORE_LABELS = {"cls-attention": "[CLS] attention", "mean-attention": "mean attention received"}


def score_map_figure(output, score_kind: str | None = None, title: str | None = None) -> go.Figure:
    """The pruning score of every patch of one example on its grid (a heatmap, row 0 at the top), the patches kept
    as themselves outlined. ``score_kind`` names the score in the colour bar (e.g. ``"cls-attention"``).
    Fills its container's width. Refuses an output without scores (a strategy that does not score patches)."""
    _single(output)
    if output.scores is None:
        raise ValueError(f"strategy {output.strategy!r} does not score patches: there is no score map to draw")
    rows, cols = output.grid
    scores = output.scores[0].detach().float().cpu().view(rows, cols).numpy()
    label = SCORE_LABELS.get(score_kind, "score")
    fig = go.Figure(go.Heatmap(
        z=scores, x=np.arange(cols), y=np.arange(rows), colorscale="Inferno", name="score",
        customdata=np.arange(output.n_in).reshape(rows, cols), colorbar=dict(title=label, thickness=12),
        hovertemplate="patch %{customdata} (row %{y}, column %{x})<br>" + label + " %{z:.4g}<extra></extra>",
    ))
    kept = output.kept_indices[0].tolist()
    if kept:
        xs, ys = _rectangles(kept, cols, 1.0, 1.0)
        fig.add_trace(go.Scatter(x=[None if x is None else x - 0.5 for x in xs],
                                 y=[None if y is None else y - 0.5 for y in ys], mode="lines",
                                 line=dict(color=KEPT_COLOUR, width=2), name=f"kept ({len(kept)})",
                                 hoverinfo="skip"))
    layer = f", layer {output.layer}" if output.layer is not None else ""
    fig.update_layout(title=title or f"{label}{layer}<br><sup>per patch; kept patches outlined</sup>", height=440,
                      margin=dict(l=10, r=10, t=50, b=10), legend=dict(orientation="h", y=-0.02),
                      plot_bgcolor="white")
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False, range=[-0.5, cols - 0.5])
    fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False, range=[rows - 0.5, -0.5],
                     scaleanchor="x", scaleratio=1)
    return fig


def spatial_histogram_figure(output, title: str | None = None) -> go.Figure:
    """Kept patches per grid row and per column for one example, with the count a spatially uniform rule
    would give (n_kept / rows, n_kept / cols) as a dashed line: bars far from it expose a spatial bias."""
    _single(output)
    rows, cols = output.grid
    kept = torch.as_tensor(output.kept_indices[0]).cpu()
    per_row = torch.bincount(kept // cols, minlength=rows).tolist()
    per_col = torch.bincount(kept % cols, minlength=cols).tolist()
    n_kept = int(kept.numel())
    fig = make_subplots(rows=1, cols=2, subplot_titles=("kept patches per row", "kept patches per column"))
    fig.add_trace(go.Bar(x=list(range(rows)), y=per_row, name="per row", marker_color="#4363d8"), row=1, col=1)
    fig.add_trace(go.Bar(x=list(range(cols)), y=per_col, name="per column", marker_color="#f58231"), row=1, col=2)
    for column, expected in ((1, n_kept / rows), (2, n_kept / cols)):
        fig.add_hline(y=expected, line_dash="dash", line_color="grey", row=1, col=column)
    note = "" if n_kept else " (no patch kept as itself: every token is fused)"
    heading = title or f"{output.strategy}: where the {n_kept} kept patches lie{note}"
    fig.update_layout(title=heading, width=720, height=320, showlegend=False, margin=dict(l=40, r=10, t=70, b=40),
                      bargap=0.1)
    fig.update_xaxes(title_text="grid row (top = 0)", row=1, col=1)
    fig.update_xaxes(title_text="grid column (left = 0)", row=1, col=2)
    return fig

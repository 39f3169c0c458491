"""Pictures of one pruning decision (toolkit.viz.tokens) and writing a figure to a file (toolkit.viz.export)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from toolkit.data import make_vqa, preprocess_images
from toolkit.forward import tower_hidden_states
from toolkit.models import build_model
from toolkit.tokens import make_pruner
from toolkit.viz import (
    ImageExportError, denormalize, save_figure, score_map_figure, spatial_histogram_figure, token_overlay_figure,
)


@pytest.fixture(scope="module")
def example():
    bundle = build_model("tiny", seed=0)
    records = make_vqa("digit", "test", image_size=32, limit=2).records
    pixels = preprocess_images([r.image for r in records], 32, bundle.image_mean, bundle.image_std)
    return bundle, records, pixels, tower_hidden_states(bundle, pixels)


def _names(fig):
    return [trace.name for trace in fig.data]


def test_overlay_shows_heatmap_kept_clusters_and_counts(example):
    bundle, _, pixels, hidden = example
    out = make_pruner("dual-priv", bundle, keep=16, n_contextual=3)(hidden).example(1)
    fig = token_overlay_figure(out, pixels[1], bundle.image_mean, bundle.image_std)
    names = _names(fig)
    assert names[:2] == ["image", "attention"]
    assert "kept (12)" in names and "cluster centres" in names
    clusters = [trace for trace in fig.data if getattr(trace, "legendgroup", None) == "clusters"]
    assert len(clusters) == 3 and clusters[0].legendgrouptitle.text == "contextual clusters (3)"
    assert all(t.showlegend is not False and t.name.startswith(f"cluster {i + 1}: ") for i, t in enumerate(clusters))
    # each legend entry is drawn in its cluster's own colour, and the three colours differ
    assert len({t.line.color for t in clusters}) == 3
    assert "64 -> 16 visual tokens" in fig.layout.title.text and "[CLS] + 12 kept + 3 fused" in fig.layout.title.text
    assert fig.data[1].z.shape == (8, 8)  # the heatmap is the patch grid
    json.loads(fig.to_json())  # serialisable: renders in a browser


def test_overlay_background_is_the_exact_preprocessed_image(example):
    bundle, records, pixels, _ = example
    rgb = denormalize(pixels[0], bundle.image_mean, bundle.image_std)
    assert rgb.dtype == np.uint8 and rgb.shape == (32, 32, 3)
    assert np.abs(rgb.astype(int) - np.asarray(records[0].image, dtype=int)).max() <= 1


def test_overlay_dims_dropped_patches(example):
    bundle, _, pixels, hidden = example
    out = make_pruner("random", bundle, keep=10)(hidden).example(0)
    fig = token_overlay_figure(out, pixels[0], bundle.image_mean, bundle.image_std)
    assert "dropped (54)" in _names(fig) and "kept (10)" in _names(fig) and "attention" not in _names(fig)


def test_overlay_of_pooling_and_of_a_tower_without_cls():
    siglip = build_model("tiny-siglip", seed=0)
    pixels = preprocess_images([make_vqa("digit", "test", image_size=32, limit=1)[0].image], 32)
    hidden = tower_hidden_states(siglip, pixels)
    pooled = make_pruner("pool", siglip, keep=4)(hidden)
    fig = token_overlay_figure(pooled, pixels[0], siglip.image_mean, siglip.image_std)
    titles = [t.legendgrouptitle.text for t in fig.data if getattr(t, "legendgroup", None) == "clusters"]
    assert titles[0] == "contextual clusters (4)" and "4 fused; 0 dropped" in fig.layout.title.text
    scored = make_pruner("mean-attention", siglip, keep=8)(hidden)
    assert "attention" in _names(token_overlay_figure(scored, pixels[0], siglip.image_mean, siglip.image_std))


def test_score_map_shows_every_patch_score_and_outlines_the_kept(example):
    bundle, _, _, hidden = example
    out = make_pruner("dual-priv", bundle, keep=16, n_contextual=3)(hidden).example(0)
    fig = score_map_figure(out, "cls-attention")
    assert fig.data[0].z.shape == (8, 8) and fig.data[0].colorbar.title.text == "[CLS] attention"
    assert fig.data[1].name == "kept (12)" and "layer" in fig.layout.title.text
    with pytest.raises(ValueError, match="does not score patches"):
        score_map_figure(make_pruner("random", bundle, keep=10)(hidden).example(0))


def test_spatial_histogram_counts_kept_patches_per_row_and_column(example):
    bundle, _, _, hidden = example
    out = make_pruner("uniform", bundle, keep=16)(hidden).example(0)
    fig = spatial_histogram_figure(out)
    per_row, per_col = list(fig.data[0].y), list(fig.data[1].y)
    kept = out.kept_indices[0]
    assert per_row == torch.bincount(kept // 8, minlength=8).tolist()
    assert per_col == torch.bincount(kept % 8, minlength=8).tolist()
    assert sum(per_row) == sum(per_col) == 16
    assert out.to_dict()["kept_per_row"] == per_row


def test_figures_refuse_a_batch_and_missing_normalisation(example):
    bundle, _, pixels, hidden = example
    out = make_pruner("dual-priv", bundle, keep=16)(hidden)
    with pytest.raises(ValueError, match="one example"):
        token_overlay_figure(out, pixels[0], bundle.image_mean, bundle.image_std)
    with pytest.raises(ValueError, match="one example"):
        spatial_histogram_figure(out)
    with pytest.raises(ValueError, match="image_mean and image_std"):
        token_overlay_figure(out.example(0), pixels[0])


def test_html_export_always_works_and_bad_suffix_is_refused(example, tmp_path):
    bundle, _, pixels, hidden = example
    fig = spatial_histogram_figure(make_pruner("divprune", bundle, keep=8)(hidden).example(0))
    path = save_figure(fig, tmp_path / "hist.html")
    assert path.stat().st_size > 1000 and "plotly" in path.read_text()[:5000].lower()
    with pytest.raises(ValueError, match="use .html, .png"):
        save_figure(fig, tmp_path / "hist.gif")


def test_png_export_without_a_browser_says_why(example, tmp_path, monkeypatch):
    bundle, _, _, hidden = example
    fig = spatial_histogram_figure(make_pruner("uniform", bundle, keep=4)(hidden).example(0))
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-chrome"))
    with pytest.raises(ImageExportError, match="does not exist: kaleido needs a Chrome"):
        save_figure(fig, tmp_path / "hist.png")


@pytest.mark.skipif(not (os.environ.get("BROWSER_PATH") or Path("/usr/bin/chromium").is_file()),
                    reason="no Chromium for kaleido")
def test_png_export_writes_a_png(example, tmp_path):
    bundle, _, pixels, hidden = example
    out = make_pruner("dual-priv", bundle, keep=16)(hidden).example(0)
    path = save_figure(token_overlay_figure(out, pixels[0], bundle.image_mean, bundle.image_std), tmp_path / "o.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""Figures (toolkit.plots) from small real sweeps, and the analytic FLOPs (toolkit.flops) vs FlopCounterMode."""
from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from toolkit.experiments import named_sweep, run_sweep
from toolkit.flops import estimate_step_flops, preset_dims, text_length, trainable_params
from toolkit.plots import (
    ablation_contributions, ablation_figure, flops_memory_figure, lora_rank_figure, memory_time_figure,
    privacy_utility_figure, save_figure, scaling_figure, tokens_accuracy_figure,
)


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """The four built-in sweeps in quick mode (tiny model, 2 steps, 64 records): 18 real runs, shared by every
    figure test. The folder is the session's quick-sweep folder, which the notebook tests also write to: cells
    a notebook already ran are read back (the sweep's resume path), not trained twice."""
    out = tmp_path_factory.getbasetemp() / "quick-sweeps"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {name: run_sweep(named_sweep(name, quick=True), out, progress=False)
                for name in ("privacy-utility", "ablation", "budget", "lora-rank")}
    finally:
        torch.set_num_threads(before)


def _check(fig, tmp_path, name):
    assert isinstance(fig, go.Figure) and len(fig.data) > 0
    assert fig.layout.title.text                                  # readable without the code
    path = save_figure(fig, tmp_path / f"{name}.html")
    assert path.stat().st_size > 10_000


def test_save_figure_is_the_overlay_one():
    from toolkit.tokens import overlay

    assert save_figure is overlay.save_figure


def test_privacy_utility_figure(sweeps, tmp_path):
    df = sweeps["privacy-utility"]
    assert len(df) == 7 and set(df["method"]) == {"non-private", "dp-sgd", "dual-priv", "dp-zo"}
    fig = privacy_utility_figure(df)
    _check(fig, tmp_path, "pu")
    assert [t.name for t in fig.data] == ["non-private", "DP-SGD", "Dual-Priv", "DP-ZO"]
    assert list(fig.layout.xaxis.ticktext) == ["1", "∞"] and fig.layout.xaxis.type == "log"
    dp = fig.data[1]
    expected = df[df["method"] == "dp-sgd"].sort_values("epsilon")["accuracy"].to_numpy() * 100
    np.testing.assert_allclose(dp.y, expected)
    assert "privacy unit: one record = one source image" in fig.layout.title.text
    # error bars are the s.d. over seeds: a second seed with known accuracies
    two = pd.concat([df, df.assign(seed=1, accuracy=df["accuracy"] + 0.1)], ignore_index=True)
    fig2 = privacy_utility_figure(two)
    np.testing.assert_allclose(fig2.data[1].error_y.array, np.full(2, np.std([0, 10], ddof=1)), rtol=1e-6)
    assert "2 seeds, mean ± 1 s.d." in fig2.layout.title.text


def test_privacy_utility_png(sweeps, tmp_path):
    os.environ.setdefault("BROWSER_PATH", "/usr/bin/chromium")
    if not os.path.exists(os.environ["BROWSER_PATH"]):
        pytest.skip("no Chromium for kaleido")
    path = save_figure(privacy_utility_figure(sweeps["privacy-utility"]), tmp_path / "pu.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_memory_time_figure(sweeps, tmp_path):
    df = sweeps["privacy-utility"]
    fig = memory_time_figure(df)
    _check(fig, tmp_path, "mem")
    memory, time_ = fig.data
    assert list(memory.x) == ["non-private", "DP-SGD", "Dual-Priv", "DP-ZO"]
    assert "1.00× DP-SGD" in memory.text[1]
    med = df.groupby("method")["peak_memory_mb"].median()
    assert f"{med['dual-priv'] / med['dp-sgd']:.2f}× DP-SGD" in memory.text[2]
    assert all(np.isfinite(memory.y)) and all(np.asarray(time_.y) > 0)


def test_ablation_figure(sweeps, tmp_path):
    df = sweeps["ablation"]
    assert len(df) == 4
    fig = ablation_figure(df)
    _check(fig, tmp_path, "ablation")
    heat = fig.data[0]
    assert np.isfinite(np.asarray(heat.z, dtype=float)).sum() == 4
    contrib = ablation_contributions(df).set_index("mechanism")
    assert contrib.loc["selection", "pairs"] == 2 and contrib.loc["update pruning", "pairs"] == 2
    assert contrib.loc["fusion", "pairs"] == 0                   # fusion is on in every quick cell
    on = df[df["token_strategy"] == "dual-priv"].sort_values("grad_prune_ratio")["accuracy"].to_numpy()
    off = df[df["token_strategy"] == "dual-priv-random"].sort_values("grad_prune_ratio")["accuracy"].to_numpy()
    assert contrib.loc["selection", "mean"] == pytest.approx((on - off).mean())


def test_tokens_accuracy_and_scaling_figures(sweeps, tmp_path):
    df = sweeps["budget"]
    fig = tokens_accuracy_figure(df)
    _check(fig, tmp_path, "tokens")
    assert len(fig.data) == 2 and all(sorted(t.x) == [16, 64] for t in fig.data)
    fig = scaling_figure(df, x="visual_tokens")
    _check(fig, tmp_path, "scaling")
    assert sorted(fig.data[0].x) == [16, 64]


def test_lora_rank_figure(sweeps, tmp_path):
    df = sweeps["lora-rank"]
    # the lower-rank arm matches 80 % of rank 8's updated parameters; the projector and the LM head (384-token
    # byte-level vocabulary) are a fixed part of that count, which leaves rank 3 for the LoRA matrices
    assert sorted(df["lora_rank"]) == [3, 8, 8]
    fig = lora_rank_figure(df)
    _check(fig, tmp_path, "lora")
    assert {t.name for t in fig.data} == {"update pruning", "lower rank"}
    pruned = df[df["arm_kind"] == "update pruning"]
    assert int(pruned["updated_params"].iloc[0]) == round(0.8 * int(pruned["trainable_params"].iloc[0]))


def test_flops_memory_figure(sweeps, tmp_path):
    df = sweeps["privacy-utility"]
    fig = flops_memory_figure(df)
    _check(fig, tmp_path, "flops")
    assert fig.layout.barmode == "stack"
    forward = next(t for t in fig.data if t.name == "forward")
    row = df[df["method"] == "dual-priv"].iloc[0]
    est = estimate_step_flops("dual-priv", int(row["visual_tokens"]), text_length("parity"),
                              int(row["expected_batch_size"]))
    assert forward.y[2] == pytest.approx(est["forward"] / 1e9)


def test_figures_refuse_bad_input():
    with pytest.raises(ValueError, match="lacks column"):
        privacy_utility_figure(pd.DataFrame({"method": ["dp-sgd"]}))
    with pytest.raises(ValueError, match="no rows"):
        memory_time_figure(pd.DataFrame(columns=["method", "peak_memory_mb", "step_time_s"]))


# ------------------------------------------------------------------------------------------------- FLOPs
# Tolerance: the estimate counts every matmul the step runs, so it must match FlopCounterMode within 1%
# (measured: exact for forward + backward; +0.2% for DP-SGD, whose per-example norms are not matmuls).

TOLERANCE = 0.01


def _tiny_step(trainable="lora+head", n_visual=16, batch=4):
    from toolkit.data import Collator, make_vqa
    from toolkit.forward import LlavaLM
    from toolkit.models import apply_trainable, build_model

    bundle = build_model("tiny")
    apply_trainable(bundle, trainable, 8)
    bundle.model.set_attn_implementation("eager")  # the CPU SDPA kernel is not in FlopCounterMode's registry
    collator = Collator(bundle.tokenizer, n_visual, bundle.image_token_id, bundle.prompt_template)
    batch_ = collator(make_vqa("parity", "private", 32, limit=batch).records)
    lm = LlavaLM(bundle).bind_collator(collator).train()
    feats = torch.randn(batch, n_visual, bundle.config.vision_config.hidden_size)
    assert batch_["input_ids"].shape[1] == n_visual + text_length("parity")
    return lm, feats, batch_


@pytest.mark.parametrize("trainable", ["lora+head", "projector"])
def test_flops_match_flop_counter_non_private(trainable):
    from torch.utils.flop_counter import FlopCounterMode

    from toolkit.forward import per_example_loss

    lm, feats, batch = _tiny_step(trainable)
    with FlopCounterMode(display=False) as counter:
        loss = per_example_loss(lm(feats, batch["input_ids"], batch["attention_mask"]), batch["labels"]).mean()
        forward = counter.get_total_flops()
        loss.backward()
    est = estimate_step_flops("non-private", 16, text_length("parity"), 4, trainable=trainable)
    assert est["forward"] == pytest.approx(forward, rel=TOLERANCE)
    assert est["total"] == pytest.approx(counter.get_total_flops(), rel=TOLERANCE)


def test_flops_match_flop_counter_dp_sgd_and_dp_zo():
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    from torch.utils.flop_counter import FlopCounterMode

    from toolkit.forward import per_example_loss

    lm, feats, batch = _tiny_step()
    params = [p for p in lm.parameters() if p.requires_grad]
    module = GradSampleModule(lm)
    optimizer = DPOptimizer(torch.optim.SGD(params, lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                            expected_batch_size=4)
    with warnings.catch_warnings(), FlopCounterMode(display=False) as counter:
        warnings.simplefilter("ignore")
        losses = per_example_loss(module(feats, batch["input_ids"], batch["attention_mask"]), batch["labels"])
        losses.mean().backward()
        optimizer.step()
    est = estimate_step_flops("dp-sgd", 16, text_length("parity"), 4)
    assert est["total"] == pytest.approx(counter.get_total_flops(), rel=TOLERANCE)
    assert est["dp_overhead"] > 0

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        for _ in range(2):                                    # DP-ZO: L(θ + μz) and L(θ - μz)
            per_example_loss(lm(feats, batch["input_ids"], batch["attention_mask"]), batch["labels"])
    est = estimate_step_flops("dp-zo", 16, text_length("parity"), 4)
    assert est["total"] == pytest.approx(counter.get_total_flops(), rel=TOLERANCE)
    assert est["backward"] == 0


def test_trainable_params_formula_matches_the_model():
    from toolkit.models import TRAINABLE_MODES, apply_trainable, build_model

    for mode in TRAINABLE_MODES:
        assert trainable_params(preset_dims("tiny"), mode, 8) == apply_trainable(build_model("tiny"), mode, 8), mode


def test_flops_grow_as_documented():
    a = estimate_step_flops("dual-priv", 16, 14, 8)
    b = estimate_step_flops("dp-sgd", 64, 14, 8)
    assert a["total"] < b["total"]                              # fewer visual tokens, fewer FLOPs
    np_ = estimate_step_flops("non-private", 64, 14, 8)
    assert b["total"] - np_["total"] == b["dp_overhead"] == b["weight_grad"] + 4 * 8 * b["trainable_params"]
    zo = estimate_step_flops("dp-zo", 64, 14, 8)
    assert zo["total"] == 2 * np_["forward"] + 8 * zo["trainable_params"]
    with pytest.raises(ValueError):
        estimate_step_flops("adam", 16, 14, 8)
    assert math.isclose(estimate_step_flops("non-private", 16, 14, 16)["total"], 2 * a["total"] - 2 * a["dp_overhead"],
                        rel_tol=1e-12)

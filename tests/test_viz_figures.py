"""The figures of toolkit.viz drawn from small real sweeps and bench-like tables: what each shows, and that it reads
without the code (title, labels), writes to HTML, and refuses a table it cannot draw."""
from __future__ import annotations

import doctest
import math
import os

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

import toolkit.cli.tokens
import toolkit.viz
import toolkit.viz.export
from toolkit.sweeps import named_sweep, run_sweep
from toolkit.flops import estimate_step_flops, text_length
from toolkit.viz import (
    ablation_contributions, ablation_figure, flops_memory_figure, lora_rank_figure, memory_time_figure,
    peak_memory_figure, privacy_utility_figure, save_figure, scaling_figure, tokens_accuracy_figure,
    training_curve_figure,
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


def test_the_package_example_runs():
    assert doctest.testmod(toolkit.viz).failed == 0


def test_one_save_figure_for_every_figure():
    assert save_figure is toolkit.viz.export.save_figure is toolkit.cli.tokens.save_figure


def test_privacy_utility_figure(sweeps, tmp_path):
    df = sweeps["privacy-utility"]
    assert len(df) == 7 and set(df["method"]) == {"non-private", "dp-sgd", "dual-priv", "dp-zo"}
    fig = privacy_utility_figure(df)
    _check(fig, tmp_path, "pu")
    assert [t.name for t in fig.data] == ["Non-private", "DP-SGD", "Dual-Priv", "DP-ZO"]
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
    assert list(memory.x) == ["Non-private", "DP-SGD", "Dual-Priv", "DP-ZO"]
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


def test_peak_memory_figure_labels_each_bar_with_its_ratios():
    table = pd.DataFrame(dict(method=["dp-sgd", "dual-priv", "dp-zo"], peak_memory_mb=[400.0, 80.0, 40.0],
                              memory_vs_dp_sgd=[1.0, 0.2, 0.1], memory_vs_dp_zo=[10.0, 2.0, 1.0], device="cpu"))
    fig = peak_memory_figure(table)
    bars = fig.data[0]
    assert list(bars.x) == ["DP-SGD", "Dual-Priv", "DP-ZO"] and list(bars.y) == [400.0, 80.0, 40.0]
    assert bars.text[1] == "80.0 MB<br>0.20× DP-SGD<br>2.00× DP-ZO"
    assert "cpu; one measurement" in fig.layout.title.text and fig.layout.width is None  # fills the plot area
    spread = table.assign(peak_memory_mb_min=[390.0, 78.0, 39.0], peak_memory_mb_max=[420.0, 81.0, 40.0], repeats=3)
    whiskers = peak_memory_figure(spread).data[0].error_y
    assert list(whiskers.array) == [20.0, 1.0, 0.0] and list(whiskers.arrayminus) == [10.0, 2.0, 1.0]
    assert "median of 3 measurements, whiskers min–max" in peak_memory_figure(spread).layout.title.text


def test_training_curve_shows_loss_and_epsilon_against_the_target():
    rows = [dict(step=i, steps=4, loss=1.0 / i, epsilon_spent=0.5 * i) for i in (1, 2, 3)]
    fig = training_curve_figure(pd.DataFrame(rows), epsilon_target=2.0)  # a TrainResult.history works too
    loss, spent = fig.data
    assert list(loss.x) == list(spent.x) == [1, 2, 3] and list(spent.y) == [0.5, 1.0, 1.5]
    assert fig.layout.shapes[0].y0 == 2.0 and "target ε = 2" in fig.layout.annotations[-1].text
    assert list(fig.layout.xaxis.range) == [0, 4.5]                   # the planned steps, not the steps so far
    no_loss = training_curve_figure([{k: v for k, v in r.items() if k != "loss"} for r in rows], 2.0)
    assert [t.name for t in no_loss.data] == ["ε spent"]
    assert "not released: outside the DP guarantee" in no_loss.layout.annotations[0].text
    assert "released: outside the DP guarantee" in fig.layout.annotations[0].text  # a private run's loss
    non_private = training_curve_figure([dict(step=1, steps=2, loss=0.7, epsilon_spent=math.inf)])
    assert [t.name for t in non_private.data] == ["loss"] and "non-private: ε = ∞" in non_private.layout.annotations[0].text
    assert len(no_loss.layout.annotations) == 2 and len(non_private.layout.annotations) == 1   # no blank half


def test_figures_refuse_bad_input():
    with pytest.raises(ValueError, match="lacks column"):
        privacy_utility_figure(pd.DataFrame({"method": ["dp-sgd"]}))
    with pytest.raises(ValueError, match="no rows"):
        memory_time_figure(pd.DataFrame(columns=["method", "peak_memory_mb", "step_time_s"]))
    with pytest.raises(TypeError, match="needs a pandas DataFrame"):
        peak_memory_figure([dict(method="dp-sgd", peak_memory_mb=1.0)])

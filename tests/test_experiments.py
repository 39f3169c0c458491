"""Sweeps (toolkit.experiments) and the ``sweep`` CLI: planning rules, keys, the CSV store, resuming."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

import toolkit.train as train_module
from toolkit.experiments import (
    CONFIG_FIELDS, META_COLUMNS, RESULT_COLUMNS, RULES, Sweep, append_row, config_key, expand,
    load_sweep_config, lora_rank_arms, matched_lora_rank, named_sweep, plan_sweep, read_results, run_sweep,
    sweep_from_dict, trainable_count,
)
from toolkit.train import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = dict(warm_start_steps=0, train_limit=64, eval_limit=32, steps=2, expected_batch_size=4, accountant="rdp")


# ------------------------------------------------------------------------------------------------ planning

def test_privacy_utility_plan_runs_non_private_once_per_seed():
    plan = plan_sweep(named_sweep("privacy-utility", quick=False))
    per_seed = [c for c in plan.cells if c.config.seed == 0]
    assert len(per_seed) == 1 + 3 * 5                      # non-private once + 3 private methods x 5 ε
    non_private = [c.config for c in plan.cells if c.config.method == "non-private"]
    assert len(non_private) == 3 and all(math.isinf(c.epsilon) for c in non_private)
    assert {s.rule for s in plan.skipped} == {"duplicate"}
    assert len(plan.skipped) == 4 * 3                       # the other 4 non-private ε, per seed


def test_ablation_plan_skips_noise_without_fused_tokens():
    plan = plan_sweep(named_sweep("ablation", quick=False))
    assert len([c for c in plan.cells if c.config.seed == 0]) == 12
    skipped = {s.rule for s in plan.skipped}
    assert skipped == {"fusion-noise-needs-fused-tokens"}
    strategies = {c.config.token_strategy for c in plan.cells}
    assert strategies == {"dual-priv", "dual-priv-random"}
    assert {c.config.grad_prune_ratio for c in plan.cells} == {0.0, 0.2}


@pytest.mark.parametrize("grid, rule", [
    (dict(method=["non-private"], grad_prune_ratio=[0.2]), "update-pruning-needs-dp-sgd"),
    (dict(method=["dp-zo"], grad_prune_ratio=[0.2]), "update-pruning-needs-dp-sgd"),
    (dict(method=["dp-sgd"], token_strategy=["random"], keep_tokens=[16], fusion_noise_std=[0.1]),
     "fusion-noise-needs-fused-tokens"),
    (dict(method=["dp-sgd"], epsilon=[math.inf], token_strategy=["dual-priv"], fusion_noise_std=["matched"]),
     "matched-fusion-noise-needs-dp-noise"),
    (dict(method=["dual-priv"], keep_tokens=[576]), "budget-exceeds-patches"),
    (dict(method=["dual-priv"], token_strategy=["random"], keep_tokens=[16], contextual_tokens=[2]),
     "contextual-tokens-need-fusing-strategy"),
])
def test_each_rule_skips_explicitly(grid, rule):
    assert rule in RULES
    plan = plan_sweep(Sweep("rules", base=dict(steps=2), grid=grid))
    assert plan.cells == [] and [s.rule for s in plan.skipped] == [rule]
    assert plan.skipped[0].reason


def test_config_errors_raise_before_running():
    with pytest.raises(ValueError, match="did you mean 'epsilon'"):
        plan_sweep(Sweep("bad", base=dict(steps=2, epsilonn=3)))
    with pytest.raises(ValueError, match="grad_prune_ratio"):
        plan_sweep(Sweep("bad", base=dict(steps=2), grid=dict(grad_prune_ratio=[1.5], method=["dp-sgd"])))
    with pytest.raises(ValueError, match="both keep_tokens and token_prune_ratio"):
        plan_sweep(Sweep("bad", base=dict(steps=2, token_prune_ratio=0.5), grid=dict(keep_tokens=[16])))
    with pytest.raises(ValueError, match="seeds"):
        Sweep("bad", grid=dict(seed=[0, 1]))


def test_config_key_is_stable_and_ignores_presentation():
    a = TrainConfig(method="dual-priv", epsilon=3, steps=2).resolved()
    b = TrainConfig(method="dual-priv", epsilon=3.0, steps=2, token_strategy="dual-priv", progress=False).resolved()
    c = TrainConfig(method="dual-priv", epsilon=3.0, steps=2, lr=1e-4).resolved()
    assert config_key(a) == config_key(b) != config_key(c)
    assert len(config_key(a)) == 12 and config_key(a) == config_key(TrainConfig(method="dual-priv", steps=2).resolved())


def test_expand_returns_resolved_configs():
    configs = expand(Sweep("e", base=TINY, grid=dict(method=["dp-sgd", "dual-priv"]), seeds=[0, 1]))
    assert len(configs) == 4 and all(isinstance(c, TrainConfig) for c in configs)
    assert configs[0].sampling == "poisson" and configs[-1].token_strategy == "dual-priv"


def test_bundled_axis_sets_fields_together_with_label_and_tags():
    sweep = Sweep("b", base=dict(steps=2, method="dual-priv"), grid=dict(arm=[
        dict(label="big", lora_rank=8, grad_prune_ratio=0.2, tags=dict(kind="prune")),
        dict(lora_rank=5, grad_prune_ratio=0.0)]))
    cells = plan_sweep(sweep).cells
    assert cells[0].columns == dict(arm="big", kind="prune") and cells[0].config.lora_rank == 8
    assert cells[1].columns["arm"] == "lora_rank=5, grad_prune_ratio=0" and cells[1].config.grad_prune_ratio == 0
    with pytest.raises(ValueError, match="bundled axis"):
        plan_sweep(Sweep("b", base=dict(steps=2), grid=dict(arm=[dict(lora_rnak=4)])))


def test_matched_lora_rank_uses_trainable_counts():
    m = matched_lora_rank("tiny", "lora+head", 8, 0.2)
    # N(r) is affine in r; the affine fit reproduces the measured count at rank 8
    assert m["n_fixed"] + 8 * m["n_per_rank"] == trainable_count("tiny", "lora+head", 8)
    assert m["updated_params"] == round(0.8 * trainable_count("tiny", "lora+head", 8))
    # not round(8 * 0.8) = 6: the fixed part (projector + the 384-token byte-level LM head) is pruned too
    assert m["r_prime"] == 3
    assert abs(m["mismatch"]) < 0.01
    arms = lora_rank_arms("tiny", "lora+head", 8, ratios=(0.2, 0.9))
    assert [a["label"] for a in arms] == ["r=8, no pruning", "r=8, prune 0.2", "r=3, no pruning"]  # 0.9: no match


# ------------------------------------------------------------------------------------------------- configs

def test_shipped_configs_load_and_plan():
    files = sorted(CONFIGS.glob("*.yaml")) + sorted(CONFIGS.glob("*.json"))
    assert {"sweep-quick.yaml", "paper-style.yaml"} <= {f.name for f in files}
    for path in files:
        sweep = load_sweep_config(path)
        assert plan_sweep(sweep).cells, path
        assert plan_sweep(sweep.quick_version()).cells, path


def test_load_sweep_config_yaml_json_and_errors(tmp_path):
    (tmp_path / "s.yaml").write_text("name: s\nbase: {steps: 2}\ngrid:\n  epsilon: [1, .inf]\n  method: [dp-sgd]\n")
    (tmp_path / "s.json").write_text(json.dumps(dict(base=dict(steps=2), grid=dict(epsilon=[1, "inf"],
                                                                                   method=["dp-sgd"]))))
    a, b = load_sweep_config(tmp_path / "s.yaml"), load_sweep_config(tmp_path / "s.json")
    assert b.name == "s"                                   # from the file name
    assert [config_key(c) for c in expand(a)] == [config_key(c) for c in expand(b)]
    (tmp_path / "bad.yaml").write_text("name: bad\nbase: {steps: 2, lora_rnk: 4}\n")
    with pytest.raises(ValueError, match="lora_rank"):
        load_sweep_config(tmp_path / "bad.yaml")
    with pytest.raises(ValueError, match="unknown key"):
        sweep_from_dict(dict(name="x", grids={}))
    with pytest.raises(FileNotFoundError):
        load_sweep_config(tmp_path / "missing.yaml")


# --------------------------------------------------------------------------------------------- CSV store

def test_csv_store_survives_a_torn_last_line_and_new_columns(tmp_path):
    path = tmp_path / "s.csv"
    append_row(path, dict(cell_id="a1", accuracy=0.5, epsilon=math.inf, note=None))
    with open(path, "a") as fh:
        fh.write("b2,0.7")                                   # a crash in the middle of a write
    assert list(read_results(path)["cell_id"]) == ["a1"]
    append_row(path, dict(cell_id="c3", accuracy=0.6, epsilon=1.0, note="x", extra=3))
    append_row(path, dict(cell_id="012e45678901", accuracy=0.7, epsilon=1.0))   # all digits but one 'e'
    df = read_results(path)
    assert list(df["cell_id"]) == ["a1", "c3", "012e45678901"] and math.isinf(df["epsilon"][0]) and "extra" in df


# ----------------------------------------------------------------------------------------- running (real)

def test_run_sweep_resumes_without_redoing_cells(tmp_path, monkeypatch):
    calls = []
    real_train = train_module.train

    def counting_train(config, callback=None):
        calls.append(config.method)
        return real_train(config, callback)

    monkeypatch.setattr(train_module, "train", counting_train)
    sweep = Sweep("resume", base=TINY, grid=dict(method=["non-private", "dp-sgd", "dp-zo"], epsilon=[1.0, 8.0]))
    assert len(plan_sweep(sweep).cells) == 5               # non-private once

    events = []

    def stop_after_two(event):                             # an interrupted sweep: stop after two cells
        events.append(event["kind"])
        return False if events.count("done") == 2 else None

    first = run_sweep(sweep, tmp_path, progress=False, callback=stop_after_two)
    assert len(first) == 2 and len(calls) == 2 and first.attrs.get("stopped")
    assert len(read_results(tmp_path / "resume.csv")) == 2

    events.clear()
    second = run_sweep(sweep, tmp_path, progress=False, callback=lambda e: events.append(e["kind"]))
    assert events.count("cached") == 2 and events.count("done") == 3 and len(calls) == 5
    assert len(second) == 5 and second["cell_id"].is_unique

    events.clear()
    third = run_sweep(sweep, tmp_path, progress=False, callback=lambda e: events.append(e["kind"]))
    assert events == ["cached"] * 5 and len(calls) == 5
    pd.testing.assert_frame_equal(second, third)

    # one row per cell with every documented column
    for column in (*META_COLUMNS, *CONFIG_FIELDS, *RESULT_COLUMNS):
        assert column in third.columns, column
    assert len(read_results(tmp_path / "resume.csv")) == 5
    assert set(third["method"]) == {"non-private", "dp-sgd", "dp-zo"}
    assert math.isinf(third.loc[third["method"] == "non-private", "epsilon"].iloc[0])
    private = third[third["method"] != "non-private"]
    assert (private["epsilon_spent"] <= private["epsilon"] + 1e-6).all()
    assert third["accuracy"].between(0, 1).all() and (third["steps_done"] == 2).all()
    assert (third["wall_time_s"] > 0).all() and third["trainable_params"].gt(0).all()
    plan = json.loads((tmp_path / "resume.plan.json").read_text())
    assert plan["cells"] == 5 and plan["skipped"] == 1          # non-private at the second ε


def test_ctrl_c_mid_cell_loses_only_that_cell(tmp_path, monkeypatch):
    calls = []
    real_train = train_module.train

    def counting_train(config, callback=None):
        calls.append(config.seed)
        return real_train(config, callback)

    monkeypatch.setattr(train_module, "train", counting_train)
    sweep = Sweep("ctrl-c", base=dict(TINY, method="dp-sgd", epsilon=8.0), seeds=[0, 1, 2])

    def interrupt_seed_1(row):                             # Ctrl-C during the second cell's first step
        if calls[-1] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, tmp_path, progress=False, step_callback=interrupt_seed_1)
    assert list(read_results(tmp_path / "ctrl-c.csv")["seed"]) == [0]
    df = run_sweep(sweep, tmp_path, progress=False)
    assert calls == [0, 1, 1, 2] and list(df["seed"]) == [0, 1, 2]


def test_run_sweep_on_error_continue_retries_next_time(tmp_path, monkeypatch):
    real_train = train_module.train
    state = {"fail": True}

    def flaky(config, callback=None):
        if state["fail"] and config.seed == 1:
            raise RuntimeError("simulated crash")
        return real_train(config, callback)

    monkeypatch.setattr(train_module, "train", flaky)
    sweep = Sweep("flaky", base=dict(TINY, method="non-private"), seeds=[0, 1])
    events = []
    df = run_sweep(sweep, tmp_path, progress=False, on_error="continue", callback=lambda e: events.append(e))
    assert len(df) == 1 and [e["kind"] for e in events] == ["done", "failed"]
    assert "simulated crash" in events[1]["error"]
    with pytest.raises(RuntimeError, match="simulated"):
        run_sweep(sweep, tmp_path, progress=False)
    state["fail"] = False
    assert len(run_sweep(sweep, tmp_path, progress=False)) == 2


def test_cli_sweep_config_dry_run_and_run(tmp_path, capsys):
    from toolkit.cli import main

    config = tmp_path / "cli.yaml"
    config.write_text("name: cli\nbase: {warm_start_steps: 0, train_limit: 64, eval_limit: 32, steps: 2,"
                      " expected_batch_size: 4, accountant: rdp}\ngrid:\n  method: [non-private, dual-priv]\n")
    out = tmp_path / "out"
    assert main(["sweep", "--config", str(config), "--out", str(out), "--dry-run", "--json",
                 str(tmp_path / "plan.json")]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["cells"] == 2 and not (out / "cli.csv").exists()
    assert main(["sweep", "--config", str(config), "--out", str(out), "--json", str(tmp_path / "r.json"),
                 "--no-progress"]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["ran"] == 2 and len(result["rows"]) == 2 and (out / "cli.csv").is_file()
    assert main(["sweep", "--config", str(config), "--out", str(out), "--json", str(tmp_path / "r2.json"),
                 "--no-progress"]) == 0
    again = json.loads((tmp_path / "r2.json").read_text())
    assert again["ran"] == 0 and again["cached"] == 2
    assert main(["sweep", "--named", "nope", "--out", str(out)]) == 2
    assert main(["sweep", "--named", "ablation", "--dry-run"]) == 0
    assert "fusion-noise-needs-fused-tokens" in capsys.readouterr().out

"""Sweeps (toolkit.sweeps) and the ``sweep`` CLI: planning rules, keys, the per-cell JSON store, resuming."""
from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pandas as pd
import pytest

import toolkit.train as train_module
from toolkit.dashboard.common import AppSettings
from toolkit.sweeps import (
    CONFIG_FIELDS, META_COLUMNS, QUICK_ENV, RESULT_COLUMNS, RULES, CorruptResultError, Sweep, config_key, expand,
    export_csv, is_quick, load_sweep_config, lora_rank_arms, matched_lora_rank, named_sweep, plan_sweep,
    read_results, run_sweep, summarize, sweep_from_dict, trainable_count, write_cell,
)
from toolkit.sweeps import store
from toolkit.train import TrainConfig, TrainResult

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

    # shown as it runs, at ε = ∞, not at the grid's first ε; a skipped point keeps the grid value it had
    assert {c.label.split(" | ")[1] for c in plan.cells if c.config.method == "non-private"} == {"epsilon=∞"}
    assert {s.label.split(" | ")[1] for s in plan.skipped} == {"epsilon=1", "epsilon=3", "epsilon=8", "epsilon=∞"}


def test_a_cell_train_would_refuse_for_its_data_size_is_refused_when_the_sweep_is_planned():
    """Was: a batch above N failed only when its cell's turn came, after the cells before it had trained."""
    base = dict(warm_start_steps=0, train_limit=32, steps=2)
    with pytest.raises(ValueError, match=r"cell method=dp-sgd \| seed=0: expected_batch_size=64 is larger than the "
                                         r"N = 32 records"):
        plan_sweep(Sweep("big", base=dict(base, expected_batch_size=64), grid=dict(method=["non-private", "dp-sgd"])))
    with pytest.raises(ValueError, match=r"cell method=dp-sgd \| seed=0: delta=0.05 is not below 1/N = 1/32"):
        plan_sweep(Sweep("delta", base=dict(base, expected_batch_size=8, delta=0.05),
                         grid=dict(method=["non-private", "dp-sgd"])))
    assert len(plan_sweep(Sweep("ok", base=dict(base, expected_batch_size=64, dataset_size=640),
                                grid=dict(method=["non-private", "dp-sgd"]))).cells) == 2


def test_a_run_length_set_over_a_base_replaces_the_bases_other_length():
    """steps and epochs together are refused; a grid point, an override or a quick base that sets one length
    replaces the base's other one instead (was: steps won and epochs was kept in the config, ignored)."""
    base = dict(epochs=2.0, train_limit=32, expected_batch_size=8)
    cell = plan_sweep(Sweep("grid", base=base, grid=dict(steps=[3]))).cells[0].config
    assert (cell.steps, cell.epochs) == (3, None)
    assert named_sweep("privacy-utility", quick=False, steps=50).base["epochs"] is None
    quick = Sweep("q", base=base, quick=dict(base=dict(epochs=1.0))).quick_version()
    assert (quick.base["steps"], quick.base["epochs"]) == (None, 1.0)


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
    with pytest.raises(ValueError, match="sweep 'bad', cell token_strategy=dual-prv .*unknown token.strategy"):
        plan_sweep(Sweep("bad", base=dict(steps=2), grid=dict(token_strategy=["dual-prv"])))
    with pytest.raises(ValueError, match="sweep 'bad', cell steps=two"):
        plan_sweep(Sweep("bad", grid=dict(steps=["two"])))


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


def test_sweep_refuses_bad_names_seeds_and_quick_keys():
    for name in ("", "a/b", "..", "x y"):
        with pytest.raises(ValueError, match="sweep name"):
            Sweep(name)
    with pytest.raises(ValueError, match="seed must be an integer"):
        Sweep("s", seeds=[0, 1.5])
    with pytest.raises(ValueError, match="seeds must be a list"):
        Sweep("s", seeds="012")
    with pytest.raises(ValueError, match="at least one seed"):
        Sweep("s", seeds=[])
    with pytest.raises(ValueError, match="non-empty list"):
        Sweep("s", grid=dict(epsilon=[]))
    with pytest.raises(ValueError, match="under 'quick'.*'grids'"):
        Sweep("s", quick=dict(grids={}))
    with pytest.raises(ValueError, match="tags"):
        plan_sweep(Sweep("s", base=dict(steps=2), grid=dict(arm=[dict(lora_rank=4, tags="x")])))


def test_an_impossible_budget_is_skipped_by_the_budget_rule_even_with_fusion_noise():
    plan = plan_sweep(Sweep("b", base=dict(steps=2, method="dual-priv", token_prune_ratio=None),
                            grid=dict(keep_tokens=[16, 576], fusion_noise_std=[0.1])))
    assert [c.config.keep_tokens for c in plan.cells] == [16]
    assert [s.rule for s in plan.skipped] == ["budget-exceeds-patches"]


def test_quick_mode_follows_the_environment_variable(monkeypatch):
    monkeypatch.setenv(QUICK_ENV, "yes")
    assert is_quick() and named_sweep("privacy-utility").name == "privacy-utility-quick"
    assert named_sweep("privacy-utility", quick=False).name == "privacy-utility"
    monkeypatch.setenv(QUICK_ENV, "0")
    assert not is_quick() and named_sweep("privacy-utility").name == "privacy-utility"
    quick = named_sweep("privacy-utility", quick=True, lr=1e-4)
    assert quick.base["steps"] == 2 and quick.base["lr"] == 1e-4 and quick.seeds == [0]
    with pytest.raises(ValueError, match="did you mean 'lr'"):
        named_sweep("privacy-utility", quick=True, lrr=1e-4)
    with pytest.raises(ValueError, match="unknown named sweep 'nope'"):
        named_sweep("nope")


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
    with pytest.raises(ValueError, match=r"grad_prune_ratio must be in \(0, 1\)"):
        matched_lora_rank("tiny", "lora+head", 8, 1.0)


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


# ------------------------------------------------------------------------------------------- the JSON store

def test_a_result_file_is_written_to_a_synced_temp_file_then_renamed(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(store.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(store.os, "replace", lambda src, dst: (events.append(("replace", Path(src), Path(dst))),
                                                              real_replace(src, dst))[1])
    path = write_cell(tmp_path, dict(cell_id="a1", accuracy=0.5, epsilon=math.inf, note=None))
    assert path == tmp_path / "a1.json"
    assert events[0] == "fsync" and events[2:] == ["fsync"]        # data synced before the rename, folder after
    _, src, dst = events[1]
    assert dst == path and src.parent == path.parent               # same folder: os.replace is atomic there
    assert src.name.startswith(".") and src.name.endswith(".tmp") and not src.exists()
    assert json.loads(path.read_text()) == dict(cell_id="a1", accuracy=0.5, epsilon="inf", note=None)  # strict JSON
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a1.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask          # readable as any file the user writes


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    write_cell(tmp_path, dict(cell_id="a1", accuracy=0.5))

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(store.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_cell(tmp_path, dict(cell_id="a1", accuracy=0.9))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a1.json"]
    assert list(read_results(tmp_path)["accuracy"]) == [0.5]
    with pytest.raises(ValueError, match="cell_id"):
        write_cell(tmp_path, dict(cell_id="../a1", accuracy=0.5))
    with pytest.raises(ValueError, match="cell_id"):
        write_cell(tmp_path, dict(accuracy=0.5))


def test_read_results_ignores_a_stray_temp_file(tmp_path):
    write_cell(tmp_path, dict(cell_id="a1", cell=0, accuracy=0.5))
    (tmp_path / ".b2.x7f3k.tmp").write_text('{"cell_id": "b2", "accur')     # a write cut short by a crash
    (tmp_path / ".b2.json").write_text('{"cell_id": "b2"')                      # hidden: never a result
    assert list(read_results(tmp_path)["cell_id"]) == ["a1"]


def test_a_corrupt_result_file_gives_an_error_naming_it(tmp_path):
    write_cell(tmp_path, dict(cell_id="a1", accuracy=0.5))
    bad = tmp_path / "b2.json"
    bad.write_text('{"cell_id": "b2", "accuracy": 0.')
    with pytest.raises(CorruptResultError, match=r"b2\.json.*not valid JSON.*delete it"):
        read_results(tmp_path)
    bad.write_text('["b2"]')
    with pytest.raises(CorruptResultError, match=r"b2\.json.*list"):
        read_results(tmp_path)
    bad.write_text('{"cell_id": "c3"}')
    with pytest.raises(CorruptResultError, match=r"b2\.json.*'c3'"):
        read_results(tmp_path)
    bad.write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError, match=r"b2\.json.*UTF-8"):
        read_results(tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        read_results(tmp_path / "file")


def test_read_results_keeps_types_order_and_new_columns(tmp_path):
    assert read_results(tmp_path / "missing").empty
    empty_columns = list(read_results(tmp_path / "missing").columns)
    assert empty_columns == list(dict.fromkeys([*META_COLUMNS, *CONFIG_FIELDS, *RESULT_COLUMNS]))
    write_cell(tmp_path, dict(cell_id="c3", sweep="s", cell=1, label="b", accuracy=0.6, epsilon=1.0, extra=3,
                              cancelled=False))
    write_cell(tmp_path, dict(cell_id="012e45678901", sweep="s", cell=0, label="a", arm="big", accuracy=0.7,
                              epsilon=math.inf, cancelled=True))   # all digits but one 'e'
    write_cell(tmp_path, dict(cell_id="0000000000a1", sweep="s", cell=2, label="c", accuracy=None,
                              epsilon=math.nan, cancelled=False))
    df = read_results(tmp_path)
    assert list(df["cell_id"]) == ["012e45678901", "c3", "0000000000a1"]      # plan order, ids stay strings
    assert list(df.columns) == ["cell_id", "sweep", "cell", "label", "arm", "extra", "epsilon", "accuracy",
                                "cancelled"]                                     # meta, extras, config, results
    assert math.isinf(df["epsilon"][0]) and df["epsilon"][1] == 1.0 and math.isnan(df["epsilon"][2])
    assert df["epsilon"].dtype == float and df["cancelled"].dtype == bool
    assert pd.isna(df["accuracy"][2]) and df["extra"][1] == 3 and pd.isna(df["extra"][0])


def test_export_csv_writes_a_table_people_can_open(tmp_path):
    write_cell(tmp_path / "s", dict(cell_id="a1", cell=0, method="non-private", epsilon=math.inf, accuracy=0.9,
                                    keep_tokens=None, tags=dict(k=1)))
    write_cell(tmp_path / "s", dict(cell_id="b2", cell=1, method="dp-sgd", epsilon=3.0, accuracy=0.6,
                                    keep_tokens=16, tags=dict(k=2)))
    from_folder = export_csv(tmp_path / "s", tmp_path / "out" / "s.csv")
    assert from_folder == tmp_path / "out" / "s.csv"
    text = from_folder.read_text()
    assert text.splitlines()[1].startswith("a1,") and ",inf," in text and '"{""k"": 1}"' in text
    back = pd.read_csv(from_folder)
    assert list(back["cell_id"]) == ["a1", "b2"] and math.isinf(back["epsilon"][0])
    assert back["accuracy"].tolist() == [0.9, 0.6] and pd.isna(back["keep_tokens"][0])
    export_csv(read_results(tmp_path / "s").iloc[:1], from_folder)                # replaced, not appended
    assert len(pd.read_csv(from_folder)) == 1
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["s.csv"]
    with pytest.raises(ValueError, match="is a directory"):
        export_csv(tmp_path / "s", tmp_path / "out")


def test_summarize_gives_mean_spread_and_count_per_group():
    df = pd.DataFrame(dict(method=["a", "a", "b"], epsilon=[1.0, 1.0, math.inf], accuracy=[0.5, 0.7, 0.9]))
    out = summarize(df, ["method", "epsilon"])
    assert list(out.columns) == ["method", "epsilon", "mean", "std", "count", "sem"]
    assert out["mean"].tolist() == pytest.approx([0.6, 0.9]) and out["count"].tolist() == [2, 1]
    assert out["sem"][0] == pytest.approx(out["std"][0] / math.sqrt(2)) and pd.isna(out["std"][1])
    with pytest.raises(ValueError, match="no column.*'seed'"):
        summarize(df, "seed")


# ----------------------------------------------------------------------------------------- running (real)

def test_run_sweep_resumes_without_redoing_cells(tmp_path, trained_configs):
    calls = trained_configs
    sweep = Sweep("resume", base=TINY, grid=dict(method=["non-private", "dp-sgd", "dp-zo"], epsilon=[1.0, 8.0]))
    assert len(plan_sweep(sweep).cells) == 5               # non-private once

    events = []

    def stop_after_two(event):                             # an interrupted sweep: stop after two cells
        events.append(event["kind"])
        return False if events.count("done") == 2 else None

    first = run_sweep(sweep, tmp_path, progress=False, callback=stop_after_two)
    assert len(first) == 2 and len(calls) == 2 and first.attrs.get("stopped")
    assert sorted(p.stem for p in (tmp_path / "resume").iterdir()) == sorted(first["cell_id"])   # one file a cell

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
    assert len(read_results(tmp_path / "resume")) == 5
    assert set(third["method"]) == {"non-private", "dp-sgd", "dp-zo"}
    assert math.isinf(third.loc[third["method"] == "non-private", "epsilon"].iloc[0])
    private = third[third["method"] != "non-private"]
    assert (private["epsilon_spent"] <= private["epsilon"] + 1e-6).all()
    assert third["accuracy"].between(0, 1).all() and (third["steps_done"] == 2).all()
    assert (third["wall_time_s"] > 0).all() and third["trainable_params"].gt(0).all()
    plan = json.loads((tmp_path / "resume.plan.json").read_text())
    assert plan["cells"] == 5 and plan["skipped"] == 1          # non-private at the second ε
    assert set(plan["cell_ids"]) == set(third["cell_id"])

    # deleting one cell's file re-runs that cell only
    gone = third["cell_id"].iloc[1]
    (tmp_path / "resume" / f"{gone}.json").unlink()
    events.clear()
    fourth = run_sweep(sweep, tmp_path, progress=False, callback=lambda e: events.append((e["kind"], e["cell_id"])))
    assert [e for e in events if e[0] != "cached"] == [("done", gone)] and len(calls) == 6
    assert list(fourth["cell_id"]) == list(third["cell_id"])


def test_ctrl_c_mid_cell_loses_only_that_cell(tmp_path, trained_configs):
    sweep = Sweep("ctrl-c", base=dict(TINY, method="dp-sgd", epsilon=8.0), seeds=[0, 1, 2])

    def interrupt_seed_1(row):                             # Ctrl-C during the second cell's first step
        if trained_configs[-1].seed == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, tmp_path, progress=False, step_callback=interrupt_seed_1)
    assert list(read_results(tmp_path / "ctrl-c")["seed"]) == [0]
    assert len(list((tmp_path / "ctrl-c").iterdir())) == 1       # the finished cell's file, no stray temp file
    df = run_sweep(sweep, tmp_path, progress=False)
    assert [c.seed for c in trained_configs] == [0, 1, 1, 2] and list(df["seed"]) == [0, 1, 2]


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
    assert [p.stem for p in (tmp_path / "flaky").iterdir()] == [events[0]["cell_id"]]   # nothing for the failure
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
    assert plan["cells"] == 2 and not (out / "cli.csv").exists() and not (out / "cli").exists()
    assert main(["sweep", "--config", str(config), "--out", str(out), "--json", str(tmp_path / "r.json"),
                 "--no-progress"]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["ran"] == 2 and len(result["rows"]) == 2 and (out / "cli.csv").is_file()
    assert len(list((out / "cli").glob("*.json"))) == 2 and result["results"] == str(out / "cli")
    exported = pd.read_csv(out / "cli.csv", dtype={"cell_id": str})
    assert list(exported["cell_id"]) == [r["cell_id"] for r in result["rows"]]
    assert list(exported["method"]) == ["non-private", "dual-priv"] and math.isinf(exported["epsilon"][0])
    assert main(["sweep", "--config", str(config), "--out", str(out), "--json", str(tmp_path / "r2.json"),
                 "--no-progress"]) == 0
    again = json.loads((tmp_path / "r2.json").read_text())
    assert again["ran"] == 0 and again["cached"] == 2
    assert main(["sweep", "--named", "nope", "--out", str(out)]) == 2
    assert main(["sweep", "--named", "ablation", "--dry-run"]) == 0
    assert "fusion-noise-needs-fused-tokens" in capsys.readouterr().out
    # a file's cells take the preset of its base: --preset beside --config was ignored silently, now refused
    assert main(["sweep", "--config", str(config), "--preset", "llava576", "--dry-run"]) == 2
    assert "--preset applies to --named only" in capsys.readouterr().err


# ------------------------------------------------------------------------------- running (fake train, fast)

def _fake_train(calls):
    """A stand-in for ``toolkit.train.train`` that records the configs and returns a well-formed result."""

    def fake(config, callback=None):
        calls.append(config)
        return TrainResult(config=config, history=pd.DataFrame(dict(step=[1], loss=[0.7])), accuracy=0.5,
                           epsilon_spent=min(config.epsilon, 1.0), noise_multiplier=1.0, sample_rate=0.1, steps=1,
                           peak_memory_mb=1.0, memory_method="fake", step_time_s=0.1, trainable_params=100,
                           visual_tokens=16, visual_tokens_in=64, wall_time_s=0.2)

    return fake


def test_a_corrupt_result_file_stops_the_sweep_before_anything_trains(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(train_module, "train", _fake_train(calls))
    sweep = Sweep("corrupt", base=dict(TINY, method="dp-sgd"), seeds=[0, 1])
    run_sweep(sweep, tmp_path, progress=False, shard=(0, 2))
    assert len(calls) == 1
    (tmp_path / "corrupt" / f"{plan_sweep(sweep).cells[0].cell_id}.json").write_text("{")
    with pytest.raises(CorruptResultError, match=r"corrupt/[0-9a-f]{12}\.json"):
        run_sweep(sweep, tmp_path, progress=False)
    assert len(calls) == 1


def test_shards_split_the_cells_and_share_one_folder(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(train_module, "train", _fake_train(calls))
    sweep = Sweep("shards", base=dict(TINY, method="dp-sgd"), grid=dict(epsilon=[1.0, 3.0, 8.0]), seeds=[0, 1])
    ids = [c.cell_id for c in plan_sweep(sweep).cells]
    first = run_sweep(sweep, tmp_path, progress=False, shard=(0, 2))
    assert [config_key(c) for c in calls] == ids[0::2] and list(first["cell_id"]) == ids[0::2]
    second = run_sweep(sweep, tmp_path, progress=False, shard=(1, 2))
    assert [config_key(c) for c in calls] == ids[0::2] + ids[1::2]
    assert list(second["cell_id"]) == ids and list(second["cell"]) == list(range(6))   # every cell, plan order
    for bad in [(2, 2), (0, 0), (0,), "0/2"]:
        with pytest.raises(ValueError, match="shard"):
            run_sweep(sweep, tmp_path, progress=False, shard=bad)
    with pytest.raises(ValueError, match="on_error"):
        run_sweep(sweep, tmp_path, progress=False, on_error="ignore")


def test_result_rows_record_the_device_and_updated_params(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(train_module, "train", _fake_train(calls))
    sweep = Sweep("rows", base=dict(TINY, device="cpu", epsilon=3.0),
                  grid=dict(method=["dual-priv", "dp-zo"]))
    df = run_sweep(sweep, tmp_path, progress=False)
    assert df.columns.is_unique and list(df.columns[:4]) == list(META_COLUMNS)
    assert list(df["device"]) == ["cpu", "cpu"]                     # the device it ran on, not "auto"
    assert list(df["updated_params"]) == [80, 100]                   # dual-priv prunes 20%; DP-ZO never
    assert list(df["final_loss"]) == [0.7, 0.7] and (df["sweep"] == "rows").all()


# ----------------------------------------------------------------------------------- benchmarks/utility.py

def _utility_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "utility.py"
    spec = importlib.util.spec_from_file_location("benchmark_utility", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_utility_benchmark_keeps_its_recipe_and_resumes_by_cell_id(tmp_path, monkeypatch, capsys):
    utility = _utility_module()
    sweep = utility.utility_sweep("utility", [3.0, math.inf], [0, 1], ["non-private", "dp-sgd"], 20.0, "test")
    plan = plan_sweep(sweep)
    # the same runs the benchmark trained before it was a sweep: one non-private run per seed, at ε = ∞
    before = [TrainConfig(method=m, epsilon=math.inf if m == "non-private" else e, seed=s, epochs=20.0,
                          expected_batch_size=128, eval_split="test", progress=False).resolved()
              for m in ("non-private", "dp-sgd") for e in ([math.inf] if m == "non-private" else [3.0, math.inf])
              for s in (0, 1)]
    assert sorted(c.cell_id for c in plan.cells) == sorted(config_key(c) for c in before)

    calls = []
    monkeypatch.setattr(train_module, "train", _fake_train(calls))
    out = tmp_path / "runs" / "utility.csv"
    argv = ["--out", str(out), "--epsilons", "3,inf", "--seeds", "0", "--methods", "dp-sgd,non-private"]
    utility.main(argv)
    assert len(calls) == 3 and len(list((tmp_path / "runs" / "utility").glob("*.json"))) == 3
    table = pd.read_csv(out)
    assert sorted(table["method"]) == ["dp-sgd", "dp-sgd", "non-private"]
    assert "accuracy 0.500" in capsys.readouterr().out
    utility.main(argv + ["--seeds", "0,1"])                         # resumes: only seed 1 is new
    assert len(calls) == 6 and [c.seed for c in calls[3:]] == [1, 1, 1] and len(pd.read_csv(out)) == 6
    for bad, words in [(["--out", str(tmp_path / "u")], "must name a .csv"), (["--epsilons", "0"], "epsilon"),
                       (["--methods", "dp-sdg"], "unknown method"), (["--shard", "2/2"], "--shard"),
                       (["--seeds", "a"], "not an integer")]:
        with pytest.raises(SystemExit):
            utility.parse_args(bad)
        assert words in capsys.readouterr().err


# ---------------------------------------------------------------------------- benchmarks/dashboard_defaults.py

def test_dashboard_defaults_benchmark_runs_what_the_tab_runs_and_reports_its_verdict():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "dashboard_defaults.py"
    spec = importlib.util.spec_from_file_location("benchmark_dashboard_defaults", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    runs = bench.plan(2, [0.3, 3.0])
    assert runs.count(("dual-priv", 3.0, 100)) == 2 and ("non-private", math.inf, 100) in runs
    assert ("dp-sgd", 0.3, 100) in runs and ("dual-priv", 3.0, 20) in runs     # the curve and the old default
    settings = AppSettings(warm_start_steps=0, train_limit=64, eval_limit=32)
    config = bench.tab_config(settings, "dual-priv", 3.0, 100)
    assert (config.expected_batch_size, config.token_prune_ratio, config.grad_prune_ratio) == (32, 0.75, 0.2)
    assert bench.tab_config(settings, "dp-sgd", 3.0, 100).grad_prune_ratio == 0.0   # baselines keep every coordinate
    row = bench.measure(settings, "dual-priv", 3.0, 2)
    assert row["verdict"] in ("learned", "not learned (baseline: chance)", "not learned (baseline: majority class)")
    assert row["cpu_s"] > 0
    assert 0 <= row["accuracy"] <= 100


def test_a_built_in_study_releases_costs_only_on_the_public_embedded_data():
    """Step time and memory grow with the secret batch size: a sweep on your own data keeps them withheld."""
    assert named_sweep("privacy-utility", quick=True).base["release_cost_stats"] is True
    own = named_sweep("privacy-utility", quick=True, train_data="photos/train.json")
    assert "release_cost_stats" not in own.base
    assert named_sweep("privacy-utility", quick=True, release_cost_stats=False).base["release_cost_stats"] is False


def test_a_failing_sweep_names_its_cell_and_a_sweep_whose_every_cell_failed_exits_non_zero(tmp_path, capsys):
    """Was: the bare error with no cell named, and with --keep-going an all-failed sweep exited 0."""
    from toolkit.cli import main

    # records whose pictures are missing: the plan counts the JSON, validation refuses them when the cell trains
    (tmp_path / "data.json").write_text(json.dumps([
        dict(id=str(i), image=f"missing{i}.png", conversations=[dict(**{"from": "human"}, value="<image>\nq?"),
                                                                 dict(**{"from": "gpt"}, value="a")])
        for i in range(8)]))
    config = tmp_path / "broken.yaml"
    config.write_text(f"name: broken\nbase: {{warm_start_steps: 0, steps: 2, expected_batch_size: 4, "
                      f"delta: 1.0e-3, accountant: rdp, train_data: {tmp_path / 'data.json'}, "
                      f"image_folder: {tmp_path}}}\ngrid:\n  method: [dp-sgd]\n")
    with pytest.raises(ValueError, match="sweep cell 'method=dp-sgd.*missing0.png"):
        run_sweep(load_sweep_config(config), tmp_path / "a", progress=False)
    assert main(["sweep", "--config", str(config), "--out", str(tmp_path / "b"), "--keep-going",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "FAILED method=dp-sgd" in err and "every cell of the sweep failed" in err

"""The utility study (toolkit.sweeps.study): choosing on validation, the test sweep, the comparison; and sweeps
re-running a cell whose stored result was trained from other starting weights."""
from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest

from toolkit.sweeps import Sweep, run_sweep, sweep_results
from toolkit.sweeps.named import named_sweep
from toolkit.sweeps.study import (
    PAPER_ARM, arm_table, ceiling, ceiling_sweep, choose_arms, chosen_from_report, compare, load_measured_study,
    markdown, start_accuracy, summary_markdown, test_sweep as make_test_sweep, verdict,
)

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
ARMS = [
    dict(label="DP-SGD", method="dp-sgd"),
    dict(label="DP-SGD, lr 1e-2", method="dp-sgd", lr=1e-2),
    dict(label=PAPER_ARM, method="dual-priv"),
    dict(label="Dual-Priv, past-noisy", method="dual-priv", update_mask="past-noisy", grad_prune_ratio=0.5),
    dict(label="Dual-Priv, batch 256", method="dual-priv", expected_batch_size=256, epochs=40.0),
    dict(label="Dual-Priv, slow", method="dual-priv", epochs=200.0),
]


def _tuning(rows):
    """rows: (arm, method, [validation accuracies per seed], steps, batch, step time)."""
    records = []
    for arm, method, accuracies, steps, batch, step_time in rows:
        for seed, accuracy in enumerate(accuracies):
            records.append(dict(arm=arm, method=method, seed=seed, accuracy=accuracy, steps_done=steps,
                                expected_batch_size=batch, step_time_s=step_time,
                                visual_tokens=64 if method == "dp-sgd" else 16))
    return pd.DataFrame(records)


TUNING = _tuning([
    ("DP-SGD", "dp-sgd", [0.70, 0.72], 110, 128, 1.0),
    ("DP-SGD, lr 1e-2", "dp-sgd", [0.80, 0.78], 110, 128, 1.0),
    (PAPER_ARM, "dual-priv", [0.60, 0.62], 110, 128, 0.2),
    ("Dual-Priv, past-noisy", "dual-priv", [0.75, 0.77], 110, 128, 0.2),
    ("Dual-Priv, batch 256", "dual-priv", [0.82, 0.84], 110, 256, 0.4),
    ("Dual-Priv, slow", "dual-priv", [0.95, 0.95], 1100, 128, 0.2),   # 10x the steps: ~4x DP-SGD's FLOPs
])


def test_winners_are_chosen_by_validation_within_each_view():
    chosen = choose_arms(TUNING, ARMS)
    assert chosen["DP-SGD"]["label"] == "DP-SGD, lr 1e-2" and chosen["DP-SGD"]["lr"] == 1e-2
    assert chosen["Dual-Priv (paper)"]["label"] == PAPER_ARM
    assert chosen["Dual-Priv, equal steps"]["label"] == "Dual-Priv, past-noisy"       # batch 256 is not equal steps
    assert chosen["Dual-Priv, equal wall-clock"]["label"] == "Dual-Priv, batch 256"   # 'slow' costs more than DP-SGD
    assert chosen["DP-SGD"]["tags"]["validation_accuracy"] == pytest.approx(0.79)


def test_choosing_needs_both_methods():
    with pytest.raises(ValueError, match="DP-SGD and Dual-Priv"):
        choose_arms(TUNING[TUNING["method"] == "dual-priv"], ARMS)
    with pytest.raises(ValueError, match="no finished cells"):
        choose_arms(TUNING.iloc[:0], ARMS)


def test_the_test_sweep_runs_each_chosen_arm_once_on_the_test_split():
    chosen = choose_arms(TUNING, ARMS)
    chosen["Dual-Priv, equal steps"] = chosen["Dual-Priv (paper)"]                  # one arm, two families
    sweep = make_test_sweep(chosen, task="sum", quick=False)
    assert sweep.base["eval_split"] == "test" and sweep.base["task"] == "sum"
    assert sweep.grid["epsilon"] == [1.0, 3.0, 8.0] and sweep.seeds == [0, 1, 2, 3, 4]
    assert [a["label"] for a in sweep.grid["arm"]] == ["DP-SGD, lr 1e-2", PAPER_ARM, "Dual-Priv, batch 256"]
    assert all("tags" not in a for a in sweep.grid["arm"])


def test_comparison_reports_differences_with_their_standard_error():
    chosen = {"DP-SGD": dict(label="A"), "Dual-Priv, equal steps": dict(label="B")}
    results = pd.DataFrame(dict(arm=["A", "A", "B", "B"], epsilon=[3.0] * 4, accuracy=[0.70, 0.80, 0.90, 0.90]))
    table = compare(results, chosen).set_index("family")
    assert table.loc["DP-SGD", "mean"] == pytest.approx(75.0) and table.loc["DP-SGD", "se"] == pytest.approx(5.0)
    assert table.loc["Dual-Priv, equal steps", "vs_dp_sgd"] == pytest.approx(15.0)
    assert table.loc["Dual-Priv, equal steps", "vs_dp_sgd_se"] == pytest.approx(5.0)   # hypot(0, 5)
    assert "+15.0 ± 5.0" in markdown(compare(results, chosen))


def test_a_cell_trained_from_other_starting_weights_is_rerun(tmp_path, trained_configs):
    calls = trained_configs
    sweep = Sweep("stale", base=dict(warm_start_steps=0, train_limit=32, eval_limit=16, steps=1,
                                     expected_batch_size=4, accountant="rdp", method="dp-sgd", epsilon=8.0))
    first = run_sweep(sweep, tmp_path, progress=False)
    assert first["start_model"].tolist() == ["untrained-tiny"] and len(calls) == 1
    run_sweep(sweep, tmp_path, progress=False)
    assert len(calls) == 1                                              # same start: cached
    path = next((tmp_path / "stale").glob("*.json"))
    row = json.loads(path.read_text())
    path.write_text(json.dumps(dict(row, start_model="warmstart-tiny-s0-600-0123456789ab")))  # an older recipe
    assert sweep_results(sweep, tmp_path).empty                         # a stale result is not this plan's
    again = run_sweep(sweep, tmp_path, progress=False)
    assert len(calls) == 2 and again["start_model"].tolist() == ["untrained-tiny"]
    assert not math.isnan(again["accuracy"].iloc[0])


def test_a_view_no_arm_qualifies_for_is_left_out_not_filled_in():
    costly = TUNING.assign(steps_done=[110] * 4 + [1100] * 8)                 # every Dual-Priv arm costs more
    chosen = choose_arms(costly, ARMS)
    assert "Dual-Priv, equal wall-clock" not in chosen and "Dual-Priv, equal steps" not in chosen
    table = markdown(compare(pd.DataFrame(dict(arm=["DP-SGD, lr 1e-2"], epsilon=[3.0], accuracy=[0.8])), chosen))
    assert "| ε | DP-SGD |" in table and "equal wall-clock" not in table


def test_the_study_script_runs_every_stage_and_resumes(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("utility_study", BENCHMARKS / "utility_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    monkeypatch.setenv("DUALPRIV_QUICK", "1")
    out = tmp_path / "study"
    study.main(["--out", str(out), "--tasks", "parity"])
    report = json.loads((out / "utility-study.json").read_text())
    assert report["chosen"]["DP-SGD"] == "DP-SGD" and "Dual-Priv (paper)" in report["chosen"]
    tested = {row["family"] for row in report["tasks"]["parity"]}
    assert {"DP-SGD", "Dual-Priv (paper)"} <= tested
    assert all(row["epsilon"] == 3.0 and row["seeds"] == 1 for row in report["tasks"]["parity"])
    assert len(report["budgets"]) == 2 and len(report["ranks"]) == 2          # the validation ablations
    assert report["ceilings"]["parity"]["seeds"] == 1                          # non-private on the same recipe
    printed = capsys.readouterr().out
    assert "s/step" in printed                                                  # a trained cell is reported
    assert re.search(r"^  step (\d+) of \1$", printed, re.M)                   # and where a running one is
    study.main(["--out", str(out), "--tasks", "parity"])                        # resumes: nothing new trains
    assert "s/step" not in capsys.readouterr().out


def test_choices_read_back_from_a_report_are_the_choices_that_were_made():
    chosen = choose_arms(TUNING, ARMS)
    report = dict(chosen={f: a["label"] for f, a in chosen.items()},
                  tuning=arm_table(TUNING).to_dict(orient="records"))
    assert chosen_from_report(json.loads(json.dumps(report)), ARMS) == chosen
    renamed = dict(report, chosen=dict(report["chosen"], **{"DP-SGD": "DP-SGD, an arm since removed"}))
    with pytest.raises(ValueError, match="an arm since removed"):
        chosen_from_report(renamed, ARMS)
    with pytest.raises(ValueError, match="no chosen configurations"):
        chosen_from_report({}, ARMS)


def test_a_new_task_is_tested_on_a_reports_choices_and_the_reports_other_tables_are_kept(tmp_path, monkeypatch,
                                                                                          capsys):
    spec = importlib.util.spec_from_file_location("utility_study", BENCHMARKS / "utility_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    monkeypatch.setenv("DUALPRIV_QUICK", "1")
    parity = [dict(family="DP-SGD", arm="DP-SGD", epsilon=3.0, mean=80.0, se=1.0, seeds=5, vs_dp_sgd=0.0,
                   vs_dp_sgd_se=1.4)]
    earlier = dict(chosen={"DP-SGD": "DP-SGD", "Dual-Priv (paper)": PAPER_ARM},
                   tuning=[dict(arm="DP-SGD", mean=0.8, train_time_s=100.0),
                           dict(arm=PAPER_ARM, mean=0.7, train_time_s=40.0)],
                   tasks=dict(parity=parity), budgets=[dict(arm="keep 0.5", mean=0.8)])
    (tmp_path / "earlier.json").write_text(json.dumps(earlier))
    out = tmp_path / "study"
    study.main(["--out", str(out), "--tasks", "sum", "--stage", "test",
                "--chosen-from", str(tmp_path / "earlier.json")])
    report = json.loads((out / "utility-study.json").read_text())
    assert report["tasks"]["parity"] == parity and report["budgets"] == earlier["budgets"]   # nothing ran: kept
    assert {row["arm"] for row in report["tasks"]["sum"]} == {"DP-SGD", PAPER_ARM}           # the report's choices
    assert "choices, tuning table and ablations from" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        study.main(["--out", str(out), "--stage", "tune", "--chosen-from", str(tmp_path / "earlier.json")])
    with pytest.raises(SystemExit):
        study.main(["--out", str(out), "--stage", "test", "--chosen-from", str(tmp_path / "absent.json")])
    assert "no report at" in capsys.readouterr().err


def test_the_scene_study_runs_and_reports_the_task_headroom_beside_the_study_ceiling(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("utility_study", BENCHMARKS / "utility_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    monkeypatch.setenv("DUALPRIV_QUICK", "1")
    earlier = dict(chosen={"DP-SGD": "DP-SGD"}, tuning=[dict(arm="DP-SGD", mean=0.8, train_time_s=100.0)])
    (tmp_path / "earlier.json").write_text(json.dumps(earlier))
    out = tmp_path / "study"
    study.main(["--out", str(out), "--tasks", "scene", "--stage", "ceiling",
                "--chosen-from", str(tmp_path / "earlier.json")])
    report = json.loads((out / "utility-study.json").read_text())
    assert report["ceilings"]["scene"]["seeds"] == 1 and report["best_ceilings"]["scene"]["seeds"] == 1
    assert sorted(path.name for path in out.iterdir() if path.is_dir()) == ["utility-ceiling-scene-best-quick",
                                                                             "utility-ceiling-scene-quick"]
    assert "the task's best known recipe: lm-full" in capsys.readouterr().out


def test_the_rank_ablation_varies_the_noised_dimension_for_both_methods_alike():
    sweep = named_sweep("dp-lora-ranks", quick=False)
    assert sweep.base["eval_split"] == "validation" and sweep.base["epsilon"] == 3.0
    arms = sweep.grid["arm"]
    by_rank = {}
    for arm in arms:
        by_rank.setdefault(arm["lora_rank"], set()).add((arm["method"], arm["lr"]))
    assert sorted(by_rank) == [2, 4, 8, 16, 32]
    assert all(pairs == {("dp-sgd", 1e-2), ("dual-priv", 1e-2)} for pairs in by_rank.values())
    noised = {a["lora_rank"]: a["tags"]["vs_rank_8"] for a in arms}
    assert noised[8] == 1.0 and noised[2] < 1.0 < noised[32]     # fewer trained coordinates, less noise in total


def test_the_scene_task_headroom_is_measured_with_its_best_recipe_beside_the_study_recipe():
    study, best = ceiling_sweep("scene", quick=False), ceiling_sweep("scene", quick=False, recipe="best")
    assert study.base["trainable"] == "lora+head" and study.base["epochs"] == 20.0     # the arms' own recipe
    assert best.base["trainable"] == "lm-full" and best.base["steps"] == 4800 and best.base["epochs"] is None
    assert best.base["method"] == "non-private" and best.base["eval_split"] == "test" and best.seeds == study.seeds
    assert best.name != study.name                           # separate cell files: neither resumes into the other
    with pytest.raises(ValueError, match="no best non-private recipe is recorded for 'parity'"):
        ceiling_sweep("parity", recipe="best")
    with pytest.raises(ValueError, match="unknown ceiling recipe 'fast'"):
        ceiling_sweep("scene", recipe="fast")
    top = dict(task="scene", chance=28.0, mean=93.0, se=1.0, seeds=5)
    report = dict(chosen={"DP-SGD": "A"}, tasks=dict(scene=[dict(family="DP-SGD", arm="A", epsilon=3.0, mean=70.0,
                                                                 se=1.0, seeds=5, vs_dp_sgd=0.0, vs_dp_sgd_se=1.4)]),
                  ceilings=dict(scene=dict(top, mean=85.0)), best_ceilings=dict(scene=top))
    text = summary_markdown(report)
    assert "Without privacy (same recipe): 85.0 ± 1.0 %" in text
    assert ("Without privacy (the task's best known recipe: lm-full, lr 0.001, batch 64, 4800 steps): "
            "93.0 ± 1.0 %") in text


def test_the_ceiling_is_non_private_on_the_same_recipe_and_chance_is_the_most_frequent_answer():
    sweep = ceiling_sweep("left-digit", quick=False)
    assert sweep.base["method"] == "non-private" and sweep.base["eval_split"] == "test"
    assert sweep.base["expected_batch_size"] == 128 and sweep.seeds == [0, 1, 2, 3, 4]
    results = pd.DataFrame(dict(accuracy=[0.30, 0.40], seed=[0, 1]))
    top = ceiling(results, "left-digit")
    assert top["mean"] == pytest.approx(35.0) and top["se"] == pytest.approx(5.0) and top["seeds"] == 2
    assert 10.0 <= top["chance"] < 20.0                     # left-digit: 10 answers, the most frequent a little above
    assert ceiling(results, "parity")["chance"] >= 50.0      # two answers: the larger share
    assert "mean" not in ceiling(results.iloc[:0], "sum")    # nothing measured: nothing made up
    start = start_accuracy("left-digit", quick=True)          # quick: the untrained preset, 32 test records
    assert 0.0 <= start <= 100.0 and ceiling(results, "left-digit", start=start)["start"] == start
    report = dict(chosen={"DP-SGD": "A"}, tasks=dict(parity=[dict(family="DP-SGD", arm="A", epsilon=3.0, mean=80.0,
                                                                  se=1.0, seeds=5, vs_dp_sgd=0.0, vs_dp_sgd_se=1.4)]),
                  ceilings=dict(parity=dict(top, task="parity", start=26.9)))
    assert "Without privacy (same recipe): 35.0 ± 5.0 % over 2 seeds" in summary_markdown(report)
    assert "the starting model before fine-tuning: 26.9 %" in summary_markdown(report)


def test_the_summary_shows_the_ablations_losers_included():
    report = dict(chosen={"DP-SGD": "A"}, tasks={},
                  ranks=[dict(arm="DP-SGD, LoRA rank 2", mean=0.80, sem=0.01, count=2),
                         dict(arm="Dual-Priv, LoRA rank 32", mean=0.70, sem=0.02, count=2)])
    text = summary_markdown(report)
    assert "**LoRA rank" in text and "Dual-Priv budgets" not in text          # only what was measured
    assert text.index("| DP-SGD, LoRA rank 2 | 80.0 ± 1.0 | 2 |") < text.index("| Dual-Priv, LoRA rank 32 | 70.0")


@pytest.mark.parametrize("delta, se, outcome", [(3.0, 1.0, "is MET"), (2.5, 3.0, "within its standard error"),
                                                (-1.5, 1.0, "MISSED by 3.5 points")])
def test_the_verdict_compares_the_difference_with_the_target_and_its_noise(delta, se, outcome):
    rows = [dict(family="Dual-Priv, equal wall-clock", epsilon=3.0, vs_dp_sgd=delta, vs_dp_sgd_se=se, seeds=5)]
    assert outcome in verdict(rows)
    assert "not measured" in verdict(rows, epsilon=8.0)


def test_the_summary_says_when_the_study_was_not_measured(tmp_path):
    assert load_measured_study(tmp_path / "absent.json") is None
    assert "has not been measured" in summary_markdown(None)


def test_equal_wall_clock_is_judged_by_flops_not_by_a_lucky_timing():
    arms = ARMS + [dict(label="Dual-Priv, many steps timed fast", method="dual-priv", epochs=400.0)]
    lucky = _tuning([("Dual-Priv, many steps timed fast", "dual-priv", [0.99, 0.99], 2200, 128, 0.01)])
    chosen = choose_arms(pd.concat([TUNING, lucky]), arms)   # 22 s "measured", but 8x DP-SGD's FLOPs
    assert chosen["Dual-Priv, equal wall-clock"]["label"] == "Dual-Priv, batch 256"


def test_a_dp_sgd_arm_tied_with_the_winner_on_validation_is_tested_and_compared_too():
    tied = TUNING.assign(accuracy=[0.80, 0.78] + [0.80, 0.78] + list(TUNING["accuracy"][4:]))
    chosen = choose_arms(tied, ARMS)
    assert chosen["DP-SGD"]["label"] == "DP-SGD" and chosen["DP-SGD (validation tie)"]["label"] == "DP-SGD, lr 1e-2"
    assert "DP-SGD, lr 1e-2" in [a["label"] for a in make_test_sweep(chosen, quick=False).grid["arm"]]
    rows = [dict(family="DP-SGD", arm="DP-SGD", epsilon=3.0, mean=80.0, se=1.0, seeds=5, vs_dp_sgd=0.0,
                 vs_dp_sgd_se=1.4),
            dict(family="DP-SGD (validation tie)", arm="DP-SGD, lr 1e-2", epsilon=3.0, mean=84.0, se=1.0, seeds=5,
                 vs_dp_sgd=4.0, vs_dp_sgd_se=1.4),
            dict(family="Dual-Priv, equal wall-clock", arm="B", epsilon=3.0, mean=85.0, se=0.0, seeds=5,
                 vs_dp_sgd=5.0, vs_dp_sgd_se=1.0)]
    assert "Against the DP-SGD configuration tied with it on validation (DP-SGD, lr 1e-2, 84.0 %): +1.0 ± 1.0" \
        in verdict(rows)

"""``toolkit.plan`` / ``python -m toolkit plan``: the numbers come from the toolkit's own accountant, the verdict
from the measured table, and nothing loads a model."""
from __future__ import annotations

import json
import math

import pytest

from toolkit.config import TrainConfig
from toolkit.plan import load_calibration, plan, summarize_calibration
from toolkit.privacy.accounting import calibrate_noise, epsilon_for
from toolkit.samples import make_photo_dataset


def _row(n, eps, ratio, seed, acc, learned):
    return dict(task="photo", n=n, epsilon=eps, seed=seed, steps=30, expected_batch_size=n // 10, noise_ratio=ratio,
                accuracy=acc, learned=learned, majority=0.5, eval_records=200)


TABLE = summarize_calibration([_row(1000, 8.0, 0.01, 0, 0.8, True), _row(1000, 8.0, 0.01, 1, 0.82, True),
                               _row(1000, 0.5, 0.05, 0, 0.5, False), _row(1000, 0.5, 0.05, 1, 0.51, False)])


def test_plan_sigma_and_epsilon_come_from_the_toolkit_accountant():
    p = plan(TrainConfig(method="dual-priv", epsilon=3.0, steps=20, expected_batch_size=70), TABLE, propose=False)
    q = 70 / p.n
    assert p.sample_rate == pytest.approx(q)
    assert p.noise_multiplier == pytest.approx(calibrate_noise(3.0, 1e-5, q, 20))
    assert p.epsilon_reached == pytest.approx(epsilon_for(p.noise_multiplier, q, 20, 1e-5))
    assert p.epsilon_reached <= 3.0
    assert p.noise_ratio == pytest.approx(p.noise_multiplier / 70)
    assert p.noise_std == pytest.approx(p.noise_multiplier * p.max_grad_norm / 70)


def test_plan_counts_the_records_of_a_data_file_without_loading_a_model(tmp_path):
    paths = make_photo_dataset(tmp_path, n_train=40, n_test=4)
    p = plan(TrainConfig(method="dp-sgd", epsilon=8.0, steps=5, expected_batch_size=10, train_data=paths["train"]),
             TABLE, propose=False)
    assert (p.n, p.unit, p.sample_rate) == (40, "record", 0.25)
    assert "one record" in p.unit_sentence


def test_a_plan_of_a_data_file_says_its_n_is_counted_before_validation(tmp_path):
    """A file's records are counted without opening an image, so validation may later refuse some and train's N
    be smaller: the plan says so, unless the accepted count was declared as dataset_size (as the dashboard does)."""
    paths = make_photo_dataset(tmp_path, n_train=40, n_test=4)
    config = dict(method="dp-sgd", epsilon=8.0, steps=5, expected_batch_size=10, train_data=paths["train"])
    counted = plan(TrainConfig(**config), TABLE, propose=False)
    assert "N = 40 records (records in the file before validation; train counts the records it accepts)" \
        in counted.line()
    assert counted.to_dict()["n_counted"].startswith("records in the file before validation")
    declared = plan(TrainConfig(dataset_size=38, **config), TABLE, propose=False)
    assert declared.n == 38 and declared.n_counted == "" and "N = 38 records," in declared.line()


@pytest.mark.parametrize("ratio_eps, kind", [(50.0, "learned"), (0.3, "stuck")])
def test_the_verdict_says_where_the_noise_falls_on_the_measured_table(ratio_eps, kind):
    p = plan(TrainConfig(method="dual-priv", epsilon=ratio_eps, steps=30, expected_batch_size=70), TABLE,
             propose=False)
    assert p.evidence["kind"] == kind
    assert ("learned" in p.verdict) if kind == "learned" else ("stayed at the majority class" in p.verdict)
    assert p.evidence["runs"] == 2
    assert "e.g. photo task, N = 1000" in p.verdict     # a parity plan names the other task its runs measured


def test_the_published_calibration_table_is_measured_and_monotone_enough_to_read():
    table = load_calibration()
    assert table["runs"] >= 10 and table["script"] == "benchmarks/calibrate_plan.py"
    learned = [c["noise_ratio"] for c in table["cells"] if c["learned"] == c["runs"]]
    stuck = [c["noise_ratio"] for c in table["cells"] if c["learned"] == 0]
    assert learned and stuck and max(learned) < min(stuck)


def test_the_proposal_never_has_more_noise_than_the_config_at_the_same_compute():
    p = plan(TrainConfig(method="dual-priv", epsilon=3.0, steps=200, expected_batch_size=16), TABLE)
    assert p.proposal is not None
    assert p.proposal["noise_ratio"] <= p.noise_ratio
    assert p.proposal["expected_batch_size"] * p.proposal["steps"] <= 16 * 200
    assert p.proposal["steps"] >= 30


def test_a_non_private_plan_has_no_epsilon():
    p = plan(TrainConfig(method="non-private", steps=10), TABLE)
    assert not p.private and p.epsilon_reached is None and p.noise_ratio == 0.0
    assert "non-private" in p.line()


def test_the_plan_cli_takes_trains_flags_and_writes_json(tmp_path, capsys):
    from toolkit.cli import main

    out = tmp_path / "plan.json"
    assert main(["plan", "--method", "dp-sgd", "--epsilon", "3", "--steps", "10", "--expected-batch-size", "64",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["steps"] == 10 and result["epsilon_reached"] <= 3.0 and "line" in result
    assert "plan: dp-sgd" in capsys.readouterr().out


def test_the_plan_refuses_what_train_refuses_with_trains_words(tmp_path):
    """A plan that train would not run is no plan: a batch above N, δ ≥ 1/N, a declared size below the data, an
    empty data file (was a ZeroDivisionError); a non-private batch above N samples everyone, as in train."""
    with pytest.raises(ValueError, match="expected_batch_size=1000 is larger than the N = 100 records"):
        plan(TrainConfig(method="dp-sgd", steps=5, expected_batch_size=1000, train_limit=100), TABLE, propose=False)
    with pytest.raises(ValueError, match="delta=0.5 is not below 1/N"):
        plan(TrainConfig(method="dp-sgd", steps=5, delta=0.5), TABLE, propose=False)
    with pytest.raises(ValueError, match="dataset_size 5 is smaller than the training set"):
        plan(TrainConfig(method="dp-sgd", steps=5, expected_batch_size=2, dataset_size=5), TABLE, propose=False)
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match="empty.json holds no training records"):
        plan(TrainConfig(method="dp-sgd", steps=5, train_data=str(tmp_path / "empty.json")), TABLE, propose=False)
    p = plan(TrainConfig(method="non-private", steps=5, expected_batch_size=1000, train_limit=100), TABLE)
    assert p.sample_rate == 1.0 and p.n == 100


def test_infinite_epsilon_plans_no_noise():
    p = plan(TrainConfig(method="dp-sgd", epsilon=math.inf, steps=5), TABLE)
    assert p.noise_multiplier == 0.0 and p.proposal is None


def test_a_user_level_plan_counts_users_and_says_what_epsilon_protects(tmp_path):
    paths = make_photo_dataset(tmp_path, n_train=12, n_test=2)
    records = json.loads(open(paths["train"]).read())
    for i, record in enumerate(records):
        record["user_id"] = f"patient-{i // 3}"
    open(paths["train"], "w").write(json.dumps(records))
    p = plan(TrainConfig(method="dp-sgd", privacy_unit="user", user_records_per_step=2, epsilon=3.0, steps=5,
                         expected_batch_size=2, train_data=paths["train"]), TABLE, propose=False)
    assert (p.n, p.unit, p.sample_rate) == (4, "user", 0.5)
    assert p.unit_sentence == "ε = 3 protects all records of one user (every image of one person), at most 2 of " \
                              "them used per step"


def test_a_missing_calibration_is_empty_but_a_broken_one_is_an_error_naming_it(tmp_path):
    assert load_calibration(tmp_path / "absent.json") == dict(cells=[], runs=0)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json.*not valid JSON"):
        load_calibration(broken)
    broken.write_text(json.dumps({"runs": 3}))
    with pytest.raises(ValueError, match="no list of 'cells'"):
        load_calibration(broken)


def test_the_plan_claims_no_protection_at_infinite_epsilon_and_no_calibration_for_zeroth_order():
    """ε = ∞ protects no one (it said 'ε = ∞ protects one record'); the table measured gradient-noise runs, so a
    DP-ZO plan gets no verdict from it (it said such runs 'learned')."""
    assert plan(TrainConfig(method="dp-sgd", epsilon=math.inf, steps=5), TABLE).unit_sentence.startswith("nothing")
    zo = plan(TrainConfig(method="dp-zo", epsilon=3.0, steps=30), TABLE)
    assert "no calibration for dp-zo" in zo.verdict and "learned" not in zo.verdict and zo.evidence["runs"] == 0
    assert "learned" in plan(TrainConfig(method="dp-sgd", epsilon=math.inf, steps=30), TABLE).verdict

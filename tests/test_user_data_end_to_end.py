"""Your data in, your model out, through the command line: a LLaVA-JSON set of real photographs with free-text
answers, Dual-Priv at ε = 3, beating the majority class on held-out photos; export, reload, the same predictions,
and a model card holding the run's numbers."""
import collections
import json

import pytest

from toolkit.cli import main
from toolkit.samples import make_photo_dataset
from toolkit.userdata import IMAGE_UNIT

# Measured on a 2-core CPU under load (seeds 0-3 of the model init, fresh DP noise each run): 74-83 % accuracy
# against a 50 % majority class, about 30 s. 1,000 records keep the noise per record low at q = 0.1.
RUN = ["--method", "dual-priv", "--epsilon", "3", "--warm-start-steps", "0", "--steps", "30",
       "--expected-batch-size", "100", "--keep-tokens", "8", "--progress", "false"]


@pytest.mark.slow
def test_dual_priv_on_your_photos_beats_the_majority_class_and_the_export_predicts_the_same(tmp_path, monkeypatch):
    monkeypatch.setenv("DUALPRIV_CACHE", str(tmp_path / "cache"))
    data = make_photo_dataset(tmp_path / "photos", n_train=1000, n_test=100, which="photo", seed=0)
    answers = [r["conversations"][1]["value"] for r in json.loads(open(data["test"]).read())]
    assert set(answers) == {"temple", "flower"}                       # free text, not digit words
    majority = max(collections.Counter(answers).values()) / len(answers)

    run_json, model = tmp_path / "run.json", tmp_path / "model"
    assert main(["train", *RUN, "--train-data", data["train"], "--eval-data", data["test"],
                 "--image-folder", data["image_folder"], "--output-dir", str(model), "--json", str(run_json)]) == 0
    run = json.loads(run_json.read_text())
    assert run["eval_mode"] == "closed-set" and run["n_candidates"] == 2 and run["eval_records"] == 100
    assert run["privacy_unit"] == IMAGE_UNIT and run["n_records"] == 1000 and 0 < run["epsilon_spent"] <= 3.0
    assert run["accuracy"] >= majority + 0.1, (run["accuracy"], majority)

    predictions_json = tmp_path / "predictions.json"
    assert main(["predict", "--model", str(model), "--data", data["test"], "--image-folder", data["image_folder"],
                 "--json", str(predictions_json)]) == 0
    predicted = json.loads(predictions_json.read_text())
    assert [p["prediction"] for p in predicted["predictions"]] == [p["prediction"] for p in run["eval_predictions"]]
    assert predicted["accuracy"] == pytest.approx(run["accuracy"])
    assert set(predicted["predictions"][0]) == {"id", "question", "prediction", "answer", "correct"}

    card = (model / "README.md").read_text()
    for number in (f"ε = {run['epsilon_spent']:.4g}", f"σ | {run['noise_multiplier']:.4g}",
                   f"q = {run['sample_rate']:.4g}", "| steps | 30 |", "| N (records, declared) | 1000 |",
                   IMAGE_UNIT, f"accuracy {run['accuracy']:.4g}", "8 of 64"):
        assert number in card, number

"""Bad input to ``train`` / ``predict`` is one clear line and exit status 2, found before any training, with
nothing half-written; a YAML/JSON config file is read, and explicit flags override it."""
import json

import pytest
from PIL import Image

import toolkit.cli.train as train_cli
from toolkit.cli import build_parser, main
from toolkit.models import build_model
from toolkit.samples import make_photo_dataset

FAST = ["--method", "dual-priv", "--steps", "1", "--warm-start-steps", "0", "--expected-batch-size", "4",
        "--progress", "false"]


@pytest.fixture
def no_training(monkeypatch):
    """Training must not start: these inputs are refused before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("training started although the input was bad")

    monkeypatch.setattr(train_cli, "train", refuse)


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("flag, message", [("--train-limit", "train_limit must be an integer >= 1, got 0"),
                                           ("--eval-limit", "eval_limit must be an integer >= 1, got 0")])
def test_a_zero_limit_is_refused(flag, message, tmp_path, capsys, no_training):
    out = tmp_path / "run.json"
    assert main(["train", *FAST, flag, "0", "--json", str(out)]) == 2
    assert message in _error(capsys) and not out.exists()


def test_a_model_folder_without_weights_is_refused_by_name(tmp_path, capsys):
    build_model("tiny").model.config.save_pretrained(tmp_path / "llava")
    assert main(["train", *FAST, "--model-dir", str(tmp_path / "llava")]) == 2
    assert "has a LLaVA config.json but no weights" in _error(capsys)


def test_an_unwritable_json_path_is_refused_before_training(tmp_path, capsys, no_training):
    (tmp_path / "file").write_text("x")
    assert main(["train", *FAST, "--json", str(tmp_path / "file" / "run.json")]) == 2
    assert "--json" in _error(capsys)


@pytest.mark.parametrize("setup, message", [("under-a-file", "cannot be written"),
                                            ("not-empty", "already exists and is not empty"),
                                            ("a-file", "is a file")])
def test_an_unusable_output_dir_is_refused_before_training(setup, message, tmp_path, capsys, no_training):
    (tmp_path / "file").write_text("x")
    target = {"under-a-file": tmp_path / "file" / "model", "a-file": tmp_path / "file",
              "not-empty": tmp_path / "used"}[setup]
    if setup == "not-empty":
        target.mkdir()
        (target / "old.txt").write_text("keep")
    assert main(["train", *FAST, "--output-dir", str(target)]) == 2
    assert message in _error(capsys)
    if setup == "not-empty":
        assert (target / "old.txt").read_text() == "keep"


def test_a_missing_checkpoint_is_refused_before_the_plan_line(tmp_path, capsys, no_training):
    """Was: the plan line, as if the run were starting, and only then the error."""
    assert main(["train", *FAST, "--resume-from", str(tmp_path / "nope.pt")]) == 2
    captured = capsys.readouterr()
    assert "plan:" not in captured.out and "nope.pt' does not exist" in captured.err


def test_a_data_file_pointing_outside_its_image_folder_is_refused(tmp_path, capsys, monkeypatch):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
    record = {"id": "r", "image": "../secret.png", "conversations": [
        {"from": "human", "value": "<image>\nq ?"}, {"from": "gpt", "value": "a"}]}
    (tmp_path / "train.json").write_text(json.dumps([record]))
    assert main(["train", *FAST, "--train-data", str(tmp_path / "train.json"),
                 "--image-folder", str(tmp_path / "images")]) == 2
    assert "must be relative to" in _error(capsys)


def test_a_config_file_is_read_and_explicit_flags_override_it(tmp_path):
    (tmp_path / "run.yaml").write_text("method: dp-sgd\nsteps: 7\nepsilon: inf\ntrain-data: data/train.json\n"
                                       "prune_at_eval: 'false'\n")
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "run.yaml"), "--steps", "2"])
    config = train_cli.config_from_args(args)
    assert (config.method, config.steps, config.epsilon, config.prune_at_eval) == ("dp-sgd", 2, float("inf"), False)
    assert config.train_data == str(tmp_path / "data" / "train.json")      # relative to the file's folder
    assert config.lr is None and config.expected_batch_size == 64           # untouched fields keep their defaults
    (tmp_path / "run.json").write_text(json.dumps({"method": "non-private", "lr": 0.01}))
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "run.json")])
    assert (train_cli.config_from_args(args).method, train_cli.config_from_args(args).lr) == ("non-private", 0.01)
    # a length given by flag replaces the file's other length (steps and epochs together are refused)
    (tmp_path / "epochs.yaml").write_text("epochs: 20\n")
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "epochs.yaml"), "--steps", "2"])
    assert (train_cli.config_from_args(args).steps, train_cli.config_from_args(args).epochs) == (2, None)
    args = build_parser().parse_args(["audit", "--epochs", "5"])       # over the audit's own default steps=200
    from toolkit.cli.audit import audit_config
    assert (audit_config(args).resolved().steps, audit_config(args).epochs) == (None, 5)
    args = build_parser().parse_args(["train", "--steps", "2", "--epochs", "3"])
    with pytest.raises(ValueError, match=r"give steps or epochs, not both \(steps=2, epochs=3\)"):
        train_cli.config_from_args(args).resolved()


@pytest.mark.parametrize("text, message", [("stpes: 3\n", "unknown field 'stpes'"), ("- 1\n", "must hold a mapping"),
                                           ("steps: [\n", "not valid YAML")])
def test_a_bad_config_file_is_named(text, message, tmp_path, capsys, no_training):
    (tmp_path / "run.yaml").write_text(text)
    assert main(["train", "--config", str(tmp_path / "run.yaml")]) == 2
    assert message in _error(capsys)


def test_predict_refuses_a_folder_that_is_not_an_export(tmp_path, capsys):
    paths = make_photo_dataset(tmp_path / "photos", n_train=2, n_test=2)
    (tmp_path / "model").mkdir()
    assert main(["predict", "--model", str(tmp_path / "model"), "--data", str(paths["test"])]) == 2
    assert "is not a toolkit export" in _error(capsys)


def test_predict_reads_the_data_before_it_loads_the_model(tmp_path, capsys):
    """An empty or missing data file is named before minutes of model loading, not after."""
    (tmp_path / "data.json").write_text("[]")
    assert main(["predict", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "data.json")]) == 2
    assert "holds no records" in _error(capsys)


@pytest.mark.parametrize("args, words", [
    (["plan", "--steps", "3", "--secure-mode", "maybe"], "argument --secure-mode: expected true/false, got 'maybe'"),
    (["plan", "--steps", "x"], "argument --steps: expected an integer, got 'x'"),
    (["plan", "--steps", "3", "--lr", "fast"], "argument --lr: expected a number, got 'fast'"),
    (["train", "--steps", "3", "--fusion-noise-std", "loud"], "expected a number, 'matched' or none, got 'loud'"),
    (["audit", "--canary-seed", "-1"], "--canary-seed must be an integer >= 0"),
    (["bench", "--in-process", "true"], "python -m toolkit bench: error: unrecognized arguments: true"),  # its name
    (["--bogus", "info"], "python -m toolkit: error: unrecognized arguments: --bogus"),   # the top level's
])
def test_a_bad_flag_value_is_one_line_naming_the_flag_and_what_it_takes(args, words, capsys, no_training):
    """Was: 'invalid _parse_bool value' (a private function's name), after 60 lines of usage."""
    assert main(args) == 2
    err = capsys.readouterr().err
    assert words in err and "_parse" not in err and "usage:" not in err and len(err.splitlines()) <= 2


def test_none_gives_a_number_setting_its_documented_default(capsys):
    """The help of --lr says 'None: the method's default'; `--lr none` is that, not a parse error."""
    assert main(["plan", "--method", "dp-sgd", "--steps", "3", "--lr", "none"]) == 0
    assert build_parser().parse_args(["train", "--lr", "none", "--steps", "3"]).lr is None


def test_an_evaluation_file_without_training_data_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """Was: it trained on the embedded task and scored that model on the user's file, without a word."""
    import toolkit.run_setup as run_setup
    from toolkit.train import TrainConfig, train

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data settings were checked")

    monkeypatch.setattr(run_setup, "model_stage", no_model)
    paths = make_photo_dataset(tmp_path, n_train=4, n_test=4)
    with pytest.raises(ValueError, match="eval_data .* is given without train_data: the run would train on the "
                                         "embedded 'parity' task"):
        train(TrainConfig(eval_data=paths["test"], image_folder=paths["image_folder"], steps=1, progress=False))


def test_a_plausible_python_api_mistake_is_named_not_an_attribute_error(tmp_path):
    """Was: AttributeError from deep inside (a dict for a config, a path for a result), a folder given as the
    checkpoint said it "does not exist", an adapter export loaded as a model said only "no config.json"."""
    from toolkit.checkpoint import load_checkpoint
    from toolkit.export import save_trained
    from toolkit.model_io import load_model
    from toolkit.train import train

    with pytest.raises(TypeError, match=r"train needs a TrainConfig, got dict \(TrainConfig.from_dict"):
        train({"method": "dp-sgd", "steps": 1})
    with pytest.raises(TypeError, match="save_trained needs the TrainResult that train returns, got str"):
        save_trained("model", tmp_path / "out")
    with pytest.raises(ValueError, match="is a folder: resume_from names the checkpoint file"):
        load_checkpoint(tmp_path)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"is a LoRA adapter, not a whole model: load it with toolkit.export.load_trained"):
        load_model(tmp_path / "adapter")


def test_training_and_scoring_on_one_embedded_split_is_warned_about():
    from fast_run import fast
    from toolkit.train import TrainConfig, train

    with pytest.warns(UserWarning, match="train_split and eval_split are both 'test': the accuracy is measured on "
                                         "the records the model trained on"):
        train(TrainConfig(method="non-private", **fast(steps=1, train_split="test", eval_split="test")))

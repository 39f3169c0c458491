"""Answers out: greedy generation through the toolkit's forward (KV cache, pruned tokens), the choice between
ranking a closed set and generating, and an exported model predicting what the trained one answered."""
import pytest
import torch

from fast_run import fast
from toolkit.data import Collator, make_vqa
from toolkit.evaluation import CLOSED_SET_MAX, choose_eval_mode, normalize_answer
from toolkit.forward import LlavaLM, generate_greedy
from toolkit.models import build_model
from toolkit.predict import Predictor, predict
from toolkit.train import TrainConfig, train

FAST = fast(method="dual-priv", epsilon=3.0, steps=2, train_limit=16)


def _naive_greedy(lm, features, prompt, steps):
    """Greedy decoding by re-running the whole sequence every step (no cache)."""
    ids = prompt.clone()
    for _ in range(steps):
        logits = lm(features, ids, torch.ones_like(ids))
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, prompt.shape[1]:].tolist()


def test_kv_cached_generation_equals_greedy_decoding_without_a_cache():
    bundle = build_model("tiny", seed=5)
    collator = Collator(bundle.tokenizer, 16, bundle.image_token_id, bundle.prompt_template)
    lm = LlavaLM(bundle).bind_collator(collator).eval()
    prompt = torch.tensor([collator.prompt_ids("which photo is this ?")] * 3)
    features = torch.randn(3, 16, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert generate_greedy(lm, features, prompt, 6, eos_token_id=None) == _naive_greedy(lm, features, prompt, 6)


def test_generation_stops_at_the_end_token_and_drops_it(tiny_bundle):
    bundle = tiny_bundle
    collator = Collator(bundle.tokenizer, 4, bundle.image_token_id, bundle.prompt_template)
    lm = LlavaLM(bundle).bind_collator(collator).eval()
    prompt = torch.tensor([collator.prompt_ids("what colour ?")])
    first = generate_greedy(lm, torch.zeros(1, 4, 64), prompt, 1, None)[0][0]
    assert generate_greedy(lm, torch.zeros(1, 4, 64), prompt, 5, eos_token_id=first) == [[]]
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_greedy(lm, torch.zeros(1, 4, 64), prompt, 0, None)


def test_auto_mode_ranks_a_small_closed_set_and_generates_free_text():
    assert choose_eval_mode("auto", ["temple", "flower"] * 3) == ("closed-set", ("flower", "temple"))
    many = [f"answer {i}" for i in range(CLOSED_SET_MAX + 1)] * 2
    assert choose_eval_mode("auto", many) == ("generate", ())
    assert choose_eval_mode("auto", ["a", "b", "c"]) == ("generate", ())          # each answer given once
    assert choose_eval_mode("auto", ["7"], candidates=tuple("0123456789"))[0] == "closed-set"   # a task's own set
    assert choose_eval_mode("generate", ["a", "a"]) == ("generate", ())
    assert choose_eval_mode("closed-set", ["x", "y", "z"]) == ("closed-set", ("x", "y", "z"))
    with pytest.raises(ValueError, match="unknown eval_mode"):
        choose_eval_mode("guess", ["a"])


def test_exact_match_ignores_case_punctuation_articles_and_spacing():
    assert normalize_answer("The  Temple.") == normalize_answer("temple") == "temple"
    assert normalize_answer("left-side") == "left side" != normalize_answer("right side")


@pytest.mark.parametrize("eval_mode", ["closed-set", "generate"])
def test_an_exported_model_predicts_what_the_trained_model_answered(tmp_path, eval_mode):
    result = train(TrainConfig(**dict(FAST, eval_mode=eval_mode, max_new_tokens=3)))
    assert result.summary()["eval_mode"] == eval_mode
    path = result.save(tmp_path / "model")
    eval_set = make_vqa("parity", "test", 32, limit=8)
    out = predict(path, eval_set)
    assert out["mode"] == eval_mode
    assert [row["prediction"] for row in out["predictions"]] == result.eval_answers.predictions
    assert out["accuracy"] == pytest.approx(result.accuracy)
    assert set(out["predictions"][0]) == {"id", "question", "prediction", "answer", "correct"}


def test_the_predictor_uses_the_pruned_visual_tokens_of_training(tmp_path):
    result = train(TrainConfig(**dict(FAST, keep_tokens=12)))
    predictor = Predictor.from_folder(result.save(tmp_path / "model"))
    assert predictor.pruner.n_out == 12 == result.visual_tokens
    assert predictor.pruner.describe() == {**result.summary()["pruner"], "fusion_noise_std": None}


def test_training_on_a_file_without_an_evaluation_file_evaluates_nothing(tmp_path, monkeypatch):
    import json

    from toolkit.samples import make_photo_dataset

    monkeypatch.setenv("DUALPRIV_CACHE", str(tmp_path / "cache"))
    paths = make_photo_dataset(tmp_path / "photos", n_train=16, n_test=4)
    result = train(TrainConfig(**dict(FAST, train_limit=None, eval_limit=None, train_data=paths["train"],
                                      output_dir=str(tmp_path / "model"))))
    summary = result.summary()
    assert result.accuracy is None and summary["eval_mode"].startswith("none") and result.eval_answers is None
    # records without an answer get a prediction and no score; the mode is then chosen from the data
    records = json.loads(open(paths["test"]).read())
    for r in records:
        r["conversations"] = r["conversations"][:1]
    (tmp_path / "ask.json").write_text(json.dumps(records))
    out = predict(tmp_path / "model", tmp_path / "ask.json", image_folder=paths["image_folder"], mode="generate")
    assert out["accuracy"] is None and out["mode"] == "generate"
    assert all(set(row) == {"id", "question", "prediction"} for row in out["predictions"])

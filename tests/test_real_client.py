"""A model trained here answers the same everywhere: every method's export, in both formats, loaded by a client that
imports only transformers, peft, PIL and torch (Hub offline), answers a held-out set with stock ``generate`` on the
chat-template prompt exactly as ``toolkit predict`` does, on the embedded preset and on a tiny Hugging Face LLaVA
whose processor differs from the defaults (short-side resize + centre crop, non-CLIP mean/std, photos of several
shapes)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from hf_llava import build_hf_llava, odd_photos
from toolkit.export import EXPORT_FILE, save_trained
from toolkit.predict import predict
from toolkit.train import TrainConfig, train

METHODS = ("non-private", "dp-sgd", "dual-priv", "dp-zo")
CLIENT = Path(__file__).with_name("real_client.py")


def photo_set(folder: Path, n_train: int = 16, n_test: int = 12) -> dict:
    """A LLaVA-JSON set of photos of several shapes and modes (temple / flower crops)."""
    (folder / "images").mkdir(parents=True)
    photos = odd_photos(n_train + n_test, seed=1)
    paths = {"image_folder": str(folder)}
    for split, chunk in (("train", photos[:n_train]), ("test", photos[n_train:])):
        records = []
        for i, photo in enumerate(chunk):
            name = f"images/{split}-{i}.png"
            photo.save(folder / name)
            records.append({"id": f"{split}-{i}", "image": name, "conversations": [
                {"from": "human", "value": "<image>\nwhich photo is this ?"},
                {"from": "gpt", "value": ("temple", "flower")[(i + (split == "test")) % 2]}]})
        (folder / f"{split}.json").write_text(json.dumps(records))
        paths[split] = str(folder / f"{split}.json")
    return paths


def client_ways(meta: dict) -> list[str]:
    """How a practitioner loads this export (each is asserted to agree)."""
    if meta["inference"] == "remote-code":
        return ["remote"] if meta["export_format"] == "merged" else ["remote-adapter"]
    return ["merged", "auto"] if meta["export_format"] == "merged" else ["adapter", "auto-peft"]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny", "hf-llava"])
def test_every_method_and_format_answers_the_same_in_plain_transformers(tmp_path, model):
    data = photo_set(tmp_path / "photos")
    extra = dict(model_dir=str(build_hf_llava(tmp_path / "llava"))) if model == "hf-llava" else dict(preset="tiny")
    jobs, expected = [], []
    for method in METHODS:
        budget = dict(keep_tokens=4) if (method == "dual-priv" and model == "hf-llava") else {}
        result = train(TrainConfig(method=method, steps=2, warm_start_steps=0, expected_batch_size=8, lr=1e-2,
                                   epsilon=8.0, progress=False, feature_cache=False, max_new_tokens=4,
                                   train_data=data["train"], eval_data=data["test"],
                                   image_folder=data["image_folder"], **extra, **budget))
        for fmt in ("merged", "adapter"):
            if method == "dual-priv" and fmt == "adapter" and model == "hf-llava":
                continue  # a referenced base carries no remote code: the merged format does (stated in the card)
            out = save_trained(result, tmp_path / f"{method}-{fmt}", fmt)
            meta = json.loads((out / EXPORT_FILE).read_text())
            assert meta["inference"] == ("remote-code" if method == "dual-priv" else "stock")
            ours = [p["prediction"] for p in predict(out, data["test"], image_folder=data["image_folder"],
                                                     mode="generate")["predictions"]]
            for how in client_ways(meta):
                jobs.append(dict(out=str(out), data=data["test"], image_folder=data["image_folder"], how=how,
                                 max_new_tokens=4))
                expected.append((f"{method}/{fmt}/{how}", ours))
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([sys.executable, str(CLIENT), str(tmp_path / "jobs.json"), str(tmp_path / "answers.json")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    answers = json.loads((tmp_path / "answers.json").read_text())
    assert answers["toolkit_modules"] == []
    agreement = {}
    for (name, ours), theirs in zip(expected, answers["results"]):
        agreement[name] = sum(a == b for a, b in zip(ours, theirs["answers"])) / len(ours)
    print(json.dumps(agreement, indent=1))
    assert all(value >= 0.99 for value in agreement.values()), agreement

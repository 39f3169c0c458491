"""The privacy unit holds for pictures, not files (issue 20): the same pixels re-encoded under two training ids are
refused naming both, a JPEG re-save (near duplicate) is warned about naming both, and an evaluation picture that is
also a training picture is reported. Each test was checked to fail when its claim is broken in the code."""
from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from toolkit.data import DataValidationError
from toolkit.image_duplicates import NearDuplicateWarning, near_pairs, perceptual_hash, report_overlap
from toolkit.userdata import load_llava_json

TURNS = [{"from": "human", "value": "<image>\nwhat is it ?"}, {"from": "gpt", "value": "a"}]


def picture(seed: int) -> Image.Image:
    """A smooth random picture (upsampled 8x8 noise): a perceptual hash sees its structure."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((64, 64), Image.BICUBIC)


def write_set(folder, name: str, files: dict) -> str:
    for file, save in files.items():
        save(folder / file)
    records = [dict(id=file.split(".")[0], image=file, conversations=TURNS) for file in files]
    (folder / name).write_text(json.dumps(records))
    return str(folder / name)


def png_with_metadata(img: Image.Image):
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "re-saved")
    return lambda path: img.save(path, pnginfo=info, compress_level=1)


def jpeg_resave(img: Image.Image):
    def save(path):
        first = io.BytesIO()
        img.save(first, format="JPEG", quality=95)
        Image.open(first).save(path, format="JPEG", quality=75)
    return save


def test_the_same_pixels_re_encoded_under_two_ids_are_refused_naming_both(tmp_path):
    img = picture(0)
    path = write_set(tmp_path, "train.json", {"a.png": img.save, "b.png": png_with_metadata(img),
                                              "c.png": picture(1).save})
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "b.png").read_bytes()
    with pytest.raises(DataValidationError, match="records 'a' and 'b' have the same picture"):
        load_llava_json(path)
    refused = []
    kept = load_llava_json(path, refused=refused)
    assert [r.id for r in kept.records] == ["a", "c"] and [r["id"] for r in refused] == ["b"]
    assert len(load_llava_json(path, privacy_unit=False).records) == 3  # an evaluation set may repeat a picture


def test_a_jpeg_re_save_is_warned_about_as_a_near_duplicate_naming_both(tmp_path):
    img = picture(0)
    path = write_set(tmp_path, "train.json", {"a.jpg": lambda p: img.save(p, quality=95), "b.jpg": jpeg_resave(img),
                                              "c.jpg": lambda p: picture(1).save(p, quality=95)})
    with pytest.warns(NearDuplicateWarning, match="1 pair.* nearly the same picture.*records 'a' and 'b'") as caught:
        assert len(load_llava_json(path).records) == 3
    assert not any("'c'" in str(w.message) for w in caught)


def test_unrelated_pictures_are_not_near_duplicates():
    hashes = [perceptual_hash_of(picture(seed)) for seed in range(40)]
    assert near_pairs(hashes) == []


def perceptual_hash_of(img: Image.Image) -> int:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    buffer.seek(0)
    return perceptual_hash(buffer)


def test_an_evaluation_picture_that_is_a_training_picture_is_reported(tmp_path):
    img, other = picture(0), picture(1)
    train = load_llava_json(write_set(tmp_path, "train.json", {"a.png": img.save, "c.png": other.save}))
    (tmp_path / "eval").mkdir()
    evaluation = load_llava_json(write_set(tmp_path / "eval", "eval.json", {
        "x.png": png_with_metadata(img), "y.jpg": jpeg_resave(other), "z.png": picture(2).save}),
        privacy_unit=False)
    with pytest.warns(NearDuplicateWarning, match="evaluation record 'x' shows the same picture as training "
                                                  "record 'a'"):
        found = report_overlap(train.records, evaluation.records)
    assert found == [("x", "a", "exact"), ("y", "c", "near")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert report_overlap(train.records[:1], evaluation.records[2:]) == []

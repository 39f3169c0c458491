"""A small LLaVA-JSON data set of real photographs, made on the spot: the user-data path without your data.

scikit-learn ships two real 427x640 photographs (a Chinese temple, a flower). :func:`make_photo_dataset`
cuts random crops of them (several sizes, colour modes RGB / L / RGBA, PNG and JPEG files) and writes
``train.json`` and ``test.json`` in the LLaVA conversation format, one record per crop (every crop is its own
image: the privacy unit holds), with free-text answers:

* ``which="photo"``: "which photo is this ?" -> ``temple`` or ``flower``;
* ``which="side"``: "which side of the photo is this ?" -> ``left side`` or ``right side`` (of either photo).

Crops are drawn anywhere in the photo; no two records share a crop (train and test crops may overlap in
pixels, as two photographs of the same scene would, but are different images).

Example::

    >>> import tempfile
    >>> from toolkit.samples import make_photo_dataset
    >>> paths = make_photo_dataset(tempfile.mkdtemp(), n_train=8, n_test=4)
    >>> sorted(paths)
    ['image_folder', 'test', 'train']
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images

QUESTIONS = {"photo": "which photo is this ?", "side": "which side of the photo is this ?"}
PHOTO_NAMES = ("temple", "flower")   # sklearn's china.jpg and flower.jpg
MODES = ("RGB", "L", "RGBA")
FORMATS = ("png", "jpg")


def sample_photos() -> list[np.ndarray]:
    """scikit-learn's two bundled photographs, ``[427, 640, 3]`` uint8 each (temple, flower)."""
    return [np.asarray(image) for image in load_sample_images().images]


def _crop(photo: np.ndarray, rng: np.random.Generator, side: str | None) -> tuple[np.ndarray, tuple]:
    height, width = photo.shape[:2]
    size = int(rng.integers(48, 161))
    rows = (0, height - size)
    if side is None:
        cols = (0, width - size)
    else:  # the crop lies entirely in the named half
        cols = (0, width // 2 - size) if side == "left" else (width // 2, width - size)
    top = int(rng.integers(rows[0], max(rows[0], rows[1]) + 1))
    left = int(rng.integers(cols[0], max(cols[0], cols[1]) + 1))
    return photo[top:top + size, left:left + size], (top, left, size)


def _save(array: np.ndarray, folder: Path, name: str, mode: str, fmt: str) -> str:
    image = Image.fromarray(array, mode="RGB").convert(mode)
    if fmt == "jpg" and mode == "RGBA":
        fmt = "png"  # JPEG has no alpha channel
    filename = f"{name}.{fmt}"
    image.save(folder / filename, quality=92) if fmt == "jpg" else image.save(folder / filename)
    return filename


def make_photo_dataset(folder: str | os.PathLike, n_train: int = 120, n_test: int = 40, which: str = "photo",
                       seed: int = 0) -> dict:
    """Write ``images/`` + ``train.json`` + ``test.json`` under ``folder``; return their paths (``image_folder``
    is ``folder`` itself, the data files' default: their image paths read ``images/<name>``).

    Args:
        n_train, n_test: records per split (balanced between the answers).
        which: ``"photo"`` (temple / flower) or ``"side"`` (left side / right side).
        seed: the crops' positions, sizes, colour modes and file formats.
    """
    if which not in QUESTIONS:
        raise ValueError(f"unknown which {which!r}; choose one of {sorted(QUESTIONS)}")
    folder = Path(folder)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    photos = sample_photos()
    rng = np.random.default_rng(seed)
    paths = {"image_folder": str(folder)}   # image paths in the files are relative to it: images/...
    used = set()  # no two records may share an image (the privacy unit): never cut the same crop twice
    for split, count in (("train", n_train), ("test", n_test)):
        records = []
        for i in range(count):
            label = i % 2
            if which == "photo":
                photo, side, answer = photos[label], None, PHOTO_NAMES[label]
            else:
                photo = photos[int(rng.integers(0, 2))]
                side = ("left", "right")[label]
                answer = f"{side} side"
            crop, where = _crop(photo, rng, side)
            while (id(photo), where) in used:
                crop, where = _crop(photo, rng, side)
            used.add((id(photo), where))
            mode, fmt = MODES[int(rng.integers(0, len(MODES)))], FORMATS[int(rng.integers(0, len(FORMATS)))]
            filename = _save(crop, images, f"{split}-{i:04d}", mode, fmt)
            records.append({"id": f"{split}-{i:04d}", "image": f"images/{filename}", "conversations": [
                {"from": "human", "value": f"<image>\n{QUESTIONS[which]}"}, {"from": "gpt", "value": answer}]})
        path = folder / f"{split}.json"
        path.write_text(json.dumps(records, indent=1))
        paths[split] = str(path)
    return paths

"""Embedded offline VQA sets, the LLaVA-JSON loader with validation, and the collator.

The embedded data are scikit-learn's 1,797 real handwritten digits (8x8) placed on a larger canvas, so most
patches are background and token pruning has real work. Splits are disjoint by *source image*
(public 0-699, validation 700-799, private 800-1499, test 1500-1796), and every record of a split uses its
source images exactly once: one record per source image, so a per-record DP guarantee is a per-image one.

Example::

    >>> from toolkit.data import make_vqa
    >>> ds = make_vqa("parity", "private", image_size=32)
    >>> len(ds), ds.candidates
    (700, ('even', 'odd'))
    >>> ds[0].question
    'is the digit even or odd ?'
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SPLITS = {"public": (0, 700), "validation": (700, 800), "private": (800, 1500), "test": (1500, 1797)}

TASKS = {
    # name: (question, images per record, answer function of the source digits, candidate answers)
    "digit": ("what digit is this ?", 1, lambda d: str(d[0]), tuple(str(i) for i in range(10))),
    "parity": ("is the digit even or odd ?", 1, lambda d: "even" if d[0] % 2 == 0 else "odd", ("even", "odd")),
    "left-digit": ("what is the left digit ?", 2, lambda d: str(d[0]), tuple(str(i) for i in range(10))),
    "right-digit": ("what is the right digit ?", 2, lambda d: str(d[1]), tuple(str(i) for i in range(10))),
    "sum": ("what is the sum of the two digits ?", 2, lambda d: str(d[0] + d[1]), tuple(str(i) for i in range(19))),
}


class DataValidationError(ValueError):
    """A record of a user data set is malformed; the message names the record and the problem."""


@dataclass
class VQARecord:
    """One training record: an image, a question about it, the answer, and the source images it was made from."""

    id: str
    image: Image.Image
    question: str
    answer: str
    source_ids: tuple = ()


class VQADataset(torch.utils.data.Dataset):
    """A list of :class:`VQARecord` with the closed set of candidate answers (used to rank at evaluation)."""

    def __init__(self, records: list[VQARecord], candidates: tuple[str, ...] | None = None, name: str = "vqa"):
        self.records = list(records)
        self.candidates = tuple(candidates) if candidates else tuple(sorted({r.answer for r in self.records}))
        self.name = name

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> VQARecord:
        return self.records[index]

    def subset(self, n: int) -> "VQADataset":
        return VQADataset(self.records[:n], self.candidates, self.name)


def _digits():
    """The 1,797 scikit-learn digit glyphs (8x8, values 0..16) and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target


def render_digits(glyphs: list[np.ndarray], image_size: int, rng: np.random.Generator) -> Image.Image:
    """Place 8x8 digit glyphs (values 0..16) on a black RGB canvas, side by side, each at a random offset.

    A single digit is scaled to half the canvas side (3/4 of the patches stay background); two digits each
    get half the width.
    """
    canvas = np.zeros((image_size, image_size), dtype=np.float32)
    slot_w = image_size // len(glyphs)
    side = image_size // 2
    for slot, glyph in enumerate(glyphs):
        scaled = np.kron(glyph / 16.0, np.ones((side // 8, side // 8), dtype=np.float32))
        h, w = scaled.shape
        top = int(rng.integers(0, image_size - h + 1))
        left = slot * slot_w + int(rng.integers(0, max(slot_w - w, 0) + 1))
        canvas[top:top + h, left:left + w] = np.maximum(canvas[top:top + h, left:left + w], scaled[:, : image_size - left])
    rgb = (np.stack([canvas] * 3, axis=-1) * 255).astype(np.uint8)
    return Image.fromarray(rgb, mode="RGB")


def make_vqa(task: str = "parity", split: str = "private", image_size: int = 32, limit: int | None = None,
             seed: int = 0) -> VQADataset:
    """Build an embedded VQA split from scikit-learn's digits.

    Args:
        task: one of ``TASKS`` (``digit``, ``parity``, ``left-digit``, ``right-digit``, ``sum``).
        split: one of ``SPLITS``; splits never share a source image.
        image_size: canvas side in pixels (the model's ``image_size``).
        limit: keep only the first ``limit`` records.
        seed: placement of the digits on the canvas.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLITS)}")
    if image_size < 16 or image_size % 16:
        raise ValueError(f"image_size must be a positive multiple of 16, got {image_size}")
    question, n_images, answer_of, candidates = TASKS[task]
    images, targets = _digits()
    start, stop = SPLITS[split]
    sources = list(range(start, stop))
    groups = [tuple(sources[i:i + n_images]) for i in range(0, len(sources) - n_images + 1, n_images)]
    if limit is not None:
        groups = groups[:limit]
    records = []
    for group in groups:
        rng = np.random.default_rng([seed, *group])
        image = render_digits([images[i] for i in group], image_size, rng)
        answer = answer_of([int(targets[i]) for i in group])
        records.append(VQARecord(f"{task}-{split}-{'-'.join(map(str, group))}", image, question, answer, group))
    return VQADataset(records, candidates, name=f"{task}/{split}")


def dataset_sizes() -> dict:
    """Records per task and split of the embedded data (for ``python -m toolkit info``)."""
    return {task: {split: (b - a) // spec[1] for split, (a, b) in SPLITS.items()} for task, spec in TASKS.items()}


# ---------------------------------------------------------------- LLaVA conversation format

def _fail(record_id, problem: str):
    raise DataValidationError(f"record {record_id}: {problem}")


def load_llava_json(path: str | os.PathLike, image_folder: str | os.PathLike | None = None,
                    candidates: tuple[str, ...] | None = None) -> VQADataset:
    """Load a LLaVA conversation file (JSON list or JSONL) with its image folder, validating every record.

    Each record must look like ``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."},
    {"from": "gpt", "value": "..."}]}``. The first human/gpt pair is used. Nothing is dropped silently: the first
    bad record raises :class:`DataValidationError` naming it (by id, or by position when the id is unusable).
    """
    path = Path(path)
    if not path.is_file():
        raise DataValidationError(f"data file {str(path)!r} does not exist")
    folder = Path(image_folder) if image_folder is not None else path.parent
    if not folder.is_dir():
        raise DataValidationError(f"image folder {str(folder)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            raw = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataValidationError(f"{str(path)!r} is not valid JSON: {err}") from err
    if not isinstance(raw, list):
        raise DataValidationError(f"{str(path)!r} must hold a list of records, found {type(raw).__name__}")
    records, seen = [], set()
    for position, item in enumerate(raw):
        where = f"#{position}"
        if not isinstance(item, dict):
            _fail(where, f"must be an object, found {type(item).__name__}")
        rid = item.get("id")
        if not isinstance(rid, (str, int)) or isinstance(rid, bool) or str(rid) == "":
            _fail(where, "'id' is missing or not a string/integer")
        rid = str(rid)
        where = f"{rid!r} (#{position})"
        if rid in seen:
            _fail(where, "duplicate id")
        seen.add(rid)
        image_name = item.get("image")
        if not isinstance(image_name, str) or not image_name:
            _fail(where, "'image' is missing or not a string")
        image_path = (folder / image_name).resolve()
        if not image_path.is_file():
            _fail(where, f"image {image_name!r} not found in {str(folder)!r}")
        try:
            with Image.open(image_path) as img:
                image = img.convert("RGB")
        except Exception as err:  # PIL raises many types for unreadable files
            _fail(where, f"image {image_name!r} is unreadable ({err.__class__.__name__}: {err})")
        turns = item.get("conversations")
        if not isinstance(turns, list) or len(turns) < 2:
            _fail(where, "'conversations' must be a list of at least two turns")
        for t, turn in enumerate(turns):
            if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"), str):
                _fail(where, f"turn {t} must be an object with string 'from' and 'value'")
        human, gpt = turns[0], turns[1]
        if human["from"] != "human" or gpt["from"] != "gpt":
            _fail(where, f"the first two turns must be from 'human' then 'gpt', found {human['from']!r}, {gpt['from']!r}")
        if human["value"].count("<image>") != 1:
            _fail(where, "the human turn must contain exactly one '<image>' tag")
        question = human["value"].replace("<image>", "").strip()
        if not question:
            _fail(where, "the question is empty")
        answer = gpt["value"].strip()
        if not answer:
            _fail(where, "the answer is empty")
        records.append(VQARecord(rid, image, question, answer, (image_name,)))
    if not records:
        raise DataValidationError(f"{str(path)!r} holds no records")
    return VQADataset(records, candidates, name=path.stem)


# ---------------------------------------------------------------- tensors for the model

def preprocess_images(images: list[Image.Image], image_size: int, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> torch.Tensor:
    """Resize (bicubic) and normalise RGB images to the tower's input: ``[B, 3, image_size, image_size]``."""
    arrays = []
    for image in images:
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL image, got {type(image).__name__}")
        image = image.convert("RGB")
        if image.size != (image_size, image_size):
            image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(image, dtype=np.float32) / 255.0)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


class Collator:
    """Build ``input_ids``, ``attention_mask`` and ``labels`` (loss on the answer only) for a batch of records.

    The image block is ``n_visual_tokens`` placeholders at the same position in every row (right padding),
    which is what lets the toolkit's forward place visual features without a data-dependent scatter.
    ``n_visual_tokens`` must equal the number of visual tokens the model will actually feed the LLM
    (it shrinks with token pruning); :func:`toolkit.forward.LlavaLM.forward` checks it.
    """

    def __init__(self, tokenizer, n_visual_tokens: int, image_token_id: int, prompt_template: str):
        if n_visual_tokens < 1:
            raise ValueError(f"n_visual_tokens must be >= 1, got {n_visual_tokens}")
        if prompt_template.count("<image>") != 1 or "{question}" not in prompt_template:
            raise ValueError("prompt_template must contain exactly one '<image>' and a '{question}' field")
        self.tokenizer = tokenizer
        self.n_visual_tokens = n_visual_tokens
        self.image_token_id = image_token_id
        self.prefix, self.suffix = prompt_template.split("<image>")
        self.prefix_ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.prefix_ids += self._encode(self.prefix)
        self.image_start = len(self.prefix_ids)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text.strip() else []

    def prompt_ids(self, question: str) -> list[int]:
        return (self.prefix_ids + [self.image_token_id] * self.n_visual_tokens
                + self._encode(self.suffix.format(question=question)))

    def answer_ids(self, answer: str) -> list[int]:
        ids = self._encode(" " + answer)
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    def __call__(self, records: list[VQARecord]) -> dict:
        rows, label_rows, prompt_lengths = [], [], []
        for record in records:
            prompt = self.prompt_ids(record.question)
            answer = self.answer_ids(record.answer)
            rows.append(prompt + answer)
            label_rows.append([-100] * len(prompt) + answer)
            prompt_lengths.append(len(prompt))
        width = max((len(r) for r in rows), default=0)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row, lab) in enumerate(zip(rows, label_rows)):
            input_ids[i, : len(row)] = torch.tensor(row)
            labels[i, : len(lab)] = torch.tensor(lab)
            attention_mask[i, : len(row)] = 1
        return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                    prompt_lengths=torch.tensor(prompt_lengths, dtype=torch.long))

"""Records and data sets, the embedded offline VQA tasks, image preprocessing, and the collator.

A user's LLaVA-JSON data set is read by :mod:`toolkit.userdata` into the same :class:`VQADataset`.

The embedded data are scikit-learn's 1,797 real handwritten digits (8x8) placed on a larger canvas, so most
patches are background and token pruning has real work. Splits are disjoint by *source image*
(public 0-699, validation 700-799, private 800-1499, test 1500-1796), and every record of a split uses its
source images exactly once: one record per source image, so a per-record DP guarantee is a per-image one.
The generated ``scene`` task has its own, larger layout (``SCENE_SPLITS``).

Example::

    >>> from toolkit.data import make_vqa
    >>> ds = make_vqa("parity", "private", image_size=32)
    >>> len(ds), ds.candidates
    (700, ('even', 'odd'))
    >>> ds[0].question
    'is the digit even or odd ?'
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits

from toolkit.vocabulary import PRIVACY_UNIT

SPLITS = {"public": (0, 700), "validation": (700, 800), "private": (800, 1500), "test": (1500, 1797)}

TASKS = {
    # name: (question, images per record, answer function of the source digits, candidate answers)
    "digit": ("what digit is this ?", 1, lambda d: str(d[0]), tuple(str(i) for i in range(10))),
    "parity": ("is the digit even or odd ?", 1, lambda d: "even" if d[0] % 2 == 0 else "odd", ("even", "odd")),
    "left-digit": ("what is the left digit ?", 2, lambda d: str(d[0]), tuple(str(i) for i in range(10))),
    "right-digit": ("what is the right digit ?", 2, lambda d: str(d[1]), tuple(str(i) for i in range(10))),
    "sum": ("what is the sum of the two digits ?", 2, lambda d: str(d[0] + d[1]), tuple(str(i) for i in range(19))),
}
# Generated scenes (issue 23): 2-4 coloured squares/disks on a 3x3 grid; one question per scene about colour at a
# position, count of a colour, or left/right relation. A "source image" is a scene index. Scenes are not bound to
# 1,797 glyphs, so the task has its own layout: 700 private scenes could not teach counting (benchmarks/RESULTS.md,
# fifth session), and 100 validation scenes gave a standard error of 5 points, too coarse to tune on. The public and
# validation splits start where the digits' do, so the public curriculum's scenes (and its warm start) are unchanged.
SCENE_SPLITS = {"public": (0, 700), "validation": (700, 1200), "test": (1200, 2200), "private": (10000, 20000)}
SCENE_COLOURS = {"red": (230, 30, 30), "green": (30, 200, 30), "blue": (40, 60, 240), "yellow": (240, 230, 40)}
SCENE_ROWS, SCENE_COLUMNS = ("top", "middle", "bottom"), ("left", "center", "right")
TASKS["scene"] = ("what colour is the shape at the top left ?", 1, None,
                  tuple(SCENE_COLOURS) + tuple(str(i) for i in range(5)) + ("yes", "no"))


class DataValidationError(ValueError):
    """A record of a user data set is malformed; the message names the record and the problem."""


@dataclass
class VQARecord:
    """One training record: an image, a question about it, the answer, and the source images it was made from.

    ``image`` is a decoded picture (the embedded tasks) or ``None`` with ``image_path`` set (a user data set):
    a user's images are read only when their visual tokens are computed (:meth:`load_image`), never all at once.
    ``history`` holds the earlier (question, answer) turns of a multi-turn conversation (the image belongs to
    the first question); ``question`` / ``answer`` are the last turn. ``answer`` is ``None`` when unknown
    (prediction). ``image_sha256`` (the file's content hash) keys the feature cache; ``user_id`` is optional.
    """

    id: str
    image: Image.Image | None
    question: str
    answer: str | None
    source_ids: tuple = ()
    image_path: str | None = None
    image_sha256: str | None = None
    history: tuple = ()
    user_id: str | None = None

    def load_image(self) -> Image.Image:
        """The record's picture as RGB (read from ``image_path`` if it is not in memory)."""
        if self.image is not None:
            return self.image
        try:
            with Image.open(self.image_path) as img:
                return img.convert("RGB")
        except Exception as err:  # PIL raises many types for truncated or odd files
            raise DataValidationError(f"record {self.id!r}: image {Path(self.image_path).name!r} could not be "
                                      f"decoded ({err.__class__.__name__}: {err})") from None

    @property
    def turns(self) -> tuple:
        """Every (question, answer) turn, the last one included."""
        return tuple(self.history) + ((self.question, self.answer),)


class VQADataset(torch.utils.data.Dataset):
    """A list of :class:`VQARecord` with the closed set of candidate answers (used to rank at evaluation)."""

    def __init__(self, records: list[VQARecord], candidates: tuple[str, ...] | None = None, name: str = "vqa",
                 privacy_unit: str = PRIVACY_UNIT):
        self.records = list(records)
        # declared: a public answer set (an embedded task's); otherwise derived from the records' own answers
        self.candidates_declared = bool(candidates)
        self.candidates = tuple(candidates) if candidates else tuple(
            sorted({r.answer for r in self.records if r.answer is not None}))
        self.name = name
        self.privacy_unit = privacy_unit  # what one record stands for (what ε protects); see toolkit.userdata

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> VQARecord:
        return self.records[index]

    def subset(self, n: int) -> "VQADataset":
        return VQADataset(self.records[:n], self.candidates if self.candidates_declared else None, self.name,
                          self.privacy_unit)


def _digits():
    """The 1,797 scikit-learn digit glyphs (8x8, values 0..16) and their labels."""
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


def split_bounds(task: str, split: str) -> tuple[int, int]:
    """The source-image range ``[start, stop)`` of ``split`` for an embedded ``task`` (the scene task's own layout,
    ``SCENE_SPLITS``, or the digits' ``SPLITS``)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLITS)}")
    return (SCENE_SPLITS if task == "scene" else SPLITS)[split]


def make_vqa(task: str = "parity", split: str = "private", image_size: int = 32, limit: int | None = None,
             seed: int = 0) -> VQADataset:
    """Build an embedded VQA split from scikit-learn's digits (or, for ``scene``, generated scenes).

    Args:
        task: one of ``TASKS`` (``digit``, ``parity``, ``left-digit``, ``right-digit``, ``sum``, ``scene``).
        split: one of ``SPLITS`` (the names; :func:`split_bounds` gives a task's ranges); splits never share a
            source image.
        image_size: canvas side in pixels (the model's ``image_size``).
        limit: keep only the first ``limit`` records.
        seed: placement of the digits on the canvas.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    start, stop = split_bounds(task, split)
    if image_size < 16 or image_size % 16:
        raise ValueError(f"image_size must be a positive multiple of 16, got {image_size}")
    if task == "scene":
        return make_scenes(split, image_size, limit, seed)
    question, n_images, answer_of, candidates = TASKS[task]
    images, targets = _digits()
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


def render_scene(shapes: list[tuple[int, int, str, str]], image_size: int) -> Image.Image:
    """Draw ``(row, column, colour, kind)`` shapes (kind ``square`` or ``disk``) on a black canvas, one per cell
    of a 3x3 grid, each filling the middle 60 % of its cell (most patches stay background)."""
    canvas = np.zeros((image_size, image_size, 3), dtype=np.uint8)
    cell = image_size / 3
    side = max(2, int(0.6 * cell))
    yy, xx = np.mgrid[0:side, 0:side]
    disk = (yy - (side - 1) / 2) ** 2 + (xx - (side - 1) / 2) ** 2 <= (side / 2) ** 2
    for row, column, colour, kind in shapes:
        top, left = int(row * cell + (cell - side) / 2), int(column * cell + (cell - side) / 2)
        patch = canvas[top:top + side, left:left + side]
        patch[disk if kind == "disk" else np.ones_like(disk)] = SCENE_COLOURS[colour]
    return Image.fromarray(canvas, mode="RGB")


def _scene_question(shapes, rng: np.random.Generator) -> tuple[str, str]:
    """One question about the scene (kind drawn by ``rng``); a relation needs two shapes of unique colours in
    different columns, otherwise a count question is asked."""
    colours = [c for _, _, c, _ in shapes]
    kind = ("colour", "count", "relation")[int(rng.integers(3))]
    unique = [s for s in shapes if colours.count(s[2]) == 1]
    pairs = [(a, b) for a in unique for b in unique if a[1] != b[1]]
    if kind == "relation" and pairs:
        a, b = pairs[int(rng.integers(len(pairs)))]
        return f"is the {a[2]} shape left of the {b[2]} shape ?", "yes" if a[1] < b[1] else "no"
    if kind == "colour":
        row, column, colour, _ = shapes[int(rng.integers(len(shapes)))]
        return f"what colour is the shape at the {SCENE_ROWS[row]} {SCENE_COLUMNS[column]} ?", colour
    colour = list(SCENE_COLOURS)[int(rng.integers(len(SCENE_COLOURS)))]
    return f"how many {colour} shapes are there ?", str(colours.count(colour))


def _scene_shapes(rng: np.random.Generator) -> list[tuple[int, int, str, str]]:
    cells = rng.choice(9, size=int(rng.integers(2, 5)), replace=False)
    return [(int(c) // 3, int(c) % 3, list(SCENE_COLOURS)[int(rng.integers(4))], ("square", "disk")[int(rng.integers(2))])
            for c in sorted(cells)]


def make_scenes(split: str = "private", image_size: int = 96, limit: int | None = None, seed: int = 0) -> VQADataset:
    """The ``scene`` task: one generated scene and one question per record; scene ``i`` of ``SCENE_SPLITS[split]``
    is drawn from ``default_rng([seed, 7919, i])``, so splits never share a scene and ``public`` is a public split."""
    start, stop = split_bounds("scene", split)
    records = []
    for i in list(range(start, stop))[:limit]:
        rng = np.random.default_rng([seed, 7919, i])
        shapes = _scene_shapes(rng)
        question, answer = _scene_question(shapes, rng)
        records.append(VQARecord(f"scene-{split}-{i}", render_scene(shapes, image_size), question, answer, (i,)))
    return VQADataset(records, TASKS["scene"][3], name=f"scene/{split}")


def make_scene_colour_questions(split: str = "public", image_size: int = 96, limit: int | None = None,
                                seed: int = 0) -> tuple[VQADataset, torch.Tensor]:
    """The scene task's public curriculum (issue 23): the same scenes as :func:`make_scenes`, and for each one the
    colour question of every shape it holds (never a count or a relation: what the private task asks is left to
    the fine-tune). Also returns each record's scene as a 3x3 grid of cell labels ``[N, 9]`` (0 = empty, 1-4 =
    the colours in ``SCENE_COLOURS`` order): the warm start's auxiliary target for [CLS]."""
    start, stop = SPLITS[split]
    records, grids = [], []
    for i in list(range(start, stop))[:limit]:
        shapes = _scene_shapes(np.random.default_rng([seed, 7919, i]))
        image = render_scene(shapes, image_size)
        grid = [0] * 9
        for row, column, colour, _ in shapes:
            grid[3 * row + column] = 1 + list(SCENE_COLOURS).index(colour)
        for row, column, colour, _ in shapes:
            question = f"what colour is the shape at the {SCENE_ROWS[row]} {SCENE_COLUMNS[column]} ?"
            records.append(VQARecord(f"scene-colour-{split}-{i}-{row}{column}", image, question, colour, (i,)))
            grids.append(grid)
    return VQADataset(records, TASKS["scene"][3], name=f"scene-colour/{split}"), torch.tensor(grids)


def dataset_sizes() -> dict:
    """Records per task and split of the embedded data (for ``python -m toolkit info``)."""
    sizes = {}
    for task, (_, images_per_record, _, _) in TASKS.items():
        sizes[task] = {}
        for split in SPLITS:
            start, stop = split_bounds(task, split)
            sizes[task][split] = (stop - start) // images_per_record
    return sizes


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
    """Build ``input_ids``, ``attention_mask`` and ``labels`` (loss on the answers only) for a batch of records.

    The image block is ``n_visual_tokens`` placeholders at the same position in every row (right padding),
    which is what lets the toolkit's forward place visual features without a data-dependent scatter.
    ``n_visual_tokens`` must equal the number of visual tokens the model will actually feed the LLM
    (it shrinks with token pruning); :func:`toolkit.forward.LlavaLM.forward` checks it.

    A multi-turn record (``record.history``) is laid out turn after turn: the first question with the image,
    then each answer and the next question in the template without its image; every assistant answer is
    labelled (trained on), and ``prompt_lengths`` marks where the last answer starts (what evaluation and
    prediction score or generate). A record whose ``answer`` is ``None`` yields its prompt only.

    Example::

        >>> from toolkit.models import build_model
        >>> from toolkit.data import make_vqa
        >>> bundle = build_model("tiny")
        >>> collator = Collator(bundle.tokenizer, 16, bundle.image_token_id, bundle.prompt_template)
        >>> batch = collator(make_vqa("parity", "test", 32, limit=2).records)
        >>> batch["input_ids"].shape[0], int((batch["input_ids"][0] == bundle.image_token_id).sum())
        (2, 16)
    """

    def __init__(self, tokenizer, n_visual_tokens: int, image_token_id: int, prompt_template: str):
        if n_visual_tokens < 1:
            raise ValueError(f"n_visual_tokens must be >= 1, got {n_visual_tokens}")
        if prompt_template.count("<image>") != 1 or "{question}" not in prompt_template:
            raise ValueError("prompt_template must contain exactly one '<image>' and a '{question}' field")
        self.tokenizer = tokenizer
        self.n_visual_tokens = n_visual_tokens
        self.image_token_id = image_token_id
        self.prompt_template = prompt_template
        self.prefix, self.suffix = prompt_template.split("<image>")
        # Later turns use the template without its image (and the whitespace that followed the image).
        self.turn_template = re.sub(r"<image>\s*", "", prompt_template)
        self.prefix_ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.prefix_ids += self._encode(self.prefix)
        self.image_start = len(self.prefix_ids)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text.strip() else []

    def _context(self, question: str, history: tuple = ()) -> tuple[list[int], list[int]]:
        """Ids and labels of everything before the last answer: earlier answers are labelled, prompts are not."""
        first = history[0][0] if history else question
        ids = self.prefix_ids + [self.image_token_id] * self.n_visual_tokens + self._encode(
            self.suffix.format(question=first))
        labels = [-100] * len(ids)
        for turn, (_, answer) in enumerate(history):
            answer_ids = self.answer_ids(answer)
            following = history[turn + 1][0] if turn + 1 < len(history) else question
            prompt = self._encode(self.turn_template.format(question=following))
            ids += answer_ids + prompt
            labels += answer_ids + [-100] * len(prompt)
        return ids, labels

    def prompt_ids(self, question: str, history: tuple = ()) -> list[int]:
        """Token ids up to (not including) the answer of the last turn."""
        return self._context(question, history)[0]

    def answer_ids(self, answer: str) -> list[int]:
        ids = self._encode(" " + answer)
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    def __call__(self, records: list[VQARecord]) -> dict:
        rows, label_rows, prompt_lengths = [], [], []
        for record in records:
            ids, labels = self._context(record.question, tuple(record.history))
            prompt_lengths.append(len(ids))
            if record.answer is not None:
                answer = self.answer_ids(record.answer)
                ids, labels = ids + answer, labels + answer
            rows.append(ids)
            label_rows.append(labels)
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

"""The generated scene task (issue 23): every answer is what the picture shows (read back from the pixels), the
three question kinds all occur, splits never share a scene, the public split exists, and it runs on the
576-token preset's canvas through the collator."""
from __future__ import annotations

import numpy as np
import pytest

from toolkit.data import SCENE_COLOURS, SCENE_COLUMNS, SCENE_ROWS, TASKS, Collator, make_vqa


def read_cells(image, size: int) -> dict:
    """(row, column) -> colour name, from the pixel at each grid cell's centre (black = no shape)."""
    pixels = np.asarray(image)
    cells = {}
    for row in range(3):
        for column in range(3):
            rgb = tuple(int(v) for v in pixels[int((row + 0.5) * size / 3), int((column + 0.5) * size / 3)])
            if rgb != (0, 0, 0):
                cells[(row, column)] = next(name for name, value in SCENE_COLOURS.items() if value == rgb)
    return cells


def answer_from_pixels(question: str, cells: dict) -> str:
    words = question.split()
    if question.startswith("what colour"):
        return cells[(SCENE_ROWS.index(words[-3]), SCENE_COLUMNS.index(words[-2]))]
    if question.startswith("how many"):
        return str(sum(c == words[2] for c in cells.values()))
    first, second = words[2], words[7]
    column = {c: k[1] for k, c in cells.items()}
    return "yes" if column[first] < column[second] else "no"


@pytest.mark.parametrize("size", [32, 96])
def test_every_answer_is_what_the_picture_shows(size):
    ds = make_vqa("scene", "validation", image_size=size, limit=150)
    assert len(ds) == 150 and ds.candidates == TASKS["scene"][3]
    kinds = set()
    for record in ds:
        assert record.image.size == (size, size) and record.answer in ds.candidates
        assert answer_from_pixels(record.question, read_cells(record.image, size)) == record.answer, record.question
        kinds.add(record.question.split()[0])
    assert kinds == {"what", "how", "is"}


def test_splits_are_disjoint_deterministic_and_the_public_split_exists():
    ids = {split: {r.source_ids for r in make_vqa("scene", split, 32, limit=50)} for split in
           ("public", "validation", "private", "test")}
    assert all(len(v) == 50 for v in ids.values())
    assert not set.intersection(*ids.values())
    a, b = make_vqa("scene", "private", 32, limit=5), make_vqa("scene", "private", 32, limit=5)
    assert [(r.question, r.answer) for r in a] == [(r.question, r.answer) for r in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    assert len(make_vqa("scene", "public", 32)) == 700


def test_the_scene_task_has_its_own_split_layout_large_enough_to_tune_and_report_on():
    from toolkit.data import SCENE_SPLITS, SPLITS, dataset_sizes, split_bounds

    bounds = sorted(SCENE_SPLITS.values())
    assert all(stop <= next_start for (_, stop), (next_start, _) in zip(bounds, bounds[1:]))   # disjoint ranges
    sizes = dataset_sizes()
    assert sizes["scene"]["private"] >= 10000 and sizes["scene"]["validation"] >= 500 and sizes["scene"]["test"] >= 1000
    assert sizes["parity"] == {"public": 700, "validation": 100, "private": 700, "test": 297}   # the digits' own
    assert split_bounds("parity", "private") == SPLITS["private"] != split_bounds("scene", "private")
    ds = make_vqa("scene", "test", 32, limit=3)
    assert [r.source_ids[0] for r in ds] == list(range(SCENE_SPLITS["test"][0], SCENE_SPLITS["test"][0] + 3))
    # the public curriculum's warm start validates on the first 100 validation scenes: they did not move
    assert SCENE_SPLITS["public"] == (0, 700) and SCENE_SPLITS["validation"][0] == 700


def test_answers_are_not_one_class_and_the_collator_takes_them():
    from toolkit.models import build_tokenizer

    ds = make_vqa("scene", "private", 96, limit=200)
    counts = {a: sum(r.answer == a for r in ds) for a in ds.candidates}
    assert max(counts.values()) < 0.3 * len(ds)  # no answer dominates: a constant guess stays low
    tokenizer = build_tokenizer()
    collator = Collator(tokenizer, 64, tokenizer.convert_tokens_to_ids("<image>"), "user : <image> {question} assistant :")
    batch = collator(ds.records[:4])
    assert batch["input_ids"].shape[0] == 4 and (batch["labels"] != -100).any()


def test_the_public_curriculum_asks_every_shapes_colour_and_nothing_else():
    from toolkit.data import make_scene_colour_questions

    ds, grids = make_scene_colour_questions("public", 32, limit=40)
    assert len(ds) == len(grids) and len(ds) >= 80   # 2-4 shapes per scene
    assert {r.question.split()[0] for r in ds} == {"what"}
    for record, grid in zip(ds, grids.tolist()):
        cells = read_cells(record.image, 32)
        assert answer_from_pixels(record.question, cells) == record.answer
        assert grid == [1 + list(SCENE_COLOURS).index(cells[(k // 3, k % 3)]) if (k // 3, k % 3) in cells else 0
                        for k in range(9)]
    scenes = {r.source_ids for r in make_vqa("scene", "public", 32, limit=40)}
    assert {r.source_ids for r in ds} == scenes   # the same public scenes as the task's public split


def test_a_scene_run_starts_from_its_own_cached_warm_start_and_records_it(tmp_path, monkeypatch):
    import toolkit.warmstart as ws
    from toolkit.config import TrainConfig

    monkeypatch.setenv("DUALPRIV_CACHE", str(tmp_path))
    assert ws.run_curriculum(TrainConfig(task="scene")) == "scene-colour"
    assert ws.run_curriculum(TrainConfig(task="parity")) == "digit"
    assert ws.run_curriculum(TrainConfig(task="scene", train_data="x.json")) == "digit"
    bundle = ws.starting_model(preset="tiny", warm_start_steps=2, progress=False, curriculum="scene-colour")
    assert bundle.info["warm_start"]["task"] == "scene-colour"
    assert bundle.info["start"]["curriculum"] == "scene-colour"
    scene_path = ws.warm_start_path("tiny", 0, 2, curriculum="scene-colour")
    assert scene_path.is_dir() and scene_path != ws.warm_start_path("tiny", 0, 2)
    assert ws.start_model_id("tiny", None, 2, "scene-colour") == scene_path.name
    with pytest.raises(ValueError, match="unknown warm-start curriculum"):
        ws.warm_start_path("tiny", 0, 2, curriculum="sums")

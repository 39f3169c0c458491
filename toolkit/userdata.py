"""Your own data set: a LLaVA conversation file (JSON list or JSONL) and its image folder, validated.

Each record looks like::

    {"id": "r1", "image": "photos/r1.jpg", "user_id": "u7",            # user_id is optional
     "conversations": [{"from": "human", "value": "<image>\\nwhich photo is this ?"},
                       {"from": "gpt", "value": "temple"}]}

What is checked, each failure a :class:`~toolkit.data.DataValidationError` naming the record and the problem
(nothing is dropped silently):

* the file parses, holds a list of objects with a unique ``id`` each;
* ``image`` is a path *relative to the image folder that stays inside it* (``../`` and absolute paths are
  refused without saying whether the outside file exists), names a readable image file;
* the conversation alternates ``human`` / ``gpt`` turns, starts with a human turn holding exactly one
  ``<image>`` tag, ends with a ``gpt`` answer; every answer and question is non-empty. A multi-turn record is
  kept whole: the model trains on every assistant turn (see :class:`toolkit.data.Collator`);
* **the privacy unit** (``privacy_unit=True``, for a training set): DP-SGD's guarantee is per record, which
  protects an image only if no image is in two records. The same image file, or the same image content (a
  SHA-256 of the file bytes, and of the decoded pixels: :mod:`toolkit.image_duplicates`), under two record ids
  is refused with an error naming both; nearly the same picture (perceptual hash) is warned about. If records carry a
  ``user_id`` (all of them must), each user may appear once: ε then protects a user. A user with several
  records would need user-level accounting, which the toolkit does not do; it refuses instead.

Images are not decoded here (only their header is read, and their bytes hashed): a large set is read image by
image when its visual tokens are computed (:mod:`toolkit.features`, cached by :mod:`toolkit.feature_cache`).

Example::

    >>> import json, tempfile, pathlib
    >>> from PIL import Image
    >>> from toolkit.userdata import load_llava_json
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> Image.new("RGB", (40, 30), "red").save(folder / "a.png")
    >>> turns = [{"from": "human", "value": "<image>\\nwhat colour ?"}, {"from": "gpt", "value": "red"}]
    >>> _ = (folder / "data.json").write_text(json.dumps([{"id": "a", "image": "a.png", "conversations": turns}]))
    >>> ds = load_llava_json(folder / "data.json")
    >>> ds[0].question, ds[0].answer, ds[0].image is None, ds.privacy_unit
    ('what colour ?', 'red', True, 'one record = one image (no image file or content in two records)')
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

from PIL import Image

from toolkit.data import DataValidationError, VQADataset, VQARecord
from toolkit.image_duplicates import check_training_images
from toolkit.validation import inside_folder

IMAGE_UNIT = "one record = one image (no image file or content in two records)"
TINY_IMAGE_PX = 8   # a side shorter than this (e.g. a 1x1 image) is warned about
USER_UNIT = "one record = one user (each user_id once, with one image)"


def _fail(where: str, problem: str):
    raise DataValidationError(f"record {where}: {problem}")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, read in chunks (large images are never held whole)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def read_records(path: Path) -> list:
    """The raw records of a ``.json`` (a list) or ``.jsonl`` (one object a line) file."""
    if not path.is_file():
        raise DataValidationError(f"data file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")   # a UTF-8 byte-order mark (Windows editors) is accepted
    except UnicodeDecodeError as err:
        raise DataValidationError(f"{str(path)!r} is not UTF-8 text ({err.reason})") from None
    if path.suffix == ".jsonl":
        raw = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    raw.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataValidationError(f"{str(path)!r} line {number} is not valid JSON: {err}") from None
        return raw
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataValidationError(f"{str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(raw, list):
        raise DataValidationError(f"{str(path)!r} must hold a list of records, found {type(raw).__name__}")
    return raw


def parse_conversation(where: str, turns, require_answer: bool = True) -> tuple[tuple, str, str | None]:
    """(history, question, answer) of a LLaVA conversation, every turn checked. Without ``require_answer`` a
    conversation may end with its question (answer ``None``: a record to predict)."""
    if not isinstance(turns, list) or len(turns) < (2 if require_answer else 1):
        _fail(where, f"'conversations' must be a list of at least {2 if require_answer else 1} turn(s)")
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"), str):
            _fail(where, f"turn {t} must be an object with string 'from' and 'value'")
        expected = "human" if t % 2 == 0 else "gpt"
        if turn["from"] != expected:
            _fail(where, f"turns must alternate 'human' then 'gpt'; turn {t} is from {turn['from']!r}")
    if len(turns) % 2 and require_answer:
        _fail(where, f"the conversation must end with a 'gpt' answer; it has {len(turns)} turns")
    if turns[0]["value"].count("<image>") != 1:
        _fail(where, "the first human turn must contain exactly one '<image>' tag")
    if any("<image>" in turn["value"] for turn in turns[1:]):
        _fail(where, "only the first human turn may contain '<image>' (one image per record)")
    pairs = []
    for t in range(0, len(turns), 2):
        question = turns[t]["value"].replace("<image>", "").strip()
        answer = turns[t + 1]["value"].strip() if t + 1 < len(turns) else None
        if not question:
            _fail(where, f"turn {t}: the question is empty")
        if answer == "":
            _fail(where, f"turn {t + 1}: the answer is empty")
        pairs.append((question, answer))
    return tuple(pairs[:-1]), pairs[-1][0], pairs[-1][1]


def load_llava_json(path: str | os.PathLike, image_folder: str | os.PathLike | None = None,
                    candidates: tuple[str, ...] | None = None, *, privacy_unit: bool = True,
                    limit: int | None = None, require_answers: bool = True,
                    refused: list | None = None, several_per_user: bool = False) -> VQADataset:
    """Load and validate a LLaVA conversation file; images stay on disk (see the module docstring).

    Args:
        path: a ``.json`` list or ``.jsonl`` file of records.
        image_folder: where the ``image`` paths are relative to (default: the data file's folder).
        candidates: the closed set of answers to rank at evaluation (default: the distinct answers).
        privacy_unit: enforce one image per record (and one record per ``user_id``): on for a training set,
            off for an evaluation or prediction set, where several questions may share an image.
        several_per_user: a user_id may have several records (user-level DP, ``privacy_unit="user"``); every
            record must then carry one.
        limit: keep the first ``limit`` records (all are still validated).
        require_answers: every conversation ends with a ``gpt`` answer; off for a prediction set, whose records
            may end with the question.
        refused: a list to collect refused records in instead of stopping at the first: each bad record is
            skipped and appended as ``dict(position, id, reason)`` (the dashboard shows them all). Problems of the
            file as a whole (unreadable, no valid record, user_id on some records only) still raise.

    Raises:
        DataValidationError: the first problem found, naming the record (by id and position) or the file.
    """
    path = Path(path)
    folder = Path(image_folder) if image_folder is not None else path.parent
    if not folder.is_dir():
        raise DataValidationError(f"image folder {str(folder)!r} does not exist")
    raw = read_records(path)
    records, seen_ids, by_path, by_hash, by_user = [], set(), {}, {}, {}
    for position, item in enumerate(raw):
        try:
            record = _check_record(position, item, folder, privacy_unit, require_answers, seen_ids, by_path, by_hash,
                                   None if several_per_user else by_user)
        except DataValidationError as err:
            if refused is None:
                raise
            rid = item.get("id") if isinstance(item, dict) else None
            refused.append(dict(position=position, id=None if rid is None else str(rid), reason=str(err)))
            continue
        records.append(record)
    if not records:
        raise DataValidationError(f"{str(path)!r} holds no records")
    if several_per_user and any(r.user_id is None for r in records):
        missing = next(r.id for r in records if r.user_id is None)
        raise DataValidationError(f"record {missing!r}: has no 'user_id'; user-level privacy needs one on every record")
    if privacy_unit and by_user and len(by_user) != len(records):
        missing = next(r.id for r in records if r.user_id is None)
        raise DataValidationError(f"record {missing!r}: has no 'user_id' while other records have one: give every "
                                  "record a user_id (ε is then per user) or none (ε per image)")
    if privacy_unit:  # the same picture re-encoded: equal decoded pixels refused, near ones warned (issue 20)
        records = check_training_images(records, refused)
    unit = USER_UNIT if by_user else IMAGE_UNIT
    if limit is not None:
        records = records[:limit]
    return VQADataset(records, candidates, name=path.stem, privacy_unit=unit)


def _check_record(position: int, item, folder: Path, privacy_unit: bool, require_answers: bool, seen_ids: set,
                  by_path: dict, by_hash: dict, by_user: dict) -> VQARecord:
    """One raw record checked (and registered in the cross-record sets); its :class:`VQARecord`, or
    :class:`DataValidationError` naming it."""
    where = f"#{position}"
    if not isinstance(item, dict):
        _fail(where, f"must be an object, found {type(item).__name__}")
    rid = item.get("id")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool) or str(rid) == "":
        _fail(where, "'id' is missing or not a string/integer")
    rid = str(rid)
    where = f"{rid!r} (#{position})"
    if rid in seen_ids:
        _fail(where, "duplicate id")
    seen_ids.add(rid)
    image_name = item.get("image")
    if not isinstance(image_name, str) or not image_name:
        _fail(where, "'image' is missing or not a string")
    try:
        image_path = inside_folder(folder, image_name, what="image")
    except ValueError as err:
        _fail(where, str(err))
    if not image_path.is_file():
        _fail(where, f"image {image_name!r} not found in {str(folder)!r}")
    try:  # the header only: proves it is an image without decoding the pixels
        with Image.open(image_path) as img:
            size = img.size
    except Exception as err:  # PIL raises many types for unreadable files
        _fail(where, f"image {image_name!r} is unreadable ({err.__class__.__name__}: {err})")
    if min(size) < TINY_IMAGE_PX:  # issue 22: accepted, but not silently
        warnings.warn(f"record {where}: image {image_name!r} is only {size[0]}x{size[1]} pixels; it is resized to "
                      "the model's input and carries next to no information (a thumbnail or a broken export?)",
                      stacklevel=2)
    history, question, answer = parse_conversation(where, item.get("conversations"), require_answers)
    user_id = item.get("user_id")
    if user_id is not None and (not isinstance(user_id, (str, int)) or isinstance(user_id, bool)):
        _fail(where, "'user_id' must be a string or an integer")
    digest = file_sha256(image_path)
    if privacy_unit:
        _check_unit(where, rid, image_name, image_path, digest, user_id, by_path, by_hash, by_user)
    return VQARecord(rid, None, question, answer, (image_name,), image_path=str(image_path), image_sha256=digest,
                     history=history, user_id=None if user_id is None else str(user_id))


def _check_unit(where, rid, image_name, image_path, digest, user_id, by_path, by_hash, by_user) -> None:
    """One record = one image (by path and by content); one record per user when user ids are given."""
    unit = "one record per image is the privacy unit"
    if image_path in by_path:
        _fail(where, f"records {by_path[image_path]!r} and {rid!r} share the image file {image_name!r}: {unit}")
    by_path[image_path] = rid
    if digest in by_hash:
        _fail(where, f"records {by_hash[digest]!r} and {rid!r} have images with the same content "
                     f"({image_name!r} is a copy): {unit}")
    by_hash[digest] = rid
    if user_id is not None and by_user is not None:   # None: several records per user allowed (user-level DP)
        key = str(user_id)
        if key in by_user:
            _fail(where, f"records {by_user[key]!r} and {rid!r} have the same user_id {key!r}: a user with several "
                         "records needs user-level privacy: pass privacy_unit='user' (ε per user, users sampled), or "
                         "keep one record per user")
        by_user[key] = rid

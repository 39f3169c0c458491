"""A person's data set in the dashboard: where it comes from (an uploaded zip, or a path under the server's data
root), which files in it are the training and evaluation sets, and what validation found.

* :func:`extract_zip`: a zip of LLaVA JSON/JSONL files and images, unpacked into a new folder of the app's own;
  every member must stay inside it (no absolute path, no ``..``, no symbolic link), and the total size and file
  count are capped, so a zip cannot write elsewhere or fill the disk.
* :func:`server_folder`: a path typed by the user, relative to the data root the app was launched with
  (``--data-root`` / ``DUALPRIV_APP_DATA_ROOT``); :func:`toolkit.validation.inside_folder` refuses ``../``,
  absolute paths and symbolic links leading out, without saying whether something exists outside.
* :func:`find_data_files`: ``train.json(l)`` (or the only data file) and ``test`` / ``eval`` / ``val``.
* :func:`validate`: both files through :func:`toolkit.userdata.load_llava_json`, every refused record kept with
  its reason; :func:`summary_markdown` and :func:`refused_table` say it to the person.

Every problem is an :class:`~toolkit.dashboard.common.InputError` naming the control and the cause.
"""
from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from toolkit.dashboard.common import InputError, plain_reason
from toolkit.data import DataValidationError, VQADataset
from toolkit.userdata import load_llava_json
from toolkit.validation import inside_folder

DATA_SUFFIXES = (".json", ".jsonl")
TRAIN_NAMES = ("train",)
EVAL_NAMES = ("test", "eval", "val", "validation")
MAX_ZIP_BYTES = 500 * 2 ** 20      # uncompressed; a zip bomb stops here
MAX_ZIP_FILES = 50_000
MAX_SEARCH_DEPTH = 3               # data files may sit in a folder of the zip, not arbitrarily deep
REFUSED_COLUMNS = ["file", "position", "id", "reason"]


@dataclass
class DataChoice:
    """Where a data set is: its training file, its evaluation file (or None) and a description of its source.
    Image paths inside a file are relative to that file's folder."""

    train: Path
    eval: Path | None
    source: str

    def to_state(self) -> dict:
        return dict(train=str(self.train), eval=str(self.eval) if self.eval else None, source=self.source)

    @classmethod
    def from_state(cls, state: dict | None) -> "DataChoice":
        if not state:
            raise InputError("no data set chosen yet: upload a zip or give a path under the data root, then "
                             "press Validate")
        return cls(Path(state["train"]), Path(state["eval"]) if state.get("eval") else None, state["source"])


@dataclass
class Validated:
    """A validated data set: the accepted records of each file and every refused one, with its reason."""

    choice: DataChoice
    train_set: VQADataset
    eval_set: VQADataset | None
    refused: list[dict] = field(default_factory=list)


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def extract_zip(path, destination_root: str | Path) -> Path:
    """Unpack the uploaded zip at ``path`` into a new folder under ``destination_root``; its path.

    Refused (:class:`InputError`): not a zip, a member with an absolute path, ``..`` or a symbolic link, more
    than :data:`MAX_ZIP_FILES` files or :data:`MAX_ZIP_BYTES` uncompressed."""
    path = getattr(path, "name", path)
    if not path or not Path(path).is_file():
        raise InputError("data zip: the uploaded file is missing: upload it again")
    name = Path(path).name
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise InputError(f"data zip: {name!r} is not a zip file (zip a folder holding train.json and its images)"
                         ) from None
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        if len(members) > MAX_ZIP_FILES:
            raise InputError(f"data zip: {name!r} holds {len(members)} files; at most {MAX_ZIP_FILES:,}")
        if sum(m.file_size for m in members) > MAX_ZIP_BYTES:
            raise InputError(f"data zip: {name!r} unpacks to more than {MAX_ZIP_BYTES // 2 ** 20} MB")
        Path(destination_root).mkdir(parents=True, exist_ok=True)
        os.chmod(destination_root, 0o700)  # people's images: readable by the server's user only
        folder = Path(tempfile.mkdtemp(prefix=f"data-{time.strftime('%Y%m%d-%H%M%S')}-", dir=destination_root))
        try:
            for member in members:
                _unpack(archive, member, folder)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)  # a refused zip leaves nothing behind
            raise
    return folder


def _unpack(archive: zipfile.ZipFile, member: zipfile.ZipInfo, folder: Path) -> None:
    """Write one member under ``folder``, or refuse it (:class:`InputError`)."""
    if _is_symlink(member):
        raise InputError(f"data zip: member {member.filename!r} is a symbolic link; links are refused")
    try:
        target = inside_folder(folder, member.filename.replace("\\", "/"), what="data zip member")
    except ValueError:
        raise InputError(f"data zip: member {member.filename!r} points outside the zip's own folder (an absolute "
                         "path or '..'); such zips are refused") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with archive.open(member) as source, open(target, "wb") as sink:
        for block in iter(lambda: source.read(1 << 20), b""):
            written += len(block)
            if written > member.file_size:  # a header that lies about the size
                raise InputError(f"data zip: member {member.filename!r} is larger than its header says")
            sink.write(block)


def discard(folder: Path | str | None) -> None:
    """Remove an unpacked upload (its data set was refused)."""
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


def server_folder(data_root: str | None, relative) -> Path:
    """The data folder or file ``relative`` names under ``data_root`` (an :class:`InputError` otherwise)."""
    if not data_root:
        raise InputError("data path: this app was launched without a data root (--data-root or "
                         "DUALPRIV_APP_DATA_ROOT), so only uploaded zips can be used")
    text = str(relative or "").strip()
    if not text:
        raise InputError("data path is empty: give a folder or a .json/.jsonl file relative to the data root")
    try:
        target = inside_folder(data_root, text, what="data path")
    except ValueError as err:
        raise InputError(str(err)) from None
    if not target.exists():
        raise InputError(f"data path {text!r} does not exist under the data root")
    return target


def _data_files(folder: Path) -> list[Path]:
    found = []
    for depth in range(MAX_SEARCH_DEPTH + 1):
        pattern = "/".join(["*"] * (depth + 1))
        found += [p for p in folder.glob(pattern) if p.is_file() and p.suffix in DATA_SUFFIXES
                  and not p.name.startswith(".") and "__MACOSX" not in p.parts]
    return sorted(found)


def find_data_files(place: Path, source: str) -> DataChoice:
    """The training and evaluation files at ``place`` (a data file, or a folder searched a few levels deep)."""
    if place.is_file():
        if place.suffix not in DATA_SUFFIXES:
            raise InputError(f"data path {place.name!r} is not a .json or .jsonl file")
        return DataChoice(place, None, source)
    files = _data_files(place)
    if not files:
        raise InputError(f"{source}: no .json or .jsonl data file found (put train.json and, optionally, test.json "
                         "next to the images)")
    train = [p for p in files if p.stem.lower() in TRAIN_NAMES]
    evals = [p for p in files if p.stem.lower() in EVAL_NAMES]
    if len(train) > 1 or len(evals) > 1:
        raise InputError(f"{source}: several training or evaluation files ({', '.join(p.name for p in train + evals)})"
                         "; keep one train.json and at most one test.json")
    if not train:
        if len(files) != 1:
            names = ", ".join(str(p.relative_to(place)) for p in files[:6])
            raise InputError(f"{source}: {len(files)} data files ({names}) and none named train.json / "
                             "train.jsonl: name the training file train.json")
        train = files
    return DataChoice(train[0], evals[0] if evals else None, source)


def _without_paths(text: str, choice: DataChoice) -> str:
    """``text`` with the server's folders replaced by words: a reason shown to the user names files of the data
    set, never where the server keeps them."""
    for path in (choice.eval, choice.train):
        if path is not None:
            for variant in {str(path.resolve()), str(path)}:
                text = text.replace(variant, path.name)
    for folder in {str(choice.train.parent.resolve()), str(choice.train.parent)}:
        text = text.replace(folder, "the data set's folder")
    return text


def validate(choice: DataChoice) -> Validated:
    """Both files through the toolkit's validation; refused records are collected, not fatal. A file with no
    valid record at all is an :class:`InputError` (with the first reasons). Reasons never show server paths."""
    refused: list[dict] = []

    def load(path: Path, training: bool) -> VQADataset:
        found: list[dict] = []
        try:
            dataset = load_llava_json(path, privacy_unit=training, refused=found)
        except DataValidationError as err:
            reasons = "; ".join(r["reason"] for r in found[:3])
            text = f"{path.name}: {err}" + (f" (first refusals: {reasons})" if reasons else "")
            raise InputError(plain_reason(_without_paths(text, choice))) from None
        finally:
            refused.extend(dict(r, file=path.name, reason=plain_reason(_without_paths(r["reason"], choice)))
                           for r in found)
        return dataset

    train_set = load(choice.train, training=True)
    eval_set = load(choice.eval, training=False) if choice.eval else None
    return Validated(choice, train_set, eval_set, refused)


def _answers(dataset: VQADataset, shown: int = 12) -> str:
    counts = Counter(r.answer for r in dataset.records)
    listed = ", ".join(f"{answer!r} ({n})" for answer, n in counts.most_common(shown))
    more = f", and {len(counts) - shown} more" if len(counts) > shown else ""
    return f"{len(counts)} distinct answer(s): {listed}{more}"


def summary_markdown(validated: Validated) -> str:
    """What validation found, for people: counts, answers, the privacy unit, refusals."""
    v = validated
    refused_train = sum(1 for r in v.refused if r["file"] == v.choice.train.name)
    lines = [f"**Source:** {v.choice.source}.",
             f"**Training file `{v.choice.train.name}`:** {len(v.train_set)} record(s) accepted, {refused_train} "
             f"refused; {_answers(v.train_set)}. Privacy unit: {v.train_set.privacy_unit}."]
    if v.eval_set is not None:
        refused_eval = sum(1 for r in v.refused if r["file"] == v.choice.eval.name)
        lines.append(f"**Evaluation file `{v.choice.eval.name}`:** {len(v.eval_set)} record(s) accepted, "
                     f"{refused_eval} refused; {_answers(v.eval_set)}.")
    else:
        lines.append("**No evaluation file** (test.json): the model is trained and exported, but not scored.")
    if v.refused:
        lines.append(f"{len(v.refused)} record(s) were refused (table below) and are left out of training; "
                     "fix them and validate again to include them.")
    return "\n\n".join(lines)


def refused_table(validated: Validated | None) -> pd.DataFrame:
    """The refused records (file, position, id, reason)."""
    rows = validated.refused if validated is not None else []
    return pd.DataFrame([{k: r.get(k) for k in REFUSED_COLUMNS} for r in rows], columns=REFUSED_COLUMNS)

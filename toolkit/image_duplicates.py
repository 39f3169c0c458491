"""The same picture under two records: exact duplicates by decoded pixels, near duplicates by perceptual hash,
and training/evaluation overlap.

DP protects a record; a picture in two training records is protected only half as well as ε says. A file hash
(:mod:`toolkit.userdata`) misses the same pixels re-encoded (a PNG re-saved with other metadata or compression),
so every training image is also hashed by its **decoded pixels** (RGB, with its size): two records with equal
pixels are refused, naming both. A JPEG re-save, a resize or a small edit changes the pixels, so those are found
as **near duplicates**: a 64-bit perceptual hash (pHash, from the maintained ``imagehash`` library) within
:data:`NEAR_DISTANCE` bits, reported as a :class:`NearDuplicateWarning` naming both records (a warning, not an
error: two different photos of one scene can be that close, and only the owner of the data can tell).

The evaluation set is compared with the training set the same way (:func:`report_overlap`): an evaluation image
that is also a training image makes the accuracy a memorisation score; it is reported, naming both records.

Example::

    >>> import tempfile, pathlib
    >>> from PIL import Image
    >>> from toolkit.image_duplicates import pixel_digest
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> Image.new("RGB", (8, 8), "red").save(folder / "a.png")
    >>> Image.new("RGB", (8, 8), "red").save(folder / "b.png", compress_level=0)
    >>> pixel_digest(folder / "a.png") == pixel_digest(folder / "b.png")
    True
"""
from __future__ import annotations

import hashlib
import warnings

import imagehash
import numpy as np
from PIL import Image

from toolkit.data import DataValidationError

SHOWN = 5           # pairs named in a warning (the rest counted)
# of 64 pHash bits. Measured (issue 20): a JPEG re-save at quality 75 of 22 pictures, 0 bits away; 780 pairs of
# unrelated smooth random pictures 20-44 (median 32); 276 pairs of disjoint crops of the two sample photos 16-42
NEAR_DISTANCE = 6


class NearDuplicateWarning(UserWarning):
    """Two records hold nearly the same picture (perceptual hash within NEAR_DISTANCE bits)."""


def _rgb(picture) -> Image.Image:
    if isinstance(picture, Image.Image):
        return picture.convert("RGB")
    with Image.open(picture) as img:
        return img.convert("RGB")


def pixel_digest(picture) -> str:
    """SHA-256 of the decoded RGB pixels and the size: equal for the same picture however it is encoded
    (``picture``: a PIL image, a path or a file object)."""
    rgb = _rgb(picture)
    digest = hashlib.sha256(f"{rgb.size[0]}x{rgb.size[1]}".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def perceptual_hash(picture) -> int:
    """The 64-bit pHash of the picture (a PIL image, a path or a file object), as an integer."""
    bits = imagehash.phash(_rgb(picture)).hash.reshape(-1)
    return int("".join("1" if b else "0" for b in bits), 2)


def near_pairs(hashes: list[int], others: list[int] | None = None, max_distance: int = NEAR_DISTANCE,
               block: int = 1024) -> list[tuple[int, int, int]]:
    """Index pairs ``(i, j, distance)`` whose hashes differ in at most ``max_distance`` bits: within ``hashes``
    (i < j) or between ``hashes`` and ``others``. Vectorised popcount, block by block (n² / 2 comparisons)."""
    a = np.array(hashes, dtype=np.uint64)
    b = a if others is None else np.array(others, dtype=np.uint64)
    pairs = []
    for start in range(0, len(a), block):
        distance = np.bitwise_count(a[start:start + block, None] ^ b[None, :])
        for i, j in zip(*np.nonzero(distance <= max_distance)):
            i = int(i) + start
            if others is None and j <= i:
                continue
            pairs.append((i, int(j), int(distance[i - start, j])))
    return pairs


def check_training_images(records, refused: list | None = None) -> list:
    """Refuse a training record whose decoded pixels equal an earlier record's (or, with ``refused``, skip it and
    append ``dict(position, id, reason)``); warn about near duplicates. Returns the records kept."""
    kept, hashes, by_pixels = [], [], {}
    for position, record in enumerate(records):
        try:
            rgb = record.load_image()  # names the record if its pixels cannot be decoded
            digest = pixel_digest(rgb)
            if digest in by_pixels:
                raise DataValidationError(
                    f"record {record.id!r}: records {by_pixels[digest]!r} and {record.id!r} have the same picture "
                    "(equal decoded pixels, the files differ): one record per image is the privacy unit")
        except DataValidationError as err:
            if refused is None:
                raise
            refused.append(dict(position=position, id=record.id, reason=str(err)))
            continue
        by_pixels[digest] = record.id
        kept.append(record)
        hashes.append(perceptual_hash(rgb))
    pairs = [(kept[i].id, kept[j].id, distance) for i, j, distance in near_pairs(hashes)]
    if pairs:  # one warning for the whole set, the first pairs named
        named = "; ".join(f"records {a!r} and {b!r} ({d} bits)" for a, b, d in pairs[:SHOWN])
        more = f" and {len(pairs) - SHOWN} more pairs" if len(pairs) > SHOWN else ""
        warnings.warn(f"{len(pairs)} pair(s) of training records hold nearly the same picture (perceptual hash "
                      f"within {NEAR_DISTANCE} of 64 bits): {named}{more}. If a pair is one image (a re-save, a "
                      "crop), keep one record: the privacy unit", NearDuplicateWarning, stacklevel=2)
    return kept


def report_overlap(train_records, eval_records) -> list[tuple[str, str, str]]:
    """Evaluation records whose picture is also a training record's: ``(eval id, train id, "exact" | "near")``,
    each also warned about (:class:`NearDuplicateWarning`)."""
    train_files = [r for r in train_records if r.image_path]
    eval_files = [r for r in eval_records if r.image_path]
    if not train_files or not eval_files:
        return []
    train_images = [r.load_image() for r in train_files]
    eval_images = [r.load_image() for r in eval_files]
    by_pixels = {pixel_digest(img): r.id for r, img in zip(train_files, train_images)}
    found, exact = [], set()
    for r, img in zip(eval_files, eval_images):
        if (digest := pixel_digest(img)) in by_pixels:
            found.append((r.id, by_pixels[digest], "exact"))
            exact.add(r.id)
    near = near_pairs([perceptual_hash(img) for img in eval_images], [perceptual_hash(img) for img in train_images])
    found += [(eval_files[i].id, train_files[j].id, "near") for i, j, _ in near if eval_files[i].id not in exact]
    if found:
        named = "; ".join(f"evaluation record {e!r} shows {'the same' if kind == 'exact' else 'nearly the same'} "
                          f"picture as training record {t!r}" for e, t, kind in found[:SHOWN])
        more = f" and {len(found) - SHOWN} more" if len(found) > SHOWN else ""
        warnings.warn(f"{len(found)} evaluation record(s) overlap the training set: {named}{more}. Their score "
                      "measures memorisation", NearDuplicateWarning, stacklevel=2)
    return found

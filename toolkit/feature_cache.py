"""An on-disk cache of the visual tokens of file-backed records, so a second run does not recompute them.

The visual tokens of a record depend on the frozen vision tower, the image preprocessing, the token pruner
and the image's content, nothing else: the cache key is a hash of exactly those (tower weights, feature layer
and selection, image size / mean / std / processor, ``pruner.describe()``, and the ordered SHA-256 of every
image file). Change any of them and the key changes. Only records read from files (``image_sha256`` set,
see :mod:`toolkit.userdata`) are cached; the embedded tasks are cheap to recompute.

The files live under ``cache_dir() / "features"`` (``$DUALPRIV_CACHE``). They are functions of your images:
treat them as sensitive as the images themselves (they never go into an exported model directory), and delete
the folder when the images must go.

Example::

    >>> import tempfile
    >>> from toolkit.feature_cache import cached_features, features_key
    >>> from toolkit.models import build_model
    >>> from toolkit.samples import make_photo_dataset
    >>> from toolkit.tokens import make_pruner
    >>> from toolkit.userdata import load_llava_json
    >>> paths = make_photo_dataset(tempfile.mkdtemp(), n_train=4, n_test=2)
    >>> records = load_llava_json(paths["train"], paths["image_folder"]).records
    >>> bundle = build_model("tiny")
    >>> pruner = make_pruner("dual-priv", bundle, keep=16)
    >>> len(features_key(bundle, pruner, records))        # cached_features(bundle, pruner, records) files it there
    32
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from toolkit.features import encode_records
from toolkit.warmstart import cache_dir

FORMAT_VERSION = 1


def tower_fingerprint(bundle) -> str:
    """SHA-256 of the frozen vision tower's weights and of everything that turns an image into its input."""
    digest = hashlib.sha256()
    for name, tensor in sorted(bundle.vision_tower.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    processor = bundle.image_processor.to_dict() if bundle.image_processor is not None else None
    geometry = dict(image_size=bundle.image_size, patch_size=bundle.patch_size, mean=list(bundle.image_mean),
                    std=list(bundle.image_std), processor=processor,
                    feature_layer=bundle.vision_feature_layer,
                    select=bundle.config.vision_feature_select_strategy)
    digest.update(json.dumps(geometry, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def features_key(bundle, pruner, records) -> str | None:
    """The cache key of these records' visual tokens, or None if a record is not file-backed."""
    hashes = [r.image_sha256 for r in records]
    if not hashes or any(h is None for h in hashes):
        return None
    digest = hashlib.sha256()
    digest.update(f"v{FORMAT_VERSION}|{tower_fingerprint(bundle)}|".encode())
    digest.update(json.dumps(pruner.describe(), sort_keys=True, default=str).encode())
    for h in hashes:
        digest.update(h.encode())
    return digest.hexdigest()[:32]


def features_path(key: str) -> Path:
    return cache_dir() / "features" / f"{key}.pt"


def cached_features(bundle, pruner, records, use_cache: bool = True) -> torch.Tensor:
    """``encode_records(bundle, pruner, records)``, read from the cache when it was computed before.

    The result is on the tower's device, as :func:`toolkit.features.encode_records` returns it.
    """
    key = features_key(bundle, pruner, records) if use_cache else None
    if key is None:
        return encode_records(bundle, pruner, records)
    device = next(bundle.vision_tower.parameters()).device
    path = features_path(key)
    if path.is_file():
        try:
            features = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError):
            features = None  # a damaged file (e.g. a run killed mid-write elsewhere): recompute it
        if isinstance(features, torch.Tensor) and features.shape[:2] == (len(records), pruner.n_out):
            return features.to(device)
    features = encode_records(bundle, pruner, records)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save(features.cpu(), tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one
    return features

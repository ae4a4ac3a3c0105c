"""CIFAR-100, "python version" (``cifar-100-python/``: ``meta``, ``train``, ``test`` pickles).

Splits: ``train`` (50,000) and ``test`` (10,000), plus an optional ``valid`` split
carved out of train, per fine class and never random across runs:

- ``--valid-every N``: within each fine class, in file order, the 1st, (N+1)-th,
  (2N+1)-th ... images (rank in class % N == 0): 100 per class for N = 5;
- ``--valid-ratio R``: within each fine class, ``R * n`` images (rounded as in
  ``shards.common.split_counts``) picked by ``--seed`` (``shards.common.seeded_order``
  of their index in the train file);
- ``--valid-set-order R``: within each fine class, the first ``n // R`` images in the
  iteration order of a Python set of their train-file indices, added in file order: the
  CIFAR seed's ``process_data/make_train_valid.py --ratio R`` (``list(set(...))[:n // R]``;
  R = 25 holds out 20 of each class's 500). CPython lays a set of ints out by the value
  modulo its table size, so the order is neither random nor ascending, and fixed.

``--database-split`` also writes a ``database`` split of every train image in file order,
the held-out ones included: the CIFAR seed trains without its valid images but searches
all 50,000 train images.

Labels are the fine labels (class names from ``meta``); each sample's json has the
coarse label and name, the original file name and its index in the train/test file.
Keys are ``<file>_<index>`` (``train_00042``): CIFAR file names are not paths, and the
index names the image in the original file, also for images moved to ``valid``.
Images are stored as PNG (lossless).
"""

from __future__ import annotations

import argparse
import io
import pickle
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from shards.common import require_file, require_src, seeded_split
from shards.writer import Sample, SplitSource

NAME = "cifar100"
VERSION = 1
SIDE = 32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cifar100")
    valid = group.add_mutually_exclusive_group()
    valid.add_argument("--valid-every", type=int, default=0, metavar="N",
                       help="move every N-th train image of each class (from the first) to a 'valid' split")
    valid.add_argument("--valid-ratio", type=float, default=0.0, metavar="R",
                       help="move a seeded fraction R of each class's train images to a 'valid' split")
    valid.add_argument("--valid-set-order", type=int, default=0, metavar="R",
                       help="move the first n // R of each class in Python set order to 'valid' (the CIFAR seed's)")
    group.add_argument("--database-split", action="store_true",
                       help="also write a 'database' split of every train image (valid ones included)")
    group.add_argument("--seed", type=int, default=0, help="seed of --valid-ratio's choice (default 0)")


def encode(item: tuple[str, int, np.ndarray, dict[str, Any]]) -> Sample:
    from PIL import Image

    key, label, row, meta = item
    pixels = row.reshape(3, SIDE, SIDE).transpose(1, 2, 0)  # 1024 R, 1024 G, 1024 B, each row-major
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels), mode="RGB").save(buf, format="PNG")
    return Sample(key=key, label=label, image=buf.getvalue(), ext="png", meta=meta)


def _field(data: dict, name: str) -> Any:
    """Python 2 pickles have byte-string keys; re-pickled copies may have str keys."""
    for key in (name.encode(), name):
        if key in data:
            return data[key]
    raise KeyError(name)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def load(path: Path) -> dict[str, Any]:
    require_file(path, "CIFAR-100 file")
    with open(path, "rb") as f:
        data = pickle.load(f, encoding="bytes")
    try:
        return {name: _field(data, name) for name in ("data", "fine_labels", "coarse_labels", "filenames")}
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a CIFAR-100 python-version file (no {err})") from None


def items_of(file: str, data: dict[str, Any], coarse_names: list[str]) -> list[tuple]:
    pixels = np.asarray(data["data"], dtype=np.uint8)
    n = len(data["fine_labels"])
    if pixels.shape != (n, 3 * SIDE * SIDE) or len(data["coarse_labels"]) != n or len(data["filenames"]) != n:
        raise ValueError(f"{file}: data is {pixels.shape} for {n} labels; expected ({n}, {3 * SIDE * SIDE})")
    items = []
    for i in range(n):
        fine, coarse = int(data["fine_labels"][i]), int(data["coarse_labels"][i])
        meta = {"source_file": file, "index": i, "filename": _text(data["filenames"][i]),
                "coarse_label": coarse, "coarse_name": coarse_names[coarse]}
        items.append((f"{file}_{i:05d}", fine, pixels[i], meta))
    return items


def set_order_head(indices: list[int], ratio: int) -> list[int]:
    """The first ``len // ratio`` of ``indices`` in the iteration order of a set they were added to
    one by one, in the given order (the CIFAR seed's ``list(pic_set)[:valid_num]``)."""
    pic_set: set[int] = set()
    for i in indices:
        pic_set.add(i)
    return list(pic_set)[: len(pic_set) // ratio]


def carve_valid(train: list[tuple], every: int, ratio: float, seed: int,
                set_order: int = 0) -> tuple[list[tuple], list[tuple]]:
    """Split train items into (train, valid) per fine class; file order kept in both."""
    by_class: dict[int, list[int]] = {}
    for i, item in enumerate(train):
        by_class.setdefault(item[1], []).append(i)
    valid: set[int] = set()
    for indices in by_class.values():
        if every:
            valid.update(indices[::every])
        elif set_order:
            valid.update(set_order_head(indices, set_order))  # the index in the train file is the item's position
        else:
            chosen = seeded_split([str(train[i][3]["index"]) for i in indices],
                                  [1 - Fraction(str(ratio)), Fraction(str(ratio))], seed)[1]
            valid.update(int(c) for c in chosen)  # the index in the train file is the item's position
    return [t for i, t in enumerate(train) if i not in valid], [t for i, t in enumerate(train) if i in valid]


def sources(args: Any) -> list[SplitSource]:
    src = require_src(args, "CIFAR-100's python version (meta, train, test)")
    every, ratio, seed = getattr(args, "valid_every", 0), getattr(args, "valid_ratio", 0.0), getattr(args, "seed", 0)
    set_order = getattr(args, "valid_set_order", 0)
    if every < 0 or set_order < 0 or not 0 <= ratio < 1:
        raise ValueError("--valid-every and --valid-set-order must be >= 1 and --valid-ratio in [0, 1)")
    meta_path = require_file(src / "meta", "CIFAR-100 file")
    with open(meta_path, "rb") as f:
        meta = pickle.load(f, encoding="bytes")
    fine_names = [_text(n) for n in _field(meta, "fine_label_names")]
    coarse_names = [_text(n) for n in _field(meta, "coarse_label_names")]
    train = items_of("train", load(src / "train"), coarse_names)
    test = items_of("test", load(src / "test"), coarse_names)
    splits = {"train": train}
    if every or ratio or set_order:
        splits["train"], splits["valid"] = carve_valid(train, every, ratio, seed, set_order)
    splits["test"] = test
    if getattr(args, "database_split", False):
        splits["database"] = train
    info = {"source": str(src.resolve()), "image_format": "png", "valid_every": every, "valid_ratio": ratio,
            "seed": seed}
    if set_order:  # recorded only when used, so that shards written before this option stay current
        info["valid_set_order"] = set_order
    return [SplitSource(name, fine_names, items, encode, info) for name, items in splits.items()]

"""Stanford Online Products (``Stanford_Online_Products/``: Ebay_train.txt, Ebay_test.txt,
``<super_class>_final/<image>.JPG``).

Splits are the files' own: ``train`` (59,551 images of 11,318 products) and ``test``
(60,502 images of 11,316 other products), searched against itself.

Labels are the class ids (one per product) in numeric order, 0..C-1 over both files,
so train holds 0..11,317 and test the rest; class names are the class ids as text.
Keys are the image paths without extension (``bicycle_final/111085122871_0``). Each
sample's json has ``path``, ``image_id``, ``class_id``, ``super_class_id`` and
``super_class`` (the folder name without ``_final``).
"""

from __future__ import annotations

import argparse
from pathlib import Path, PurePosixPath
from typing import Any

from shards.common import check_unique_keys, key_from_path, read_lines, require_file, require_src
from shards.images import ImageItem, encode_image
from shards.writer import SplitSource

NAME = "sop"
VERSION = 1
FILES = {"train": "Ebay_train.txt", "test": "Ebay_test.txt"}
HEADER = ["image_id", "class_id", "super_class_id", "path"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass  # nothing to choose: the files define the splits


def read_list(path: Path) -> list[tuple[int, int, int, str]]:
    lines = read_lines(require_file(path, "Stanford Online Products list"))
    if not lines or lines[0][1].split() != HEADER:
        raise ValueError(f"{path}: the first line should be the header {' '.join(HEADER)!r}")
    rows = []
    for number, line in lines[1:]:
        parts = line.split(maxsplit=3)
        if len(parts) != 4 or not all(p.isdigit() for p in parts[:3]):
            raise ValueError(f"{path}:{number}: expected 'image_id class_id super_class_id path', got {line!r}")
        rows.append((int(parts[0]), int(parts[1]), int(parts[2]), parts[3]))
    return rows


def sources(args: Any) -> list[SplitSource]:
    src = require_src(args, "Stanford Online Products (Ebay_train.txt, Ebay_test.txt)")
    rows = {split: read_list(src / file) for split, file in FILES.items()}
    class_ids = sorted({r[1] for split_rows in rows.values() for r in split_rows})
    label = {c: i for i, c in enumerate(class_ids)}
    splits = {}
    for split, split_rows in rows.items():
        items = []
        for image_id, class_id, super_id, rel in split_rows:
            folder = PurePosixPath(rel).parts[0] if len(PurePosixPath(rel).parts) > 1 else ""
            meta = {"path": rel, "image_id": image_id, "class_id": class_id, "super_class_id": super_id,
                    "super_class": folder.removesuffix("_final")}
            items.append(ImageItem(str(src / rel), key_from_path(rel), label[class_id], meta))
        check_unique_keys(split, (i.key for i in items), (i.meta["path"] for i in items))
        splits[split] = items
    info = {"source": str(src.resolve()), "image_format": "jpg", "protocol": "Ebay_train.txt / Ebay_test.txt"}
    names = [str(c) for c in class_ids]
    return [SplitSource(split, names, items, encode_image, info) for split, items in splits.items()]

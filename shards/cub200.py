"""CUB-200-2011 (``CUB_200_2011/``: images.txt, image_class_labels.txt, bounding_boxes.txt,
classes.txt, images/).

The metric-learning protocol of unseen classes: the first half of the classes by id
(1-100) is ``train``, the second half (101-200) is ``test``, searched against itself.
The official train_test_split.txt is not used.

Labels are the class ids in order, 0..199, one mapping for both splits (so train holds
0-99 and test 100-199); class names are those of classes.txt (``001.Black_footed_Albatross``).
Keys are the paths of images.txt without extension, dots made underscores
(``001_Black_footed_Albatross/Black_Footed_Albatross_0046_18``). Each sample's json has
``path`` (as in images.txt), ``image_id``, ``class_id`` and ``bbox`` [x, y, w, h].
``--crop`` stores the bounding-box crop (JPEG q95) instead of the original bytes.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from shards.common import check_unique_keys, key_from_path, read_lines, require_file, require_src
from shards.images import ImageItem, encode_image
from shards.writer import SplitSource

NAME = "cub200"
VERSION = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cub200")
    group.add_argument("--crop", action="store_true", help="store each image cropped to its bounding box")


def read_table(path: Path, columns: int) -> dict[int, list[str]]:
    """``<id> <values...>`` rows -> {id: values}; the last column takes the rest of the line."""
    table: dict[int, list[str]] = {}
    for number, line in read_lines(require_file(path, "CUB-200-2011 file")):
        parts = line.split(maxsplit=columns - 1)
        if len(parts) != columns or not parts[0].isdigit():
            raise ValueError(f"{path}:{number}: expected {columns} columns starting with an id, got {line!r}")
        table[int(parts[0])] = parts[1:]
    return table


def sources(args: Any) -> list[SplitSource]:
    src = require_src(args, "CUB-200-2011 (images.txt, image_class_labels.txt, bounding_boxes.txt, classes.txt)")
    paths = read_table(src / "images.txt", 2)
    classes = read_table(src / "image_class_labels.txt", 2)
    boxes = read_table(src / "bounding_boxes.txt", 5)
    names = read_table(src / "classes.txt", 2)
    class_ids = sorted(names)
    label = {c: i for i, c in enumerate(class_ids)}
    train_classes = set(class_ids[: len(class_ids) // 2])
    crop = bool(getattr(args, "crop", False))
    splits: dict[str, list[ImageItem]] = {"train": [], "test": []}
    for image_id in sorted(paths):
        if image_id not in classes or image_id not in boxes:
            raise ValueError(f"image {image_id} ({paths[image_id][0]}) has no class or no bounding box "
                             f"in image_class_labels.txt / bounding_boxes.txt")
        rel, class_id = paths[image_id][0], int(classes[image_id][0])
        if class_id not in label:
            raise ValueError(f"image {image_id} ({rel}) has class {class_id}, which classes.txt does not list")
        bbox = tuple(float(v) for v in boxes[image_id])
        meta = {"path": rel, "image_id": image_id, "class_id": class_id, "bbox": list(bbox)}
        item = ImageItem(str(src / "images" / rel), key_from_path(rel), label[class_id], meta,
                         crop=bbox if crop else None)
        splits["train" if class_id in train_classes else "test"].append(item)
    class_names = [names[c][0] for c in class_ids]
    info = {"source": str(src.resolve()), "image_format": "jpg (crops re-encoded, quality 95)" if crop else "jpg",
            "crop": crop, "protocol": "first half of the classes by id (1-100) train, the rest (101-200) test"}
    for name, items in splits.items():
        check_unique_keys(name, (i.key for i in items), (i.meta["path"] for i in items))
    return [SplitSource(name, class_names, items, encode_image, info) for name, items in splits.items()]

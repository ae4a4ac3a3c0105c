"""DeepFashion In-shop Clothes Retrieval (``list_eval_partition.txt`` and ``img/``).

``--src`` is the benchmark's root: ``list_eval_partition.txt`` there or in ``Eval/``,
images under ``img/`` there or in ``Img/img/`` (the download's own layout). When
``list_bbox_inshop.txt`` is there or in ``Anno/``, each sample's json also has its
bounding box, clothes type and pose type, and ``--crop`` can use the boxes.

Splits are the file's evaluation status: ``train`` (25,882 images of 3,997 items),
``query`` (14,218) and ``gallery`` (12,612), the last two of the same 3,985 items.
Labels are the item ids in sorted order, 0..C-1 over all three splits, so a query and
its gallery matches share a label; class names are the item ids (``id_00000002``).
Keys are the image paths without extension (``img/WOMEN/Dresses/id_00000002/02_1_front``).
Each sample's json has ``path``, ``item_id``, ``evaluation_status``, ``gender`` and
``category`` (from the path) and, with the box file, ``bbox`` [x1, y1, x2 - x1, y2 - y1],
``clothes_type`` and ``pose_type``.
"""

from __future__ import annotations

import argparse
from pathlib import Path, PurePosixPath
from typing import Any

from shards.common import check_unique_keys, first_existing, key_from_path, read_lines, require_src
from shards.images import ImageItem, encode_image
from shards.writer import SplitSource

NAME = "inshop"
VERSION = 1
SPLITS = ("train", "query", "gallery")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("inshop")
    group.add_argument("--crop", action="store_true",
                       help="store each image cropped to its box from list_bbox_inshop.txt")


def read_listing(path: Path, columns: int, header: str) -> list[tuple[int, list[str]]]:
    """DeepFashion's lists: line 1 the count, line 2 the header, then rows (columns split by spaces)."""
    lines = read_lines(path)
    if len(lines) < 2 or not lines[0][1].isdigit() or lines[1][1].split()[0] != header:
        raise ValueError(f"{path}: expected the number of rows on line 1 and a header starting with {header!r} "
                         f"on line 2")
    rows = []
    for number, line in lines[2:]:
        parts = line.split()
        if len(parts) != columns:
            raise ValueError(f"{path}:{number}: expected {columns} columns, got {line!r}")
        rows.append((number, parts))
    if len(rows) != int(lines[0][1]):
        raise ValueError(f"{path}: line 1 says {lines[0][1]} rows but the file has {len(rows)} (damaged or cut short?)")
    return rows


def read_boxes(src: Path) -> dict[str, dict[str, Any]]:
    candidates = [src / "list_bbox_inshop.txt", src / "Anno" / "list_bbox_inshop.txt"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        return {}
    boxes = {}
    for _, (name, clothes, pose, *corners) in read_listing(path, 7, "image_name"):
        x1, y1, x2, y2 = (float(v) for v in corners)
        boxes[name] = {"bbox": [x1, y1, x2 - x1, y2 - y1], "clothes_type": int(clothes), "pose_type": int(pose)}
    return boxes


def image_root(src: Path) -> Path:
    """The folder that holds ``img/``: --src, or --src/Img as in the download."""
    return first_existing([src / "img", src / "Img" / "img"], "the In-shop image folder img/").parent


def sources(args: Any) -> list[SplitSource]:
    src = require_src(args, "In-shop Clothes (list_eval_partition.txt and img/)")
    partition = first_existing([src / "list_eval_partition.txt", src / "Eval" / "list_eval_partition.txt"],
                               "list_eval_partition.txt")
    rows = read_listing(partition, 3, "image_name")
    root, boxes, crop = image_root(src), read_boxes(src), bool(getattr(args, "crop", False))
    if crop and not boxes:
        raise FileNotFoundError(f"--crop needs list_bbox_inshop.txt in {src} or {src / 'Anno'}")
    label = {item: i for i, item in enumerate(sorted({parts[1] for _, parts in rows}))}
    splits: dict[str, list[ImageItem]] = {s: [] for s in SPLITS}
    for number, (rel, item_id, status) in rows:
        if status not in splits:
            raise ValueError(f"{partition}:{number}: evaluation status {status!r} is not one of {', '.join(SPLITS)}")
        parts = PurePosixPath(rel).parts
        meta = {"path": rel, "item_id": item_id, "evaluation_status": status,
                "gender": parts[1] if len(parts) > 3 else "", "category": parts[2] if len(parts) > 3 else "",
                **boxes.get(rel, {})}
        if crop and rel not in boxes:
            raise ValueError(f"--crop: {rel} has no box in list_bbox_inshop.txt")
        bbox = tuple(boxes[rel]["bbox"]) if crop else None
        splits[status].append(ImageItem(str(root / rel), key_from_path(rel), label[item_id], meta, crop=bbox))
    for name, items in splits.items():
        check_unique_keys(name, (i.key for i in items), (i.meta["path"] for i in items))
    info = {"source": str(src.resolve()), "image_format": "jpg (crops re-encoded, quality 95)" if crop else "jpg",
            "crop": crop, "bboxes": bool(boxes), "protocol": "list_eval_partition.txt"}
    names = sorted(label, key=label.__getitem__)
    return [SplitSource(name, names, items, encode_image, info) for name, items in splits.items()]

"""iNaturalist 2018 (``--src`` holds ``train_val2018/<supercategory>/<class_id>/<image>.jpg``).

Splits are named on the command line, in one of two forms:

- lists, ``--list SPLIT=FILE`` (repeated): one image path relative to --src per line
  (``train_val2018/Plantae/5791/abc.jpg``; further columns are ignored). The class is
  the path's last two folders; class names are ``<supercategory>/<class_id>``. This is
  how the seed's L_in / U_in / U_out / test lists are converted, e.g.
  ``--list lin=lin_train_set1.txt --list uin=uin_train_set1.txt --list uout=... --list test=...``;
- with lists, ``--list-rest SPLIT=FILE``: the lines of FILE that no ``--list`` file holds,
  in FILE's order. PSS's U_out is ``uout_train_set1.txt``; its ``train_set1.txt`` is
  L_in, then U_in, then U_out (``test_subg_inat.py`` slices it at ``linsize`` and
  ``linsize + uinsize``), so ``--list-rest uout=train_set1.txt`` gives U_out from
  ``train_set1.txt`` when only that file is at hand;
- annotations, ``--annotations SPLIT=FILE`` (repeated): the official COCO-style files
  (``--annotations train=train2018.json --annotations val=val2018.json``); class names
  are the categories' names. An image with no annotation (test2018.json) gets label -1.

A relative FILE is looked up under --src first, then in the working directory.
Labels are dense, 0..C-1, over the classes of all the requested splits, ordered by
class id (numerically), so every split of one conversion shares them. Splits meant to
be unlabelled (U_in, U_out) keep their true class: it is the held-out ground truth that
clustering is evaluated against; a training config decides whether to use it.

Keys are the image paths without extension, dots made underscores. Each sample's json
has ``path``, ``class_id`` and ``supercategory`` (and ``image_id`` in the annotation
form). ``--max-side N`` downscales images whose longer side exceeds N (JPEG q95); the
others keep their original bytes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path, PurePosixPath
from typing import Any

from shards.common import (check_unique_keys, key_from_path, numeric_first, parse_assignments, read_lines,
                           require_file, require_src, resolve_against)
from shards.images import ImageItem, encode_image
from shards.writer import SplitSource

NAME = "inat2018"
VERSION = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("inat2018")
    group.add_argument("--list", action="append", metavar="SPLIT=FILE",
                       help="a split from a list of image paths (repeat for each split)")
    group.add_argument("--list-rest", action="append", metavar="SPLIT=FILE",
                       help="a split of the lines of FILE that no --list file holds (PSS's U_out: "
                            "--list-rest uout=train_set1.txt)")
    group.add_argument("--annotations", action="append", metavar="SPLIT=FILE",
                       help="a split from an official annotation file such as train2018.json (repeat)")
    group.add_argument("--max-side", type=int, default=None, metavar="N",
                       help="downscale images whose longer side exceeds N pixels (re-encoded as JPEG q95)")


def class_of(rel: str, where: str) -> tuple[str, str]:
    parts = PurePosixPath(rel).parts
    if len(parts) < 3:
        raise ValueError(f"{where}: {rel!r} has no <supercategory>/<class_id>/ folders before the file name")
    return parts[-3], parts[-2]


def from_lists(src: Path, lists: list[tuple[str, Path]],
               rest: tuple[str, Path] | None = None) -> tuple[dict[str, list[tuple]], list[str]]:
    """{split: [(rel, class_key, meta)]} and the class names, from list files (and the rest of one)."""
    rows: dict[str, list[tuple[str, tuple[str, str]]]] = {}
    for split, path in lists:
        lines = read_lines(require_file(path, f"list file of split {split}"))
        rows[split] = [(line.split()[0], class_of(line.split()[0], f"{path}:{n}")) for n, line in lines]
    if rest is not None:
        rows[rest[0]] = rest_of(rest, {rel for split_rows in rows.values() for rel, _ in split_rows})
    classes = sorted({c for split_rows in rows.values() for _, c in split_rows},
                     key=lambda c: (numeric_first(c[1]), c[0]))  # by class id, numerically
    label = {c: i for i, c in enumerate(classes)}
    splits = {split: [(rel, label[c], {"path": rel, "class_id": _id(c[1]), "supercategory": c[0]})
                      for rel, c in split_rows] for split, split_rows in rows.items()}
    return splits, [f"{s}/{c}" for s, c in classes]


def rest_of(rest: tuple[str, Path], listed: set[str]) -> list[tuple[str, tuple[str, str]]]:
    """The rows of the --list-rest file whose path no --list file names."""
    split, path = rest
    lines = read_lines(require_file(path, f"--list-rest file of split {split}"))
    rows = [(line.split()[0], class_of(line.split()[0], f"{path}:{n}")) for n, line in lines
            if line.split()[0] not in listed]
    if not rows:
        raise ValueError(f"--list-rest {split}={path}: every line of it is in a --list file, so split {split} "
                         "would be empty; name the file that holds all the splits (PSS: train_set1.txt)")
    return rows


def _id(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def read_annotation_file(path: Path) -> dict[str, Any]:
    with open(require_file(path, "annotation file"), encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or "images" not in data:
        raise ValueError(f"{path} is not a COCO-style annotation file (no 'images' list)")
    return data


def from_annotations(annotations: list[tuple[str, Path]]) -> tuple[dict[str, list[tuple]], list[str]]:
    """{split: [(rel, label, meta)]} and the class names, from official annotation files."""
    files = {split: read_annotation_file(path) for split, path in annotations}
    categories: dict[int, dict[str, Any]] = {}
    category_of: dict[str, dict[Any, int]] = {}
    for (split, path), data in zip(annotations, files.values()):
        for cat in data.get("categories", []):
            categories.setdefault(cat["id"], cat)
        category_of[split] = {}
        for ann in data.get("annotations", []):
            previous = category_of[split].setdefault(ann["image_id"], ann["category_id"])
            if previous != ann["category_id"]:
                raise ValueError(f"{path}: image {ann['image_id']} is annotated with two categories "
                                 f"({previous} and {ann['category_id']})")
    used = sorted({c for per_split in category_of.values() for c in per_split.values()})
    label = {c: i for i, c in enumerate(used)}
    splits = {}
    for (split, _), data in zip(annotations, files.values()):
        rows = []
        for image in data["images"]:
            rel, cat_id = image["file_name"], category_of[split].get(image["id"])
            cat = categories.get(cat_id, {})
            folders = PurePosixPath(rel).parts
            meta = {"path": rel, "image_id": image["id"], "class_id": cat_id,
                    "supercategory": cat.get("supercategory", folders[-3] if len(folders) >= 3 else "")}
            rows.append((rel, label.get(cat_id, -1), meta))
        splits[split] = rows
    return splits, [str(categories.get(c, {}).get("name", c)) for c in used]


def sources(args: Any) -> list[SplitSource]:
    src = require_src(args, "iNaturalist 2018's images (train_val2018/...)")
    lists = [(s, resolve_against(src, f)) for s, f in parse_assignments(getattr(args, "list", None), "--list")]
    annotations = [(s, resolve_against(src, f))
                   for s, f in parse_assignments(getattr(args, "annotations", None), "--annotations")]
    rests = [(s, resolve_against(src, f))
             for s, f in parse_assignments(getattr(args, "list_rest", None), "--list-rest")]
    if bool(lists) == bool(annotations):
        raise ValueError("name the splits with --list SPLIT=FILE or with --annotations SPLIT=FILE (one form, not both)")
    if len(rests) > 1 or (rests and not lists) or any(s == r for s, _ in lists for r, _ in rests):
        raise ValueError("--list-rest SPLIT=FILE goes with --list, once, with a split name no --list uses "
                         "(e.g. --list lin=lin_train_set1.txt --list uin=uin_train_set1.txt "
                         "--list-rest uout=train_set1.txt)")
    max_side = getattr(args, "max_side", None)
    if max_side is not None and max_side < 1:
        raise ValueError("--max-side must be a positive number of pixels")
    splits, class_names = (from_lists(src, lists, rests[0] if rests else None) if lists
                           else from_annotations(annotations))
    info = {"source": str(src.resolve()),
            "image_format": f"jpg (longer side > {max_side} downscaled, re-encoded q95)" if max_side else "jpg",
            "max_side": max_side,
            "lists" if lists else "annotations": {s: str(p.resolve()) for s, p in (lists or annotations)}}
    if rests:
        info["list_rest"] = {rests[0][0]: str(rests[0][1].resolve())}
    result = []
    for split, rows in splits.items():
        items = [ImageItem(str(src / rel), key_from_path(rel), label, meta, max_side=max_side)
                 for rel, label, meta in rows]
        check_unique_keys(split, (i.key for i in items), (i.meta["path"] for i in items))
        result.append(SplitSource(split, class_names, items, encode_image, info))
    return result

"""A class-per-folder image tree: ``ROOT/<class>/<images>`` (the CBIR seed's catalogues).

Images are the files ending in .jpg, .jpeg, .png or .webp (any case) anywhere inside a
class folder; hidden files and folders (names starting with ".") and other files are
ignored (their number is printed).

Splits:

- if ROOT has a ``train/`` folder and a ``test/`` or ``val/`` folder, each holding class
  folders, those folders are the splits (``train``, ``val``, ``test``, whichever exist);
- otherwise each class's images are split by ``--split`` (default ``train=0.8,test=0.2``,
  any split names, ratios adding up to 1): ``n * ratio`` images per split, rounded by
  largest remainder, and when a class has at least as many images as there are splits,
  every split gets at least one (``shards.common.split_counts``); which images go where
  is chosen by ``--seed`` from their paths (``shards.common.seeded_order``), so adding
  images to one class changes nothing in the others.

Labels are the class folder names in sorted order over all splits (a class folder that
holds no image is not a class). Samples are ordered by class, then path. Keys are the
paths inside the split's folder without extension, dots made underscores
(``shoes/red_01``). Each sample's json has ``path`` (relative to ROOT) and ``class``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from shards.common import IMAGE_SUFFIXES, check_unique_keys, key_from_path, parse_ratios, require_src, seeded_split
from shards.images import ImageItem, encode_image
from shards.writer import SplitSource

NAME = "folder"
VERSION = 1
SPLIT_FOLDERS = ("train", "val", "test")
DEFAULT_SPLIT = "train=0.8,test=0.2"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("folder")
    group.add_argument("--split", default=None, metavar="NAME=RATIO,...",
                       help=f"per-class split when ROOT has no train/ and test/ folders (default {DEFAULT_SPLIT})")
    group.add_argument("--seed", type=int, default=0, help="seed of the per-class split (default 0)")


def scan(root: Path) -> tuple[dict[str, list[str]], int]:
    """{class: sorted image paths relative to root} and the number of other files ignored."""
    classes: dict[str, list[str]] = {}
    ignored = 0
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found = []
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith("."):
                    continue
                if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                    found.append(Path(dirpath, name).relative_to(root).as_posix())
                else:
                    ignored += 1
        if found:
            classes[folder.name] = sorted(found)
    ignored += sum(1 for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    return classes, ignored


def given_splits(src: Path) -> list[str]:
    present = [s for s in SPLIT_FOLDERS if (src / s).is_dir()]
    return present if "train" in present and len(present) > 1 else []


def sources(args: Any) -> list[SplitSource]:
    src = require_src(args, "class folders (ROOT/<class>/<images>)")
    seed, ratios = getattr(args, "seed", 0), getattr(args, "split", None)
    folders = given_splits(src)
    if folders and ratios:
        raise ValueError(f"{src} already has split folders ({', '.join(folders)}); --split is for a tree without them")
    ignored = 0
    splits: dict[str, dict[str, list[str]]] = {}  # split -> class -> paths relative to ROOT
    if folders:
        for split in folders:
            classes, n = scan(src / split)
            ignored += n
            splits[split] = {c: [f"{split}/{p}" for p in paths] for c, paths in classes.items()}
    else:
        pairs = parse_ratios(ratios or DEFAULT_SPLIT)
        classes, ignored = scan(src)
        splits = {name: {} for name, _ in pairs}
        for cls, paths in classes.items():
            for (name, _), part in zip(pairs, seeded_split(paths, [r for _, r in pairs], seed)):
                splits[name][cls] = sorted(part)
    names = sorted({c for per_class in splits.values() for c, paths in per_class.items() if paths})
    if not names:
        raise ValueError(f"{src} holds no images in class folders (ROOT/<class>/*.jpg|jpeg|png|webp)")
    label = {c: i for i, c in enumerate(names)}
    info = {"source": str(src.resolve()), "image_format": "original bytes (jpg, png, webp)",
            "splits_from": "folders" if folders else "ratios", "split_ratios": None if folders else (ratios or DEFAULT_SPLIT),
            "seed": None if folders else seed}
    if ignored:  # not in info: an added README must not make a rerun rewrite every shard
        print(f"folder: ignored {ignored} files that are not .jpg/.jpeg/.png/.webp images")
    result = []
    for split, per_class in splits.items():
        prefix = f"{split}/" if folders else ""
        items = [ImageItem(str(src / p), key_from_path(p[len(prefix):]), label[c], {"path": p, "class": c})
                 for c in names for p in per_class.get(c, [])]
        check_unique_keys(split, (i.key for i in items), (i.meta["path"] for i in items))
        result.append(SplitSource(split, names, items, encode_image, info))
    return result

"""The Sketchy database, rendered layout: ``photo/tx_000000000000/<category>/<photo_id>.jpg``
and ``sketch/tx_000000000000/<category>/<photo_id>-<n>.png`` (the ``tx_...`` level, which
names the augmentation, may be absent; ``--variant`` picks another one).

Splits ``train`` and ``test``, each holding both modalities: the PHOTOS of each category
are split, and every sketch follows the photo it was drawn from. The test photos are

- ``--test-list FILE``: the photo ids listed, one per line (``n02691156_10151``; a
  ``<category>/`` prefix and an extension are allowed), or else
- per category, ``--test-ratio`` (default 0.1) of its photos, rounded as in
  ``shards.common.split_counts`` (at least one on each side when a category has two
  photos), chosen by ``--seed`` through ``shards.common.seeded_order`` of the photo ids.

``--modality-splits`` writes each split's photos and sketches apart instead:
``train_photo``, ``train_sketch``, ``test_photo``, ``test_sketch``; a sketch-retrieval
experiment trains on both train splits (its triplet sampler reads the modality from the
key) and searches ``test_sketch`` queries against the ``test_photo`` database.

The sketch seed's own protocol (vitasoftAI/ImageRetrievalResearch, ``data_split`` with
``hard_split=False``, and its dataset) needs three more options:

- ``--val-ratio R``: a ``val`` split of photos too (per category, like test);
- ``--counts floor1``: val and test each take ``max(int(n * ratio), 1)`` of a category's n
  photos (in seeded order: val first, then test) and train the rest; a category too small
  to give every split one photo goes whole into every split. The default ``remainder``
  rounds as ``shards.common.split_counts``;
- ``--sketches shared`` (with ``--modality-splits``): the sketches are not split; one
  ``sketch`` split holds all of them, because the seed draws every triple's positive and
  negative from all the sketches, in training and evaluation alike. The photo splits are
  ``train_photo``, ``val_photo``, ``test_photo``: photo queries, sketch gallery.

``--val-ratio 0.1 --test-ratio 0.1 --counts floor1 --modality-splits --sketches shared``
is the seed's split, up to its unseeded shuffle (here ``--seed``).

Labels are the categories in sorted order (class names are the category folders), the
same in both splits. Samples come per category: its photos (by id), then its sketches
(by photo id, then n). Keys are the paths without the ``tx_...`` level and extension
(``photo/airplane/n02691156_10151``, ``sketch/airplane/n02691156_10151-1``). Each
sample's json has ``path`` (from --src, with the ``tx_...`` level), ``modality``
(``photo``/``sketch``), ``category``, ``photo_id`` (for a sketch: the photo it was drawn
from) and, for sketches, ``sketch_index`` (the n of ``-<n>``).
"""

from __future__ import annotations

import argparse
from fractions import Fraction
from pathlib import Path, PurePosixPath
from typing import Any

from shards.common import (check_unique_keys, key_from_path, read_lines, require_file, require_src, resolve_against,
                           seeded_order, seeded_split)
from shards.images import ImageItem, encode_image
from shards.writer import SplitSource

NAME = "sketchy"
VERSION = 1
VARIANT = "tx_000000000000"
SUFFIXES = (".jpg", ".jpeg", ".png")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sketchy")
    group.add_argument("--test-ratio", type=float, default=0.1, help="fraction of each category's photos in test")
    group.add_argument("--seed", type=int, default=0, help="seed of the photo split (default 0)")
    group.add_argument("--test-list", default=None, metavar="FILE", help="photo ids of the test split, one per line")
    group.add_argument("--variant", default=VARIANT, help=f"the rendered augmentation folder (default {VARIANT})")
    group.add_argument("--modality-splits", action="store_true",
                       help="write train_photo, train_sketch, test_photo, test_sketch instead of mixed train/test")
    group.add_argument("--val-ratio", type=float, default=0.0, help="fraction of each category's photos in val")
    group.add_argument("--counts", choices=("remainder", "floor1"), default="remainder",
                       help="photos per split: largest remainder (default) or the sketch seed's max(int(n*r), 1)")
    group.add_argument("--sketches", choices=("follow", "shared"), default="follow",
                       help="sketches follow their photo's split (default), or all go to one 'sketch' split")


def modality_root(src: Path, modality: str, variant: str) -> Path:
    base = src / modality
    if not base.is_dir():
        raise FileNotFoundError(f"Sketchy folder {base} not found (expected {modality}/{variant}/<category>/...)")
    if (base / variant).is_dir():
        return base / variant
    others = sorted(p.name for p in base.iterdir() if p.is_dir() and p.name.startswith("tx_"))
    if others:
        raise FileNotFoundError(f"{base / variant} not found; {base} has {', '.join(others)}: pick one with --variant")
    return base


def images_in(root: Path) -> list[tuple[str, str]]:
    """(category, file name) of the image files in ``root/<category>/``, sorted."""
    found = []
    for category in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found += [(category.name, f.name) for f in sorted(category.iterdir())
                  if f.suffix.lower() in SUFFIXES and not f.name.startswith(".")]
    return found


def photo_of_sketch(name: str, where: Path) -> tuple[str, int]:
    photo_id, sep, n = PurePosixPath(name).stem.rpartition("-")
    if not sep or not n.isdigit():
        raise ValueError(f"sketch {where / name}: the name should be <photo_id>-<n>.png")
    return photo_id, int(n)


def photo_splits(args: Any, src: Path, photos: dict[str, list[str]]) -> dict[tuple[str, str], tuple[str, ...]]:
    """The split(s) of each (category, photo id): train, val or test (all three for a category
    that --counts floor1 cannot divide)."""
    val = Fraction(str(getattr(args, "val_ratio", 0.0)))
    if getattr(args, "test_list", None):
        if val:
            raise ValueError("--val-ratio works with --test-ratio, not --test-list; give the val photos by ratio "
                             "and the test photos by ratio, or leave --val-ratio out")
        test = listed_photos(resolve_against(src, args.test_list), photos)
        return {(c, p): ("test",) if (c, p) in test else ("train",) for c, ids in photos.items() for p in ids}
    ratio = Fraction(str(getattr(args, "test_ratio", 0.1)))
    if not (0 <= ratio < 1 and 0 <= val < 1 and ratio + val < 1):
        raise ValueError("--test-ratio and --val-ratio must be in [0, 1) and add up to less than 1")
    seed, counts = getattr(args, "seed", 0), getattr(args, "counts", "remainder")
    out: dict[tuple[str, str], tuple[str, ...]] = {}
    for category, ids in photos.items():
        for split, members in category_split(ids, val, ratio, counts, seed).items():
            for p in members:
                out[(category, p)] = out.get((category, p), ()) + (split,)
    return out


def category_split(ids: list[str], val: Fraction, test: Fraction, counts: str, seed: int) -> dict[str, list[str]]:
    """One category's photos per split, in seeded order."""
    if counts == "floor1":
        order = seeded_order(ids, seed)
        n_val, n_test = (max(int(len(order) * float(r)), 1) if r else 0 for r in (val, test))
        if len(order) - n_val - n_test <= 0:  # as the seed does: the whole category in every split
            return {"train": order, **({"val": order} if val else {}), **({"test": order} if test else {})}
        return {"train": order[n_val + n_test:], "val": order[:n_val], "test": order[n_val:n_val + n_test]}
    if not val:  # the two-way split exactly as before --val-ratio existed
        train, chosen = seeded_split(ids, [1 - test, test], seed)
        return {"train": train, "test": chosen}
    train, chosen_val, chosen = seeded_split(ids, [1 - val - test, val, test], seed)
    return {"train": train, "val": chosen_val, "test": chosen}


def listed_photos(path: Path, photos: dict[str, list[str]]) -> set[tuple[str, str]]:
    where = {p: c for c, ids in photos.items() for p in ids}
    chosen, unknown = set(), []
    for _, line in read_lines(require_file(path, "--test-list file")):
        entry = PurePosixPath(line.split()[0])
        photo_id = entry.stem if entry.suffix.lower() in SUFFIXES else entry.name
        category = entry.parent.name or where.get(photo_id)
        if category is None or photo_id not in photos.get(category, ()):
            unknown.append(line)
        else:
            chosen.add((category, photo_id))
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} photo ids are not among the photos, e.g. {', '.join(unknown[:3])}")
    return chosen


def sample_rows(photo_files: list[tuple[str, str]], sketch_files: list[tuple[str, str]], sketch_root: Path,
                categories: list[str]) -> list[tuple[str, str, str, str, int | None]]:
    """(modality, category, file name, photo id, sketch n) per image, in sample order."""
    photos = {(c, PurePosixPath(n).stem) for c, n in photo_files}
    rows: list[tuple[str, str, str, str, int | None]] = [("photo", c, n, PurePosixPath(n).stem, None)
                                                         for c, n in photo_files]
    orphans = []
    for category, name in sketch_files:
        photo_id, index = photo_of_sketch(name, sketch_root / category)
        if (category, photo_id) not in photos:
            orphans.append(f"{category}/{name}")
        rows.append(("sketch", category, name, photo_id, index))
    if orphans:
        raise ValueError(f"{len(orphans)} sketches have no photo to follow into a split, e.g. {', '.join(orphans[:3])}")
    order = {c: i for i, c in enumerate(categories)}
    return sorted(rows, key=lambda r: (order[r[1]], r[0] != "photo", r[3], r[4] or 0, r[2]))


def sources(args: Any) -> list[SplitSource]:
    src = require_src(args, "Sketchy (photo/ and sketch/)")
    variant = getattr(args, "variant", VARIANT)
    roots = {m: modality_root(src, m, variant) for m in ("photo", "sketch")}
    photo_files, sketch_files = images_in(roots["photo"]), images_in(roots["sketch"])
    photos: dict[str, list[str]] = {}
    for category, name in photo_files:
        photos.setdefault(category, []).append(PurePosixPath(name).stem)
    assigned = photo_splits(args, src, photos)
    categories = sorted(set(photos) | {c for c, _ in sketch_files})
    label = {c: i for i, c in enumerate(categories)}
    splits: dict[str, list[ImageItem]] = {name: [] for name in split_names(args)}
    rows = sample_rows(photo_files, sketch_files, roots["sketch"], categories)
    for modality, category, name, photo_id, index in rows:
        path = roots[modality] / category / name
        meta = {"path": path.relative_to(src).as_posix(), "modality": modality, "category": category,
                "photo_id": photo_id, **({"sketch_index": index} if index is not None else {})}
        item = ImageItem(str(path), key_from_path(f"{modality}/{category}/{name}"), label[category], meta)
        for split in target_splits(args, modality, assigned[(category, photo_id)]):
            splits[split].append(item)
    for name, items in splits.items():
        check_unique_keys(name, (i.key for i in items), (i.meta["path"] for i in items))
    info = split_info(args, src, variant if roots["photo"].name == variant else None)
    return [SplitSource(name, categories, items, encode_image, info) for name, items in splits.items()]


def split_names(args: Any) -> list[str]:
    parts = ["train"] + (["val"] if getattr(args, "val_ratio", 0.0) else []) + ["test"]
    if getattr(args, "sketches", "follow") == "shared":
        if not getattr(args, "modality_splits", False):
            raise ValueError("--sketches shared writes one 'sketch' split beside the photo splits; "
                             "it needs --modality-splits")
        return [f"{p}_photo" for p in parts] + ["sketch"]
    if getattr(args, "modality_splits", False):
        return [f"{p}_{m}" for p in parts for m in ("photo", "sketch")]
    return parts


def target_splits(args: Any, modality: str, assigned: tuple[str, ...]) -> list[str]:
    """The splits an image goes to: its photo's (a sketch follows its photo), or the shared sketch split."""
    if modality == "sketch" and getattr(args, "sketches", "follow") == "shared":
        return ["sketch"]
    if getattr(args, "modality_splits", False):
        return [f"{s}_{modality}" for s in assigned]
    return list(assigned)


def split_info(args: Any, src: Path, variant: str | None) -> dict[str, Any]:
    test_list = getattr(args, "test_list", None)
    info = {"source": str(src.resolve()), "image_format": "jpg photos, png sketches (original bytes)",
            "variant": variant,
            "test_list": str(resolve_against(src, test_list).resolve()) if test_list else None,
            "test_ratio": None if test_list else getattr(args, "test_ratio", 0.1),
            "seed": None if test_list else getattr(args, "seed", 0)}
    # recorded only when used, so that shards written before these options stay current
    extra = {"val_ratio": getattr(args, "val_ratio", 0.0), "counts": getattr(args, "counts", "remainder"),
             "sketches": getattr(args, "sketches", "follow")}
    return {**info, **{k: v for k, v in extra.items() if v not in (0.0, "remainder", "follow")}}

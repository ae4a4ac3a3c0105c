"""Stanford Cars (Cars196), the combined devkit file ``cars_annos.mat`` with ``car_ims/``.

The metric-learning protocol of unseen classes: the first half of the classes by id
(1-98) is ``train``, the second half (99-196) is ``test``, searched against itself.
The file's own train/test flag is recorded in each sample's json (``official_split``)
but not used.

Labels are the class ids in order, 0..195, one mapping for both splits; class names
come from the file's ``class_names`` (``AM General Hummer SUV 2000``). Keys are the
image paths without extension (``car_ims/000001``). Each sample's json has ``path``,
``class_id``, ``official_split`` and ``bbox`` [x1, y1, x2 - x1, y2 - y1] in the file's
pixel coordinates, as the common metric-learning code crops them (no shift for MATLAB's
1-based indices). ``--crop`` stores the bounding-box crop (JPEG q95).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from shards.common import check_unique_keys, key_from_path, require_file, require_src, resolve_against
from shards.images import ImageItem, encode_image
from shards.writer import SplitSource

NAME = "cars196"
VERSION = 1
FIELDS = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cars196")
    group.add_argument("--crop", action="store_true", help="store each image cropped to its bounding box")
    group.add_argument("--annotations", default="cars_annos.mat", metavar="FILE",
                       help="the annotation file, relative to --src (default cars_annos.mat)")


def scalar(value: Any) -> Any:
    """Unwrap scipy.io.loadmat's nesting: a MATLAB scalar or string arrives as a 1x1 (or 1-element) array."""
    while isinstance(value, np.ndarray):
        if value.size != 1:
            raise ValueError(f"expected a single value, got an array of shape {value.shape}")
        value = value.reshape(-1)[0]
    return value.item() if isinstance(value, np.generic) else value


def load_annotations(path: Path) -> tuple[list[dict[str, Any]], list[str] | None]:
    require_file(path, "Stanford Cars annotation file")
    try:
        from scipy.io import loadmat  # the only reader of MATLAB files here; scikit-learn brings it too
    except ImportError:
        raise ValueError("reading cars_annos.mat needs scipy: pip install scipy") from None
    mat = loadmat(path)
    if "annotations" not in mat:
        raise ValueError(f"{path} has no 'annotations' struct array (keys: {', '.join(k for k in mat if k[0] != '_')})")
    records = mat["annotations"].reshape(-1)  # a 1 x N struct array
    missing = [f for f in FIELDS if f not in (records.dtype.names or ())]
    if missing:
        raise ValueError(f"{path}: the annotations lack the fields {', '.join(missing)}")
    rows = [{f: scalar(r[f]) for f in FIELDS} for r in records]
    names = [str(scalar(n)) for n in mat["class_names"].reshape(-1)] if "class_names" in mat else None
    return rows, names


def sources(args: Any) -> list[SplitSource]:
    src = require_src(args, "Stanford Cars (cars_annos.mat and car_ims/)")
    annotations = resolve_against(src, getattr(args, "annotations", "cars_annos.mat"))
    rows, names = load_annotations(annotations)
    class_ids = sorted({int(r["class"]) for r in rows} | set(range(1, len(names or []) + 1)))
    label = {c: i for i, c in enumerate(class_ids)}
    train_classes = set(class_ids[: len(class_ids) // 2])
    crop = bool(getattr(args, "crop", False))
    splits: dict[str, list[ImageItem]] = {"train": [], "test": []}
    for row in rows:
        rel, class_id = str(row["relative_im_path"]), int(row["class"])
        x1, y1, x2, y2 = (float(row[f"bbox_{c}"]) for c in ("x1", "y1", "x2", "y2"))
        bbox = (x1, y1, x2 - x1, y2 - y1)
        meta = {"path": rel, "class_id": class_id, "official_split": "test" if int(row["test"]) else "train",
                "bbox": list(bbox)}
        item = ImageItem(str(src / rel), key_from_path(rel), label[class_id], meta, crop=bbox if crop else None)
        splits["train" if class_id in train_classes else "test"].append(item)
    class_names = [names[c - 1] if names and c <= len(names) else str(c) for c in class_ids]
    info = {"source": str(src.resolve()), "annotations": str(annotations.resolve()),
            "image_format": "jpg (crops re-encoded, quality 95)" if crop else "jpg", "crop": crop,
            "protocol": "first half of the classes by id (1-98) train, the rest (99-196) test"}
    for name, items in splits.items():
        check_unique_keys(name, (i.key for i in items), (i.meta["path"] for i in items))
    return [SplitSource(name, class_names, items, encode_image, info) for name, items in splits.items()]

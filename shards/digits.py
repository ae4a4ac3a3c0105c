"""The shipped dataset: scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes).

It lies inside the scikit-learn package, so nothing is downloaded. The protocol is
the metric-learning one of unseen classes:

- ``train``: every image of digits 0-4 (901 images);
- ``query``: digits 5-9, every fifth image of each class in dataset order (181);
- ``database``: the other images of digits 5-9 (715).

Images are upscaled from 8x8 to 32x32 (bicubic) and stored as greyscale PNG.
Labels are the digits themselves, so class names are "0" ... "9" in every split.
"""

from __future__ import annotations

import argparse
import io
from typing import Any

import numpy as np

from shards.writer import Sample, SplitSource

NAME = "digits"
VERSION = 1
SIZE = 32
TRAIN_DIGITS = range(0, 5)
QUERY_EVERY = 5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, default=SIZE, help="side of the upscaled images (default 32)")


def encode(item: tuple[int, int, np.ndarray, int]) -> Sample:
    from PIL import Image

    index, digit, pixels, size = item
    grey = Image.fromarray((pixels * (255.0 / 16.0)).round().astype(np.uint8), mode="L")
    buf = io.BytesIO()
    grey.resize((size, size), Image.Resampling.BICUBIC).save(buf, format="PNG")
    return Sample(key=f"digits_{index:04d}", label=digit, image=buf.getvalue(), ext="png",
                  meta={"digit": digit, "source_index": index})


def split_of(digit: int, rank_in_class: int) -> str:
    if digit in TRAIN_DIGITS:
        return "train"
    return "query" if rank_in_class % QUERY_EVERY == 0 else "database"


def sources(args: Any) -> list[SplitSource]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    size = getattr(args, "size", SIZE)
    splits: dict[str, list] = {"train": [], "query": [], "database": []}
    seen = np.zeros(10, dtype=int)
    for index, (pixels, digit) in enumerate(zip(digits.images, digits.target)):
        digit = int(digit)
        splits[split_of(digit, seen[digit])].append((index, digit, pixels, size))
        seen[digit] += 1
    names = [str(d) for d in range(10)]
    info = {"source": "sklearn.datasets.load_digits", "image_format": "png", "image_size": size}
    return [SplitSource(name, names, items, encode, info) for name, items in splits.items()]

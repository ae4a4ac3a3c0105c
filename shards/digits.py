"""The shipped dataset: scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes).

It lies inside the scikit-learn package, so nothing is downloaded. Two protocols:

``--protocol unseen`` (default; digits_demo), the metric-learning one of unseen classes:

- ``train``: every image of digits 0-4 (901 images);
- ``query``: digits 5-9, every fifth image of each class in dataset order (181);
- ``database``: the other images of digits 5-9 (715).

``--protocol loop`` (the digits_loop experiments, a small twin of the iNaturalist
cluster-finetune loop), over all ten digits:

- ``lab``: the first 8 images of each digit, labelled (80);
- ``test``: of each digit's remaining images, every fifth in dataset order, held out (347);
- ``unl``: the rest, unlabelled for training; their true digits stay in the shards as
  held-out ground truth for measuring clustering quality (1,370).

``--protocol open`` (the digits_open experiments: the loop in the open world, like
PSS's U = U_in + U_out), with digits 8 and 9 never labelled:

- ``lab``: the first 8 images of each of the digits 0-7 (64);
- ``test``: the same held-out images as the loop protocol's, over all ten digits (347);
- ``uin``: the other images of digits 0-7, unlabelled (1,101; the loop's ``unl`` for 0-7);
- ``uout``: the other images of digits 8 and 9, unlabelled, of classes no labelled
  image shows (285).

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


LABELLED_PER_CLASS = 8
OPEN_DIGITS = range(8, 10)  # the open protocol's out-of-distribution classes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, default=SIZE, help="side of the upscaled images (default 32)")
    parser.add_argument("--protocol", choices=("unseen", "loop", "open"), default="unseen",
                        help="unseen: train 0-4, retrieve 5-9 (digits_demo); loop: labelled/unlabelled/test "
                             "over all digits (digits_loop_iter*); open: loop with digits 8-9 unlabelled only, "
                             "as split uout (digits_open_iter*)")


def encode(item: tuple[int, int, np.ndarray, int]) -> Sample:
    from PIL import Image

    index, digit, pixels, size = item
    grey = Image.fromarray((pixels * (255.0 / 16.0)).round().astype(np.uint8), mode="L")
    buf = io.BytesIO()
    grey.resize((size, size), Image.Resampling.BICUBIC).save(buf, format="PNG")
    return Sample(key=f"digits_{index:04d}", label=digit, image=buf.getvalue(), ext="png",
                  meta={"digit": digit, "source_index": index})


def split_of(digit: int, rank_in_class: int, protocol: str = "unseen") -> str:
    if protocol == "open":
        loop = split_of(digit, rank_in_class, "loop")
        if loop == "test":
            return loop
        return "uout" if digit in OPEN_DIGITS else "lab" if loop == "lab" else "uin"
    if protocol == "loop":
        if rank_in_class < LABELLED_PER_CLASS:
            return "lab"
        return "test" if (rank_in_class - LABELLED_PER_CLASS) % QUERY_EVERY == 0 else "unl"
    if digit in TRAIN_DIGITS:
        return "train"
    return "query" if rank_in_class % QUERY_EVERY == 0 else "database"


def sources(args: Any) -> list[SplitSource]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    size = getattr(args, "size", SIZE)
    protocol = getattr(args, "protocol", "unseen")
    names = {"loop": ("lab", "unl", "test"), "open": ("lab", "uin", "uout", "test")}.get(
        protocol, ("train", "query", "database"))
    splits: dict[str, list] = {name: [] for name in names}
    seen = np.zeros(10, dtype=int)
    for index, (pixels, digit) in enumerate(zip(digits.images, digits.target)):
        digit = int(digit)
        splits[split_of(digit, seen[digit], protocol)].append((index, digit, pixels, size))
        seen[digit] += 1
    names = [str(d) for d in range(10)]
    info = {"source": "sklearn.datasets.load_digits", "image_format": "png", "image_size": size}
    if protocol != "unseen":  # recorded only when not the default, so older digits shards stay valid
        info["protocol"] = protocol
    return [SplitSource(name, names, items, encode, info) for name, items in splits.items()]

"""Training-loader throughput: imret's P x K loader over shards vs torchvision ImageFolder.

Both read the same JPEG files (the shards hold the very bytes of the ImageFolder tree),
apply the same timm training transform at 224 px, with the same batch size and the
same number of workers, in the same process, alternating A B A B so that machine load
affects both alike. Prints images/s of each and the ratio imret / ImageFolder.

    python bench/loader.py [--images 1500] [--workers 2] [--batches 20] [--rounds 2]
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from shards.writer import Sample, SplitSource, write_split


def make_images(folder: Path, num_images: int, classes: int, seed: int = 0) -> list[tuple[str, int, Path]]:
    """Smooth random images (JPEG sizes like photos', ~15-25 kB at 256 px) in class folders."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(num_images):
        c = i % classes
        low = rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((256, 256), Image.Resampling.BICUBIC)
        noise = rng.integers(-12, 12, size=(256, 256, 3))
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.int64) + noise, 0, 255).astype(np.uint8))
        path = folder / f"class{c:03d}" / f"img{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=90)
        items.append((f"class{c:03d}/img{i:05d}", c, path))
    return items


def keep_jpeg(item: tuple[str, int, Path]) -> Sample:
    key, label, path = item
    return Sample(key=key, label=label, image=path.read_bytes(), ext="jpg")


def imret_loader(shard_root: Path, batch: int, workers: int) -> torch.utils.data.DataLoader:
    from imret.config import from_dict
    from imret.data.loader import TrainData
    from imret.distributed import DistInfo

    cfg = from_dict({"data": {"root": str(shard_root), "image_size": 224, "batch_size": batch,
                              "samples_per_class": 4, "num_workers": workers, "augment": "crop_flip"},
                     "model": {"backbone": "resnet50"}}, "bench")
    return TrainData(cfg, DistInfo()).epoch(0)


def folder_loader(folder: Path, batch: int, workers: int) -> torch.utils.data.DataLoader:
    import torchvision

    from imret.config import DataConfig
    from imret.data.transforms import train_transform

    transform = train_transform(DataConfig(image_size=224, augment="crop_flip"), "resnet50")
    dataset = torchvision.datasets.ImageFolder(str(folder), transform=transform)
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                       generator=torch.Generator().manual_seed(0), persistent_workers=workers > 0)


def images_per_second(loader: torch.utils.data.DataLoader, batches: int, warmup: int = 2) -> float:
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    count = 0
    for _ in range(batches):
        count += len(next(it)[0])
    return count / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1500)
    p.add_argument("--classes", type=int, default=30)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=20, help="timed batches per measurement")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder, shard_root = Path(tmp) / "folder", Path(tmp) / "shards"
        items = make_images(folder, args.images, args.classes)
        write_split(SplitSource("train", [f"class{c:03d}" for c in range(args.classes)], items, keep_jpeg),
                    shard_root, dataset="bench", converter_version=1, progress=False)
        ours, theirs = [], []
        for _ in range(args.rounds):
            ours.append(images_per_second(imret_loader(shard_root, args.batch, args.workers), args.batches))
            theirs.append(images_per_second(folder_loader(folder, args.batch, args.workers), args.batches))
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch thread(s), {args.workers} workers, "
          f"batch {args.batch}, 224 px, {args.images} JPEGs (256 px)")
    print(f"imret P x K loader over shards : {a:8.1f} images/s  (rounds: {', '.join(f'{x:.1f}' for x in ours)})")
    print(f"torchvision ImageFolder        : {b:8.1f} images/s  (rounds: {', '.join(f'{x:.1f}' for x in theirs)})")
    print(f"ratio imret / ImageFolder      : {a / b:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

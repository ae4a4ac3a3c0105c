"""Training-loader throughput: imret's P x K loader over shards vs torchvision ImageFolder.

All loaders read the same JPEG files (the shards hold the very bytes of the ImageFolder
tree) and apply the same timm training transform at 224 px (random resized crop + flip),
with the same batch size and the same number of workers. Three loaders are measured:

- imret, decoding JPEGs at reduced size where the crop allows (the default);
- imret with ``reduced_decode=False``: every JPEG decoded in full, as before;
- torchvision ``ImageFolder`` (PIL's full decode), the baseline.

They run in the same process in rotating order (A B C, B C A, C A B, ...) so that machine
load affects all alike. Each case prints, as medians over rounds, images per wall-clock
second, images per CPU-second (the per-core rate: CPU time of the workers and the main
process together, steadier than wall time on a shared machine), each loader's peak RSS per
worker process, and the medians of the per-round ratios.

Two cases: 256-px JPEGs, where the reduced decode cannot apply (a crop of a 256-px image is
never twice the 224-px output), and 800-px JPEGs, the size of iNaturalist's images.

    python bench/loader.py [--sizes 256 800] [--images 1500] [--workers 2] [--batches 20] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from shards.writer import Sample, SplitSource, write_split

LOADERS = ("imret", "imret_full", "folder")
LABELS = {
    "imret": "imret P x K, reduced decode",
    "imret_full": "imret P x K, full decode",
    "folder": "torchvision ImageFolder",
}


def image_shape(i: int, size: int) -> tuple[int, int]:
    """(width, height): square at 256 px; at larger sizes, landscape, portrait and square as in photo sets."""
    if size <= 256:
        return size, size
    short = [size * 3 // 4, size * 2 // 3, size][i % 3]
    return (size, short) if i % 2 == 0 else (short, size)


def make_images(folder: Path, num_images: int, classes: int, size: int, seed: int = 0) -> list[tuple[str, int, Path]]:
    """Smooth random images with pixel noise, whose JPEGs are the size of photos' (~20 kB at 256 px,
    ~130 kB at 800 x 600), in class folders."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(num_images):
        c = i % classes
        width, height = image_shape(i, size)
        low = rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((width, height), Image.Resampling.BICUBIC)
        noise = rng.integers(-12, 12, size=(height, width, 3))
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.int64) + noise, 0, 255).astype(np.uint8))
        path = folder / f"class{c:03d}" / f"img{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=90)
        items.append((f"class{c:03d}/img{i:05d}", c, path))
    return items


def keep_jpeg(item: tuple[str, int, Path]) -> Sample:
    key, label, path = item
    return Sample(key=key, label=label, image=path.read_bytes(), ext="jpg")


def imret_loader(shard_root: Path, batch: int, workers: int, reduced: bool) -> torch.utils.data.DataLoader:
    from imret.config import from_dict
    from imret.data.loader import TrainData
    from imret.distributed import DistInfo

    cfg = from_dict({"data": {"root": str(shard_root), "image_size": 224, "batch_size": batch,
                              "samples_per_class": 4, "num_workers": workers, "augment": "crop_flip"},
                     "model": {"backbone": "resnet50"}}, "bench")
    return TrainData(cfg, DistInfo(), reduced_decode=reduced).epoch(0)


def folder_loader(folder: Path, batch: int, workers: int) -> torch.utils.data.DataLoader:
    import torchvision

    from imret.config import DataConfig
    from imret.data.transforms import train_transform

    transform = train_transform(DataConfig(image_size=224, augment="crop_flip"), "resnet50")
    dataset = torchvision.datasets.ImageFolder(str(folder), transform=transform)
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                       generator=torch.Generator().manual_seed(0), persistent_workers=workers > 0)


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (VmHWM), shared pages inherited from the parent included."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def measure(loader: torch.utils.data.DataLoader, batches: int, warmup: int = 2) -> dict[str, float]:
    """Over ``batches`` batches after ``warmup``: images per wall-clock second, images per CPU second
    (workers and main process together), and the largest peak RSS of a worker in MB.

    The machine is shared, so wall-clock rates move with other people's load; CPU time per
    image moves much less, which makes images per CPU second the steadier per-core figure.
    """
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    pids = [w.pid for w in getattr(it, "_workers", [])]  # the worker processes of a multi-process iterator
    cpu0, start = sum(map(cpu_seconds, pids)) + time.process_time(), time.perf_counter()
    count = 0
    for _ in range(batches):
        count += len(next(it)[0])
    wall = time.perf_counter() - start
    cpu = sum(map(cpu_seconds, pids)) + time.process_time() - cpu0
    rss = max(map(peak_rss_mb, pids), default=peak_rss_mb(os.getpid()))
    del it, loader  # ends the persistent workers before the next loader starts its own
    return {"rate": count / wall, "per_cpu": count / cpu, "rss": rss}


def run_case(size: int, args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """Write the images and the shards for one image size, then measure every loader ``args.rounds`` times."""
    with tempfile.TemporaryDirectory() as tmp:
        folder, shard_root = Path(tmp) / "folder", Path(tmp) / "shards"
        items = make_images(folder, args.images, args.classes, size)
        write_split(SplitSource("train", [f"class{c:03d}" for c in range(args.classes)], items, keep_jpeg),
                    shard_root, dataset="bench", converter_version=1, progress=False)
        make: dict[str, Callable[[], torch.utils.data.DataLoader]] = {
            "imret": lambda: imret_loader(shard_root, args.batch, args.workers, reduced=True),
            "imret_full": lambda: imret_loader(shard_root, args.batch, args.workers, reduced=False),
            "folder": lambda: folder_loader(folder, args.batch, args.workers),
        }
        results: dict[str, dict[str, list[float]]] = {name: {} for name in LOADERS}
        for r in range(args.rounds):
            for name in LOADERS[r % 3:] + LOADERS[: r % 3]:  # rotate who goes first
                for key, value in measure(make[name](), args.batches).items():
                    results[name].setdefault(key, []).append(value)
    return results


def rounds(values: list[float]) -> str:
    return ", ".join(f"{x:.1f}" for x in values)


def report(size: int, results: dict[str, dict[str, list[float]]]) -> None:
    print(f"\n{size}-px JPEGs")
    for name in LOADERS:
        r = results[name]
        print(f"  {LABELS[name]:<28}: {statistics.median(r['rate']):6.1f} images/s, "
              f"{statistics.median(r['per_cpu']):6.1f} images per CPU-second, "
              f"peak RSS/worker {statistics.median(r['rss']):4.0f} MB")
        print(f"  {'':<28}  rounds: {rounds(r['rate'])} images/s; {rounds(r['per_cpu'])} per CPU-s")
    for a, b in (("imret", "folder"), ("imret_full", "folder"), ("imret", "imret_full")):
        wall = [x / y for x, y in zip(results[a]["rate"], results[b]["rate"])]
        cpu = [x / y for x, y in zip(results[a]["per_cpu"], results[b]["per_cpu"])]
        print(f"  ratio {a + ' / ' + b:<22}: {statistics.median(wall):5.2f} images/s, "
              f"{statistics.median(cpu):5.2f} per CPU-s  (rounds: {', '.join(f'{x:.2f}' for x in wall)}; "
              f"{', '.join(f'{x:.2f}' for x in cpu)})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 800], help="longer side of the JPEGs, one case each")
    p.add_argument("--images", type=int, default=1500)
    p.add_argument("--classes", type=int, default=30)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=20, help="timed batches per measurement")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, "
          f"{torch.get_num_threads()} torch thread(s), {args.workers} workers, batch {args.batch}, "
          f"224-px crops, {args.images} JPEGs per case, {args.rounds} rounds")
    for size in args.sizes:
        report(size, run_case(size, args))
    print(f"load at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

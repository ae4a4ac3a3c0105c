"""Writing one split as WebDataset shards, resumably.

Layout (read by ``imret.data.shards``)::

    <out>/<split>/<split>-000000.tar       samples: <key>.<img>, <key>.cls, <key>.json
    <out>/<split>/<split>-000000.idx.npz   keys, labels and byte ranges of that shard
    <out>/<split>/manifest.json            written last: the split is complete

A shard is written under a temporary name and renamed into place when full, then its
index is written beside it; a shard counts as finished only when both exist. An
interrupted write therefore leaves no half-written shard under a final name, and a
rerun keeps the finished shards and continues with the next sample: converters yield
their samples in a fixed order, so the first finished shards always hold the first
samples.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from tqdm import tqdm

DEFAULT_SHARD_BYTES = 256 * 1024 * 1024  # WebDataset's guidance: shards of 100 MB to 1 GB


@dataclass
class Sample:
    """One encoded sample, ready to write."""

    key: str  # unique in the split, no dots (WebDataset splits key and extension at the first dot)
    label: int
    image: bytes
    ext: str  # image format: png, jpg
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class SplitSource:
    """What a converter hands the writer for one split."""

    name: str
    class_names: list[str]
    items: list[Any]  # converter-specific descriptions of each sample, in a fixed order
    encode: Callable[[Any], Sample]  # turns an item into a Sample (runs in worker processes)
    info: dict[str, Any] = field(default_factory=dict)  # recorded in the manifest (source, options)


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def index_tar(path: Path, labels: dict[str, int]) -> dict[str, np.ndarray]:
    """Each sample's byte range [start, end) inside a finished tar, in file order."""
    ranges: dict[str, list[int]] = {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            key = os.path.basename(member.name).partition(".")[0]
            key = os.path.join(os.path.dirname(member.name), key) if os.path.dirname(member.name) else key
            end = member.offset_data + (member.size + 511) // 512 * 512
            span = ranges.setdefault(key, [member.offset, end])
            span[1] = end
    keys = list(ranges)
    return {
        "keys": np.array(keys, dtype=str),
        "labels": np.array([labels[k] for k in keys], dtype=np.int64),
        "starts": np.array([ranges[k][0] for k in keys], dtype=np.int64),
        "ends": np.array([ranges[k][1] for k in keys], dtype=np.int64),
    }


def finished_shards(split_dir: Path, split: str) -> list[dict[str, Any]]:
    """The contiguous run of finished shards (tar + index) from number 0."""
    done = []
    while True:
        tar = split_dir / shard_name(split, len(done))
        idx = tar.with_suffix(".idx.npz")
        if not (tar.exists() and idx.exists()):
            return done
        with np.load(idx) as z:
            count = len(z["keys"])
        done.append({"name": tar.name, "num_samples": count, "bytes": tar.stat().st_size})


class _ShardStream:
    """Writes samples into numbered shards, closing one when it reaches the byte budget."""

    def __init__(self, split_dir: Path, split: str, first_number: int, shard_bytes: int) -> None:
        self.split_dir, self.split, self.shard_bytes = split_dir, split, shard_bytes
        self.number = first_number
        self.entries: list[dict[str, Any]] = []
        self._writer: wds.TarWriter | None = None
        self._labels: dict[str, int] = {}
        self._bytes = 0

    def _open(self) -> None:
        tmp = self.split_dir / f".{shard_name(self.split, self.number)}.tmp"
        self._tmp = tmp
        self._writer = wds.TarWriter(str(tmp), mtime=0, user="imret", group="imret", format="GNU_FORMAT")
        self._labels, self._bytes = {}, 0

    def write(self, sample: Sample) -> None:
        if self._writer is None:
            self._open()
        assert "." not in sample.key, f"sample key {sample.key!r} contains a dot"
        self._writer.write({  # type: ignore[union-attr]
            "__key__": sample.key, sample.ext: sample.image, "cls": int(sample.label),
            "json": {"label": int(sample.label), **sample.meta},
        })
        self._labels[sample.key] = int(sample.label)
        self._bytes += len(sample.image) + 1536  # three members: their headers and padding
        if self._bytes >= self.shard_bytes:
            self.close()

    def close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        final = self.split_dir / shard_name(self.split, self.number)
        os.replace(self._tmp, final)
        index = index_tar(final, self._labels)
        buf = io.BytesIO()
        np.savez(buf, **index)
        idx_tmp = self.split_dir / f".{final.stem}.idx.npz.tmp"
        idx_tmp.write_bytes(buf.getvalue())
        os.replace(idx_tmp, final.with_suffix(".idx.npz"))
        self.entries.append({"name": final.name, "num_samples": len(index["keys"]), "bytes": final.stat().st_size})
        self._writer = None
        self.number += 1


def _encoded(source: SplitSource, skip: int, workers: int) -> Iterator[Sample]:
    items = source.items[skip:]
    if workers <= 1:
        yield from map(source.encode, items)
        return
    with Pool(workers) as pool:
        yield from pool.imap(source.encode, items, chunksize=16)


def write_split(source: SplitSource, out: Path, *, dataset: str, converter_version: int,
                shard_bytes: int = DEFAULT_SHARD_BYTES, workers: int = 1, progress: bool = True) -> dict[str, Any]:
    """Write (or finish writing) one split; returns its manifest."""
    split_dir = Path(out) / source.name
    manifest_path = split_dir / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("converter_version") == converter_version and manifest.get("num_samples") == len(source.items):
            print(f"{source.name}: complete ({manifest['num_samples']} samples in {len(manifest['shards'])} shards), skipped")
            return manifest
        manifest_path.unlink()  # written by another converter version: rebuild
    split_dir.mkdir(parents=True, exist_ok=True)
    for stale in split_dir.glob(".*.tmp"):
        stale.unlink()
    done = finished_shards(split_dir, source.name)
    skip = sum(e["num_samples"] for e in done)
    if skip:
        print(f"{source.name}: resuming after {len(done)} finished shards ({skip} samples)")
    stream = _ShardStream(split_dir, source.name, len(done), shard_bytes)
    bar = tqdm(total=len(source.items), initial=skip, desc=source.name, unit="img", disable=not progress)
    for sample in _encoded(source, skip, workers):
        stream.write(sample)
        bar.update()
    stream.close()
    bar.close()
    manifest = _manifest(source, done + stream.entries, dataset, converter_version)
    manifest["class_counts"] = class_counts(split_dir, manifest["shards"], len(source.class_names))
    tmp = split_dir / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, manifest_path)
    return manifest


def _manifest(source: SplitSource, shards: list[dict[str, Any]], dataset: str, version: int) -> dict[str, Any]:
    return {
        "dataset": dataset,
        "split": source.name,
        "converter_version": version,
        "num_samples": sum(s["num_samples"] for s in shards),
        "num_classes": len(source.class_names),
        "class_names": source.class_names,
        "shards": shards,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        **source.info,
    }


def class_counts(split_dir: Path, shards: list[dict[str, Any]], num_classes: int) -> list[int]:
    """Samples per class, read back from the shard indices."""
    counts = np.zeros(max(num_classes, 1), dtype=np.int64)
    for entry in shards:
        with np.load(split_dir / Path(entry["name"]).with_suffix(".idx.npz")) as z:
            labels = z["labels"][z["labels"] >= 0]
        counts = np.pad(counts, (0, max(0, int(labels.max(initial=-1)) + 1 - len(counts))))
        counts += np.bincount(labels, minlength=len(counts))
    return counts[:num_classes].tolist() if num_classes else counts.tolist()


def write_dataset(sources: Iterable[SplitSource], out: Path, **kwargs: Any) -> list[dict[str, Any]]:
    return [write_split(s, out, **kwargs) for s in sources]

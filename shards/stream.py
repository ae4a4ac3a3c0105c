"""Writing samples into numbered WebDataset shards, and finding the finished ones again.

Layout (read by ``imret.data.shards``)::

    <out>/<split>/<split>-000000.tar       samples: <key>.<img>, <key>.cls, <key>.json
    <out>/<split>/<split>-000000.idx.npz   keys, labels and byte ranges of that shard

A shard is written under a temporary name and renamed into place when full, then its
index is written beside it; a shard counts as finished only when both exist. Each
index also records the number of the item after the shard's last sample
(``next_item``), the items skipped before it (bad images under the ``skip`` policy)
and the shard's SHA-256, so that a write can resume, or one shard be rewritten, at
the right item, and a rewritten shard be compared with the one it replaces.
``shards.writer`` decides what to write; this module only writes it.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

DEFAULT_SHARD_BYTES = 256 * 1024 * 1024  # WebDataset's guidance: shards of 100 MB to 1 GB


class BadImage(Exception):
    """Raised by a converter's ``encode`` for an image it cannot use; carries the file and why."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(str(path), reason)
        self.path, self.reason = str(path), reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class Skipped:
    """What a worker returns instead of a Sample for an item whose image is bad."""

    path: str
    reason: str


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


def sha256(path: Path) -> str:
    """The file's SHA-256 (read back once, while it is still in the page cache)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def finished_shards(split_dir: Path, split: str) -> list[dict[str, Any]]:
    """The contiguous run of finished shards (tar + index) from number 0."""
    done = []
    while True:
        tar = split_dir / shard_name(split, len(done))
        idx = tar.with_suffix(".idx.npz")
        if not (tar.exists() and idx.exists()):
            return done
        with np.load(idx) as z:
            count, digest = len(z["keys"]), str(z["sha256"]) if "sha256" in z.files else None
        done.append({"name": tar.name, "num_samples": count, "bytes": tar.stat().st_size,
                     **({"sha256": digest} if digest else {})})  # indices written before digests hold none


class ShardStream:
    """Writes samples into numbered shards, closing one when it reaches the byte budget."""

    def __init__(self, split_dir: Path, split: str, first_number: int, shard_bytes: int, first_item: int) -> None:
        self.split_dir, self.split, self.shard_bytes = split_dir, split, shard_bytes
        self.number = first_number
        self.next_item = first_item  # the item after the last one written or skipped
        self.entries: list[dict[str, Any]] = []
        self.skipped: list[dict[str, str]] = []  # every item skipped by this stream, in order
        self._pending: list[dict[str, str]] = []  # skipped since the last shard was closed
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
        self.next_item += 1
        if self._bytes >= self.shard_bytes:
            self.close()

    def skip(self, skipped: Skipped) -> None:
        entry = {"path": skipped.path, "reason": skipped.reason}
        self.skipped.append(entry)
        self._pending.append(entry)
        self.next_item += 1

    def close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        final = self.split_dir / shard_name(self.split, self.number)
        os.replace(self._tmp, final)
        index = index_tar(final, self._labels)
        digest = sha256(final)
        buf = io.BytesIO()
        # next_item and the skipped items let a resumed write start at the right item
        np.savez(buf, **index, next_item=np.int64(self.next_item), sha256=np.array(digest),
                 skipped_paths=np.array([e["path"] for e in self._pending], dtype=str),
                 skipped_reasons=np.array([e["reason"] for e in self._pending], dtype=str))
        idx_tmp = self.split_dir / f".{final.stem}.idx.npz.tmp"
        idx_tmp.write_bytes(buf.getvalue())
        os.replace(idx_tmp, final.with_suffix(".idx.npz"))
        self.entries.append({"name": final.name, "num_samples": len(index["keys"]), "bytes": final.stat().st_size,
                             "sha256": digest})
        self._writer = None
        self._pending = []
        self.number += 1


def resume_point(split_dir: Path, done: list[dict[str, Any]]) -> tuple[int, list[dict[str, str]]]:
    """The item to resume at after the finished shards, and the items they skipped."""
    next_item, skipped = 0, []
    for entry in done:
        with np.load(split_dir / Path(entry["name"]).with_suffix(".idx.npz")) as z:
            # indices written before bad-image handling hold no skipped items
            next_item = int(z["next_item"]) if "next_item" in z.files else next_item + entry["num_samples"]
            if "skipped_paths" in z.files:
                skipped += [{"path": p, "reason": r}
                            for p, r in zip(z["skipped_paths"].tolist(), z["skipped_reasons"].tolist())]
    return next_item, skipped


def _guarded(encode: Callable[[Any], Sample], item: Any) -> Sample | Skipped:
    try:
        return encode(item)
    except BadImage as bad:  # decided by the writer, in item order, not by the worker
        return Skipped(bad.path, bad.reason)


def encoded(source: SplitSource, skip: int, workers: int) -> Iterator[Sample | Skipped]:
    items = source.items[skip:]
    encode = functools.partial(_guarded, source.encode)
    if workers <= 1:
        yield from map(encode, items)
        return
    with Pool(workers) as pool:
        yield from pool.imap(encode, items, chunksize=16)

"""Writing one split as WebDataset shards, resumably.

Layout (read by ``imret.data.shards``)::

    <out>/<split>/<split>-000000.tar       samples: <key>.<img>, <key>.cls, <key>.json
    <out>/<split>/<split>-000000.idx.npz   keys, labels and byte ranges of that shard
    <out>/<split>/manifest.json            written last: the split is complete

A shard is written under a temporary name and renamed into place when full, then its
index is written beside it; a shard counts as finished only when both exist. An
interrupted write therefore leaves no half-written shard under a final name, and a
rerun keeps the finished shards and continues with the next item: converters list
their items in a fixed order, so the first finished shards always hold the first
samples.

Bad images. A converter's ``encode`` raises :class:`BadImage` for an image it cannot
use (missing, unreadable, truncated). The worker turns it into a :class:`Skipped`
marker, so the decision reaches the writer in item order whatever the number of
workers; the writer then either stops with :class:`BadImageError` (policy ``fail``,
the default) or leaves the item out, prints a warning and lists it in the manifest
(policy ``skip``). Each shard's index records the number of the item after its last
sample (``next_item``) and the items skipped before it, so a resumed write starts at
the right item even when items were skipped; the decision depends only on the file,
so a resumed write makes the same decisions as an uninterrupted one.

A split remembers what wrote it (dataset, converter version, the converter's options
and the number of items, in ``.writer-state.json`` and in the manifest). A rerun with
different options or a different source rewrites the split from scratch instead of
keeping shards that hold other samples.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import sys
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
BAD_IMAGE_POLICIES = ("fail", "skip")
STATE_FILE = ".writer-state.json"


class BadImage(Exception):
    """Raised by a converter's ``encode`` for an image it cannot use; carries the file and why."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(str(path), reason)
        self.path, self.reason = str(path), reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class BadImageError(Exception):
    """A bad image under the ``fail`` policy: the write stops (finished shards are kept)."""


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
        buf = io.BytesIO()
        # next_item and the skipped items let a resumed write start at the right item
        np.savez(buf, **index, next_item=np.int64(self.next_item),
                 skipped_paths=np.array([e["path"] for e in self._pending], dtype=str),
                 skipped_reasons=np.array([e["reason"] for e in self._pending], dtype=str))
        idx_tmp = self.split_dir / f".{final.stem}.idx.npz.tmp"
        idx_tmp.write_bytes(buf.getvalue())
        os.replace(idx_tmp, final.with_suffix(".idx.npz"))
        self.entries.append({"name": final.name, "num_samples": len(index["keys"]), "bytes": final.stat().st_size})
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


def _encoded(source: SplitSource, skip: int, workers: int) -> Iterator[Sample | Skipped]:
    items = source.items[skip:]
    encode = functools.partial(_guarded, source.encode)
    if workers <= 1:
        yield from map(encode, items)
        return
    with Pool(workers) as pool:
        yield from pool.imap(encode, items, chunksize=16)


def bad_image_message(split: str, bad: Skipped) -> str:
    return (f"{split}: bad image {bad.path}: {bad.reason}. Fix or remove the file, or rerun with "
            f"--on-bad-image skip to leave such images out (they are then listed in the manifest); "
            f"finished shards are kept and the rerun resumes.")


def _check_earlier_skips(split: str, skipped: list[dict[str, str]], on_bad_image: str) -> None:
    """Under ``fail``, shards that an earlier ``skip`` run wrote without some images are not accepted."""
    if skipped and on_bad_image == "fail":
        first = skipped[0]
        raise BadImageError(
            f"{split}: an earlier run with --on-bad-image skip left out {len(skipped)} bad images "
            f"(first: {first['path']}: {first['reason']}). Rerun with --on-bad-image skip to accept that, "
            f"or fix the files and delete the split's shards to write it again.")


class SettingsChanged(ValueError):
    """A split on disk was written with other settings; rewriting it needs --overwrite."""


def write_split(source: SplitSource, out: Path, *, dataset: str, converter_version: int,
                shard_bytes: int = DEFAULT_SHARD_BYTES, workers: int = 1, progress: bool = True,
                on_bad_image: str = "fail", overwrite: bool = False) -> dict[str, Any]:
    """Write (or finish writing) one split; returns its manifest.

    A split already on disk that was written with other settings (converter version,
    options, source, item count) is never deleted silently: without ``overwrite`` this
    raises ``SettingsChanged`` naming the differences.
    """
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, not {on_bad_image!r}")
    split_dir = Path(out) / source.name
    state = _state(source, dataset, converter_version)
    manifest = _complete_manifest(split_dir, source.name, state, overwrite)
    if manifest is not None:
        _check_earlier_skips(source.name, manifest.get("skipped", []), on_bad_image)
        return manifest
    split_dir.mkdir(parents=True, exist_ok=True)
    for stale in split_dir.glob(".*.tmp"):
        stale.unlink()
    _write_json(split_dir / STATE_FILE, state)
    done = finished_shards(split_dir, source.name)
    skip, skipped = resume_point(split_dir, done)
    if skip:
        print(f"{source.name}: resuming after {len(done)} finished shards ({skip} items)")
    _check_earlier_skips(source.name, skipped, on_bad_image)
    if skipped:
        print(f"{source.name}: the finished shards left out {len(skipped)} bad images (listed in the manifest)")
    stream = _ShardStream(split_dir, source.name, len(done), shard_bytes, skip)
    bar = tqdm(total=len(source.items), initial=skip, desc=source.name, unit="img", disable=not progress)
    with contextlib.closing(_encoded(source, skip, workers)) as results, bar:
        for result in results:
            if isinstance(result, Skipped):
                if on_bad_image == "fail":
                    raise BadImageError(bad_image_message(source.name, result))
                tqdm.write(f"warning: {source.name}: skipping bad image {result.path}: {result.reason}",
                           file=sys.stderr)
                stream.skip(result)
            else:
                stream.write(result)
            bar.update()
        stream.close()
    manifest = _manifest(source, done + stream.entries, dataset, converter_version)
    manifest["class_counts"] = class_counts(split_dir, manifest["shards"], len(source.class_names))
    manifest.update(num_items=len(source.items), num_skipped=len(skipped + stream.skipped),
                    skipped=skipped + stream.skipped, on_bad_image=on_bad_image)
    _write_json(split_dir / "manifest.json", manifest)
    return manifest


def _state(source: SplitSource, dataset: str, version: int) -> dict[str, Any]:
    """What decides a split's content, besides the source files: kept to refuse mixing runs."""
    info = json.loads(json.dumps(source.info))  # as it reads back from JSON (tuples -> lists)
    return {"dataset": dataset, "converter_version": version, "num_items": len(source.items), "info": info}


def _complete_manifest(split_dir: Path, split: str, state: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The manifest of a complete split written with this state; a split written otherwise is an
    error, or is cleared when ``overwrite``."""
    manifest_path, state_path = split_dir / "manifest.json", split_dir / STATE_FILE
    written = None
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        items = manifest.get("num_items", manifest.get("num_samples"))  # manifests before bad-image handling
        written = {"dataset": manifest.get("dataset"), "converter_version": manifest.get("converter_version"),
                   "num_items": items, "info": {k: manifest.get(k) for k in state["info"]}}
        if written == state:
            print(f"{split}: complete ({manifest['num_samples']} samples in {len(manifest['shards'])} shards), skipped")
            return manifest
    elif state_path.exists():
        written = json.loads(state_path.read_text())
    if written is not None and written != state:
        changed = ", ".join(_differences(written, state))
        if not overwrite:
            raise SettingsChanged(
                f"{split}: {split_dir} holds shards written with other settings (changed: {changed}). Nothing was "
                f"deleted. Write to another --out, or pass --overwrite to replace this split's shards."
            )
        print(f"{split}: {split_dir} was written with other settings ({changed}); --overwrite: rewriting it")
        clear_split(split_dir, split)
    return None


def _differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    names = [k for k in ("dataset", "converter_version", "num_items") if a.get(k) != b.get(k)]
    info_a, info_b = a.get("info") or {}, b.get("info") or {}
    return names + [k for k in sorted(set(info_a) | set(info_b)) if info_a.get(k) != info_b.get(k)]


def clear_split(split_dir: Path, split: str) -> None:
    """Remove what the writer wrote for one split (and nothing else in the directory)."""
    for path in [*split_dir.glob(f"{split}-*.tar"), *split_dir.glob(f"{split}-*.idx.npz"),
                 split_dir / "manifest.json", split_dir / STATE_FILE]:
        path.unlink(missing_ok=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


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

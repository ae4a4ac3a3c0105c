"""Random access to WebDataset tar shards.

A split lives in ``<root>/<split>/``: shards ``<split>-NNNNNN.tar``, one
``<split>-NNNNNN.idx.npz`` per shard (each sample's key, label and byte range inside
the tar, written by ``shards.writer`` when the shard was closed) and a
``manifest.json`` that marks the split complete.

Why random access rather than streaming: metric-learning batches are P classes x K
samples, drawn by a seeded plan (``imret.data.sampler``); reading sample ``i`` is one
``pread`` of its byte range, whatever shard it is in. The byte ranges are checked
against the manifest's shard sizes when the split is opened, so a truncated or
replaced shard fails at once, naming the file, instead of yielding short images.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class ShardError(ValueError):
    """A shard or manifest that cannot be read as written."""


def split_dir(root: str | Path, split: str) -> Path:
    return Path(root) / split


def read_manifest(root: str | Path, split: str) -> dict[str, Any]:
    path = split_dir(root, split) / "manifest.json"
    if not path.exists():
        available = sorted(p.parent.name for p in Path(root).glob("*/manifest.json")) if Path(root).is_dir() else []
        hint = f" Splits there: {', '.join(available)}." if available else " The directory has no finished splits."
        raise ShardError(
            f"no split '{split}' at {split_dir(root, split)} (missing manifest.json).{hint} "
            f"Build shards with `python -m shards.write <dataset> --out {root}`, or fix data.root / the split name."
        )
    return json.loads(path.read_text())


def repair_hint(root: str | Path, manifest: dict[str, Any]) -> str:
    """What repairs a damaged shard: the write command again (it checks every shard and rewrites bad ones)."""
    dataset, source = manifest.get("dataset", "<dataset>"), manifest.get("source", "")
    src = f" --src {source}" if source and Path(str(source)).is_absolute() else ""
    return (f"Repair it by rerunning the command that wrote the split, with the same options "
            f"(`python -m shards.write {dataset}{src} --out {root} ...`): it checks every shard against the manifest "
            f"and rewrites the missing or damaged ones. Deleting the file first is not needed.")


@dataclass(frozen=True)
class SampleRef:
    shard: Path
    key: str
    start: int
    end: int


class ShardSplit:
    """One split of a shard directory, indexable by sample number."""

    def __init__(self, root: str | Path, split: str) -> None:
        self.root = Path(root)
        self.split = split
        self.manifest = read_manifest(root, split)
        self.class_names: list[str] = list(self.manifest.get("class_names", []))
        self._paths: list[Path] = []
        keys, labels, shard_ids, starts, ends = [], [], [], [], []
        for shard_id, entry in enumerate(self.manifest["shards"]):
            path = split_dir(root, split) / entry["name"]
            idx = self._load_index(path, entry, repair_hint(root, self.manifest))
            self._paths.append(path)
            keys.append(idx["keys"])
            labels.append(idx["labels"])
            starts.append(idx["starts"])
            ends.append(idx["ends"])
            shard_ids.append(np.full(len(idx["keys"]), shard_id, dtype=np.int32))
        self.keys: np.ndarray = np.concatenate(keys) if keys else np.array([], dtype=str)
        self.labels: np.ndarray = np.concatenate(labels).astype(np.int64) if labels else np.array([], dtype=np.int64)
        self._shard = np.concatenate(shard_ids) if shard_ids else np.array([], dtype=np.int32)
        self._start = np.concatenate(starts) if starts else np.array([], dtype=np.int64)
        self._end = np.concatenate(ends) if ends else np.array([], dtype=np.int64)
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    @staticmethod
    def _load_index(path: Path, entry: dict[str, Any], hint: str) -> dict[str, np.ndarray]:
        if not path.exists():
            raise ShardError(f"shard {path} is listed in its manifest but missing. {hint}")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ShardError(f"shard {path} is {size} bytes but its manifest says {entry['bytes']}: the file is "
                             f"truncated or was replaced. {hint}")
        idx_path = path.with_suffix(".idx.npz")
        if not idx_path.exists():
            raise ShardError(f"shard index {idx_path} is missing. {hint}")
        with np.load(idx_path) as idx:
            data = {k: idx[k] for k in ("keys", "labels", "starts", "ends")}
        if len(data["keys"]) != entry["num_samples"] or (len(data["ends"]) and data["ends"].max() > size):
            raise ShardError(f"shard index {idx_path} does not match {path}. {hint}")
        return data

    def __len__(self) -> int:
        return len(self.keys)

    def ref(self, i: int) -> SampleRef:
        return SampleRef(self._paths[self._shard[i]], str(self.keys[i]), int(self._start[i]), int(self._end[i]))

    def _fd(self, shard: int) -> int:
        if os.getpid() != self._pid:  # after a fork (DataLoader workers): own descriptors
            self._fds, self._pid = {}, os.getpid()
        if shard not in self._fds:
            self._fds[shard] = os.open(self._paths[shard], os.O_RDONLY)
        return self._fds[shard]

    def read(self, i: int) -> dict[str, bytes]:
        """The raw members of sample ``i``: ``{"png": b"...", "cls": b"3", "json": b"{...}"}``."""
        ref = self.ref(i)
        buf = os.pread(self._fd(int(self._shard[i])), ref.end - ref.start, ref.start)
        if len(buf) != ref.end - ref.start:
            raise ShardError(f"shard {ref.shard}: sample {ref.key} ends past the end of the file (truncated shard)")
        return parse_members(buf, ref)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fds"] = {}
        return state

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass


_BLOCK = 512


def _octal(field: bytes) -> int:
    text = field.rstrip(b"\0 ").strip()
    return int(text, 8) if text else 0


def _fast_members(buf: bytes) -> list[tuple[str, bytes]] | None:
    """Parse plain ustar/GNU members directly (what shards.writer writes); None for anything else.

    The stdlib's tarfile needs ~100 us per sample to set itself up; reading the few
    header fields by hand takes a few. Headers it does not handle here (PAX, links,
    a bad checksum) send the sample to ``tarfile`` instead.
    """
    out, offset, long_name = [], 0, None
    while offset + _BLOCK <= len(buf):
        header = buf[offset:offset + _BLOCK]
        if not header.strip(b"\0"):
            break
        if _octal(header[148:156]) != sum(header[:148]) + 256 + sum(header[156:]):
            return None
        kind, size = header[156:157], _octal(header[124:136])
        data = buf[offset + _BLOCK:offset + _BLOCK + size]
        if len(data) != size:
            return None
        if kind == b"L":  # GNU long name: the next member's name
            long_name = data.rstrip(b"\0").decode()
        elif kind in (b"0", b"\0"):
            posix = header[257:263] == b"ustar\0"  # only POSIX ustar has a name prefix (GNU keeps times there)
            prefix = header[345:500].rstrip(b"\0").decode() + "/" if posix and header[345] else ""
            name = long_name or prefix + header[:100].rstrip(b"\0").decode()
            out.append((name, data))
            long_name = None
        else:
            return None
        offset += _BLOCK + (size + _BLOCK - 1) // _BLOCK * _BLOCK
    return out


def parse_members(buf: bytes, ref: SampleRef) -> dict[str, bytes]:
    """Split the tar members of one sample into ``{extension: bytes}``."""
    fast = _fast_members(buf)
    if fast and all(os.path.basename(n).partition(".")[0] == os.path.basename(ref.key) for n, _ in fast):
        return {os.path.basename(n).partition(".")[2]: data for n, data in fast}
    # anything unusual goes through tarfile, which also produces the precise error
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(buf), mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = os.path.basename(member.name).partition(".")
                if key != os.path.basename(ref.key):
                    raise ShardError(f"shard {ref.shard}: expected sample {ref.key} at byte {ref.start}, found {member.name}")
                members[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
    except tarfile.TarError as err:
        raise ShardError(f"shard {ref.shard}: sample {ref.key} at byte {ref.start} is corrupt: {err}") from err
    if not members:
        raise ShardError(f"shard {ref.shard}: sample {ref.key} at byte {ref.start} has no members (corrupt shard)")
    return members


IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def image_bytes(sample: dict[str, bytes], ref: SampleRef) -> bytes:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    raise ShardError(f"shard {ref.shard}: sample {ref.key} has no image member (has: {', '.join(sample)})")


def sample_meta(sample: dict[str, bytes]) -> dict[str, Any]:
    return json.loads(sample["json"]) if "json" in sample else {}

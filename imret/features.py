"""The feature store: a run's embeddings of each split, as written by the extract stage.

Layout, per split, in ``runs/<exp>/features/<split>/``:

- ``part-<rank>-of-<world>.npy``: one rank's embeddings (n x d, float32 or float16),
  a plain .npy, so that a reader can memory-map just the rows it needs;
- ``part-<rank>-of-<world>.npz``: ``keys``, ``labels`` and the sample range
  ``[start, stop)`` the rank covered. Both files are written atomically, the .npz
  second, so a part whose .npz exists is complete;
- ``manifest.json``: written last, once every part exists; it marks the split
  complete and records counts, part sizes, dimension, dtype and the checkpoint used.

The extract stage writes parts and the manifest through ``write_part`` and
``write_manifest``; evaluation, clustering and the tools read through the loaders
below, which need numpy only (no torch, no model).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imret.rundir import RunDir, atomic_write_json, atomic_write_npy, atomic_write_npz

FORMAT = 2  # manifest format: 2 = embeddings in .npy beside a keys/labels .npz (1: all in the .npz)


@dataclass
class Features:
    embeddings: np.ndarray
    keys: np.ndarray
    labels: np.ndarray
    manifest: dict[str, Any]


def part_path(directory: Path, rank: int, world: int) -> Path:
    """The .npz of a part (keys, labels, range); its embeddings are the .npy of the same name."""
    return directory / f"part-{rank:05d}-of-{world:05d}.npz"


def embeddings_path(part: Path) -> Path:
    return part.with_suffix(".npy")


# ----------------------------------------------------------------------------- writing


def write_part(part: Path, embeddings: np.ndarray, keys: np.ndarray, labels: np.ndarray,
               start: int, stop: int) -> None:
    """One rank's part: the embeddings first, then the .npz whose existence marks the part complete."""
    atomic_write_npy(embeddings_path(part), embeddings)
    atomic_write_npz(part, keys=keys, labels=labels, range=np.array([start, stop]))


def write_manifest(directory: Path, world: int, fields: dict[str, Any]) -> dict[str, Any]:
    """Mark a split complete once all ``world`` parts exist; ``fields`` adds what the writer knows."""
    parts = [part_path(directory, r, world) for r in range(world)]
    missing = [p.name for p in parts if not p.exists() or not embeddings_path(p).exists()]
    if missing:
        raise RuntimeError(f"{directory}: parts {', '.join(missing)} are missing after every rank finished")
    shapes = [np.load(embeddings_path(p), mmap_mode="r").shape for p in parts]
    manifest = {"parts": [p.name for p in parts], "format": FORMAT, "part_sizes": [int(s[0]) for s in shapes],
                "dim": int(shapes[0][1]) if shapes else 0, **fields}
    atomic_write_json(directory / "manifest.json", manifest)
    return manifest


# ----------------------------------------------------------------------------- reading


def read_manifest(run: RunDir, split: str) -> dict[str, Any]:
    """The manifest of a complete split (ValueError, naming the fix, when there is none)."""
    path = run.features(split) / "manifest.json"
    if not path.exists():
        raise ValueError(f"no complete features for split '{split}' in {path.parent}; run the extract stage "
                         "(and add the split to extract.splits if it is not the evaluate stage's query or database)")
    return json.loads(path.read_text())


def is_complete(run: RunDir, split: str) -> bool:
    return (run.features(split) / "manifest.json").exists()


def load_features(run: RunDir, split: str) -> Features:
    """A complete split's features, in the split's sample order, embeddings as float32."""
    manifest = read_manifest(run, split)
    return load_feature_rows(run, split, 0, int(manifest["num_samples"]), manifest)


def load_feature_rows(run: RunDir, split: str, start: int, stop: int,
                      manifest: dict[str, Any] | None = None) -> Features:
    """Rows [start, stop) of a split: only the parts that overlap them are read, through mmap."""
    def rows_in(lo: int, hi: int) -> slice | None:
        a, b = max(start, lo), min(stop, hi)
        return slice(a - lo, b - lo) if a < b else None
    return _read_rows(run, split, manifest or read_manifest(run, split), rows_in)


def load_feature_subset(run: RunDir, split: str, rows: np.ndarray) -> Features:
    """Arbitrary rows (ascending) of a split, read through mmap part by part."""
    def rows_in(lo: int, hi: int) -> np.ndarray | None:
        local = rows[(rows >= lo) & (rows < hi)] - lo
        return local if len(local) else None
    return _read_rows(run, split, read_manifest(run, split), rows_in)


def load_labels(run: RunDir, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A complete split's keys and labels, without reading any embedding."""
    manifest = read_manifest(run, split)
    metas = [_part_meta(run.features(split) / name) for name in manifest["parts"]]
    return (np.concatenate([m["keys"] for m in metas]) if metas else np.zeros(0, str),
            np.concatenate([m["labels"] for m in metas]).astype(np.int64) if metas else np.zeros(0, np.int64))


def _read_rows(run: RunDir, split: str, manifest: dict[str, Any],
               rows_in: Callable[[int, int], slice | np.ndarray | None]) -> Features:
    """The rows ``rows_in(lo, hi)`` picks from each part (rows lo..hi of the split); parts it
    picks nothing from are not opened (their sizes are in the manifest)."""
    out = run.features(split)
    sizes = manifest.get("part_sizes") or [len(_part_meta(out / name)["labels"]) for name in manifest["parts"]]
    embs, keys, labels = [], [], []
    lo = 0
    for name, size in zip(manifest["parts"], sizes):
        local = rows_in(lo, lo + size)
        if local is not None:
            meta = _part_meta(out / name)
            embs.append(np.asarray(_part_embeddings(out / name, manifest)[local], dtype=np.float32))
            keys.append(meta["keys"][local])
            labels.append(meta["labels"][local])
        lo += size
    dim = int(manifest.get("dim", embs[0].shape[1] if embs else 0))
    return Features(np.concatenate(embs) if embs else np.zeros((0, dim), np.float32),
                    np.concatenate(keys) if keys else np.zeros(0, str),
                    np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64), manifest)


def _part_meta(part: Path) -> dict[str, np.ndarray]:
    with np.load(part) as z:
        return {"keys": z["keys"], "labels": z["labels"]}


def _part_embeddings(part: Path, manifest: dict[str, Any]) -> np.ndarray:
    if manifest.get("format", 1) < 2:  # runs extracted before the .npy split: embeddings inside the .npz
        with np.load(part) as z:
            return z["embeddings"]
    return np.load(embeddings_path(part), mmap_mode="r")

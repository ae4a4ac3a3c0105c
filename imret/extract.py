"""The extraction stage: every rank embeds a disjoint part of each split.

Output per split, in ``runs/<exp>/features/<split>/``:

- ``part-<rank>-of-<world>.npy``: the embeddings (n x d, float32 or float16 by
  ``extract.dtype``) as a plain .npy array, so that a search task can memory-map just
  the database rows it owns;
- ``part-<rank>-of-<world>.npz``: ``keys``, ``labels`` and the sample range
  ``[start, stop)`` this rank covered. Both files are written atomically, the .npz
  second, so a part whose .npz exists is complete;
- ``manifest.json``: written last by rank 0 once every part exists; it marks the
  split complete and records counts, dimension, dtype and the checkpoint used.

A rerun skips complete splits and, in an incomplete one, redoes only missing parts.
On GPU the model runs under bfloat16 autocast and the embeddings are L2-normalised
again in float32, since a norm computed in bfloat16 is only good to ~3 digits.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from imret import checkpoint as ckpt_lib
from imret.config import ExperimentConfig
from imret.data.loader import extraction_loader, rank_range
from imret.data.shards import ShardSplit
from imret.distributed import DistInfo, barrier
from imret.models import build_model
from imret.models.embedding import EmbeddingNet
from imret.rundir import RunDir, atomic_write_bytes, atomic_write_json


@dataclass
class Features:
    embeddings: np.ndarray
    keys: np.ndarray
    labels: np.ndarray
    manifest: dict[str, Any]


def splits_to_extract(cfg: ExperimentConfig) -> list[str]:
    if cfg.extract.splits:
        return list(cfg.extract.splits)
    ev = cfg.evaluate
    return [ev.query] + ([ev.database] if ev.database and ev.database != ev.query else [])


FORMAT = 2  # manifest format: 2 = embeddings in .npy beside a keys/labels .npz (1: all in the .npz)


def part_path(directory: Path, rank: int, world: int) -> Path:
    """The .npz of a part (keys, labels, range); its embeddings are the .npy of the same name."""
    return directory / f"part-{rank:05d}-of-{world:05d}.npz"


def embeddings_path(part: Path) -> Path:
    return part.with_suffix(".npy")


def load_model(cfg: ExperimentConfig, run: RunDir, device: torch.device) -> tuple[EmbeddingNet, str]:
    """The model to embed with: a checkpoint of this run, or the initial weights (``init``)."""
    torch.manual_seed(cfg.train.seed)  # "init" = exactly the weights training started from
    model = build_model(cfg.model)
    which = cfg.extract.checkpoint
    if which == "init":
        if cfg.train.init_from:
            from imret.train import load_init_weights

            load_init_weights(model, cfg.train.init_from, cfg.run.root)
        source = "init"
    else:
        path = ckpt_lib.find(run, which)
        model.load_state_dict(ckpt_lib.load_state(path)["model"])
        source = str(path)
    return model.to(device).eval(), source


def run(cfg: ExperimentConfig, run: RunDir, info: DistInfo) -> dict[str, Any]:
    model, source = load_model(cfg, run, info.device)
    counts = {}
    for split in splits_to_extract(cfg):
        counts[split] = extract_split(cfg, run, info, model, source, split)
    return {"checkpoint": source, "samples": counts}


def extract_split(cfg: ExperimentConfig, run: RunDir, info: DistInfo, model: EmbeddingNet, source: str,
                  split: str) -> int:
    out = run.features(split)
    manifest = out / "manifest.json"
    if manifest.exists():
        if info.is_main:
            print(f"extract: {split} is complete ({manifest}), skipped", flush=True)
        return json.loads(manifest.read_text())["num_samples"]
    reader = ShardSplit(cfg.data.root, split)
    part = part_path(out, info.rank, info.world_size)
    if part.exists():
        print(f"extract: {split} part {info.rank} exists, skipped", flush=True)
    else:
        _write_part(cfg, info, model, reader, part, split)
    barrier(info)
    if info.is_main:
        _write_manifest(cfg, out, reader, info.world_size, source, split)
    barrier(info)
    return len(reader)


@torch.no_grad()
def _write_part(cfg: ExperimentConfig, info: DistInfo, model: EmbeddingNet, reader: ShardSplit, part: Path,
                split: str) -> None:
    start, stop = rank_range(len(reader), info.rank, info.world_size)
    loader = extraction_loader(cfg, reader, info.rank, info.world_size)
    chunks, labels, indices = [], [], []
    bar = tqdm(loader, desc=f"extract {split}", unit="batch", disable=not info.is_main, mininterval=5)
    for images, batch_labels, index in bar:
        chunks.append(_embed(model, images.to(info.device, non_blocking=True)).numpy())
        labels.append(batch_labels.numpy())
        indices.append(index.numpy())
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, model.embed_dim), np.float32)
    index = np.concatenate(indices) if indices else np.zeros(0, np.int64)
    assert np.array_equal(index, np.arange(start, stop)), "extraction covered the wrong samples"
    _atomic_save_npy(embeddings_path(part), embeddings.astype(cfg.extract.dtype))
    buf = io.BytesIO()
    np.savez(buf, keys=reader.keys[start:stop], labels=np.concatenate(labels) if labels else np.zeros(0, np.int64),
             range=np.array([start, stop]))
    atomic_write_bytes(part, buf.getvalue())  # last: its existence marks the part complete


def _embed(model: EmbeddingNet, images: torch.Tensor) -> torch.Tensor:
    """Float32 embeddings on the CPU; mixed precision (bfloat16 autocast) on GPU."""
    if images.device.type != "cuda":
        return model(images).float().cpu()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        emb = model(images)
    return torch.nn.functional.normalize(emb.float(), dim=1).cpu()


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """np.save to a temporary name, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_manifest(cfg: ExperimentConfig, out: Path, reader: ShardSplit, world: int, source: str,
                    split: str) -> None:
    parts = [part_path(out, r, world) for r in range(world)]
    missing = [p.name for p in parts if not p.exists() or not embeddings_path(p).exists()]
    if missing:
        raise RuntimeError(f"extract: {split}: parts {', '.join(missing)} are missing after every rank finished")
    shapes = [np.load(embeddings_path(p), mmap_mode="r").shape for p in parts]
    atomic_write_json(out / "manifest.json", {
        "split": split, "num_samples": len(reader), "parts": [p.name for p in parts], "format": FORMAT,
        "part_sizes": [int(shape[0]) for shape in shapes], "dim": int(shapes[0][1]) if shapes else 0,
        "dtype": cfg.extract.dtype, "checkpoint": source, "config_digest": cfg.digest(), "data_root": cfg.data.root,
    })
    print(f"extract: {split}: {len(reader)} samples in {world} parts", flush=True)


def read_manifest(run: RunDir, split: str) -> dict[str, Any]:
    """The manifest of a complete split (ValueError, naming the fix, when there is none)."""
    path = run.features(split) / "manifest.json"
    if not path.exists():
        raise ValueError(f"no complete features for split '{split}' in {path.parent}; run the extract stage "
                         "(and add the split to extract.splits if it is not the evaluate stage's query or database)")
    return json.loads(path.read_text())


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


def load_labels(run: RunDir, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A complete split's keys and labels, without reading any embedding."""
    manifest = read_manifest(run, split)
    metas = [_part_meta(run.features(split) / name) for name in manifest["parts"]]
    return (np.concatenate([m["keys"] for m in metas]) if metas else np.zeros(0, str),
            np.concatenate([m["labels"] for m in metas]).astype(np.int64) if metas else np.zeros(0, np.int64))


def _part_meta(part: Path) -> dict[str, np.ndarray]:
    with np.load(part) as z:
        return {"keys": z["keys"], "labels": z["labels"]}


def _part_embeddings(part: Path, manifest: dict[str, Any]) -> np.ndarray:
    if manifest.get("format", 1) < 2:  # runs extracted before the .npy split: embeddings inside the .npz
        with np.load(part) as z:
            return z["embeddings"]
    return np.load(embeddings_path(part), mmap_mode="r")

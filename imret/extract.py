"""The extraction stage: every rank embeds a disjoint part of each split.

Output per split, in ``runs/<exp>/features/<split>/``:

- ``part-<rank>-of-<world>.npz``: ``embeddings`` (n x d, float32 or float16), ``keys``,
  ``labels`` and the sample range ``[start, stop)`` this rank covered; written
  atomically, so a part that exists is complete;
- ``manifest.json``: written last by rank 0 once every part exists; it marks the
  split complete and records counts, dimension, dtype and the checkpoint used.

A rerun skips complete splits and, in an incomplete one, redoes only missing parts.
"""

from __future__ import annotations

import io
import json
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


def part_path(directory: Path, rank: int, world: int) -> Path:
    return directory / f"part-{rank:05d}-of-{world:05d}.npz"


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
    on_gpu = info.device.type == "cuda"
    chunks, labels, indices = [], [], []
    bar = tqdm(loader, desc=f"extract {split}", unit="batch", disable=not info.is_main, mininterval=5)
    for images, batch_labels, index in bar:
        images = images.to(info.device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else torch.autocast("cpu", enabled=False):
            emb = model(images)
        chunks.append(emb.float().cpu().numpy())
        labels.append(batch_labels.numpy())
        indices.append(index.numpy())
    dim = model.embed_dim
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
    index = np.concatenate(indices) if indices else np.zeros(0, np.int64)
    assert np.array_equal(index, np.arange(start, stop)), "extraction covered the wrong samples"
    buf = io.BytesIO()
    np.savez(buf, embeddings=embeddings.astype(cfg.extract.dtype), keys=reader.keys[start:stop],
             labels=np.concatenate(labels) if labels else np.zeros(0, np.int64), range=np.array([start, stop]))
    atomic_write_bytes(part, buf.getvalue())


def _write_manifest(cfg: ExperimentConfig, out: Path, reader: ShardSplit, world: int, source: str,
                    split: str) -> None:
    parts = [part_path(out, r, world) for r in range(world)]
    missing = [p.name for p in parts if not p.exists()]
    if missing:
        raise RuntimeError(f"extract: {split}: parts {', '.join(missing)} are missing after every rank finished")
    atomic_write_json(out / "manifest.json", {
        "split": split, "num_samples": len(reader), "parts": [p.name for p in parts], "dtype": cfg.extract.dtype,
        "checkpoint": source, "config_digest": cfg.digest(), "data_root": cfg.data.root,
    })
    print(f"extract: {split}: {len(reader)} samples in {world} parts", flush=True)


def load_features(run: RunDir, split: str) -> Features:
    """A complete split's features, in the split's sample order."""
    out = run.features(split)
    manifest_path = out / "manifest.json"
    if not manifest_path.exists():
        raise ValueError(f"no complete features for split '{split}' in {out}; run the extract stage "
                         "(and add the split to extract.splits if it is not the evaluate stage's query or database)")
    manifest = json.loads(manifest_path.read_text())
    embs, keys, labels = [], [], []
    for name in manifest["parts"]:
        with np.load(out / name) as z:
            embs.append(z["embeddings"].astype(np.float32))
            keys.append(z["keys"])
            labels.append(z["labels"])
    return Features(np.concatenate(embs), np.concatenate(keys), np.concatenate(labels).astype(np.int64), manifest)

"""The extract stage: every rank embeds a disjoint part of each split into the feature store.

What is written, and how a reader finds it, is ``imret.features``' business; this
stage decides what to embed, with which weights, and on which rank. A rerun skips
complete splits and, in an incomplete one, redoes only missing parts. On GPU the
model runs under bfloat16 autocast and the embeddings are L2-normalised again in
float32, since a norm computed in bfloat16 is only good to ~3 digits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from imret import checkpoint as ckpt_lib
from imret import features
from imret.config import ExperimentConfig
from imret.data.loader import extraction_loader, rank_range
from imret.data.shards import ShardSplit
from imret.distributed import DistInfo, barrier
from imret.models import build_model
from imret.models.embedding import EmbeddingNet
from imret.rundir import RunDir


def splits_to_extract(cfg: ExperimentConfig) -> list[str]:
    if cfg.extract.splits:
        return list(cfg.extract.splits)
    ev = cfg.evaluate
    return [ev.query] + ([ev.database] if ev.database and ev.database != ev.query else [])


def load_model(cfg: ExperimentConfig, run: RunDir, device: torch.device) -> tuple[EmbeddingNet, str]:
    """The model to embed with: a checkpoint of this run, or the initial weights (``init``)."""
    torch.manual_seed(cfg.train.seed)  # "init" = exactly the weights training started from
    model = build_model(cfg.model)
    which = cfg.extract.checkpoint
    if which == "init":
        if cfg.train.init_from:
            ckpt_lib.load_init_weights(model, cfg.train.init_from, cfg.run.root)
        source = "init"
    else:
        path = ckpt_lib.find(run, which)
        model.load_state_dict(ckpt_lib.load_state(path)["model"])
        source = str(path)
    return model.to(device).eval(), source


def extract_stage(cfg: ExperimentConfig, run: RunDir, info: DistInfo) -> dict[str, Any]:
    """The stage: every split of ``splits_to_extract``, on every rank."""
    model, source = load_model(cfg, run, info.device)
    counts = {}
    for split in splits_to_extract(cfg):
        counts[split] = extract_split(cfg, run, info, model, source, split)
    return {"checkpoint": source, "samples": counts}


def extract_split(cfg: ExperimentConfig, run: RunDir, info: DistInfo, model: EmbeddingNet, source: str,
                  split: str) -> int:
    out = run.features(split)
    if features.is_complete(run, split):
        if info.is_main:
            print(f"extract: {split} is complete ({out / 'manifest.json'}), skipped", flush=True)
        return int(features.read_manifest(run, split)["num_samples"])
    reader = ShardSplit(cfg.data.root, split)
    if len(reader) == 0:  # every rank sees the same manifest, so every rank stops here; nothing is written
        raise ValueError(f"extract: split '{split}' of {cfg.data.root} holds no samples, so there is nothing to "
                         f"embed or evaluate. Rebuild it with `python -m shards.write`, or name another split in "
                         f"evaluate.query / evaluate.database / extract.splits.")
    part = features.part_path(out, info.rank, info.world_size)
    if part.exists():
        print(f"extract: {split} part {info.rank} exists, skipped", flush=True)
    else:
        _write_part(cfg, info, model, reader, part, split)
    barrier(info)
    if info.is_main:
        features.write_manifest(out, info.world_size, {
            "split": split, "num_samples": len(reader), "dtype": cfg.extract.dtype, "checkpoint": source,
            "config_digest": cfg.digest(), "data_root": cfg.data.root})
        print(f"extract: {split}: {len(reader)} samples in {info.world_size} parts", flush=True)
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
    features.write_part(part, embeddings.astype(cfg.extract.dtype), reader.keys[start:stop],
                        np.concatenate(labels) if labels else np.zeros(0, np.int64), start, stop)


def _embed(model: EmbeddingNet, images: torch.Tensor) -> torch.Tensor:
    """Float32 embeddings on the CPU; mixed precision (bfloat16 autocast) on GPU. Always L2-normalised,
    also for a model that trains on raw features (``model.normalize: false``): the search is by inner product."""
    if images.device.type != "cuda":
        emb = model(images).float().cpu()
        return emb if getattr(model, "normalize", True) else torch.nn.functional.normalize(emb, dim=1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        emb = model(images)
    return torch.nn.functional.normalize(emb.float(), dim=1).cpu()

"""Distributed extraction: every sample exactly once across ranks, resumable."""

from __future__ import annotations

import json

import numpy as np

from imret.extract import extract_stage
from imret.features import load_features
from imret.data.shards import ShardSplit
from imret.distributed import DistInfo
from imret.rundir import RunDir
from tests.helpers import run_ranks, tiny_images, write_tiny_split
from tests.test_train import tiny_config


def extract_rank(info: DistInfo, cfg) -> None:
    extract_stage(cfg, RunDir(cfg.run_dir), info)


def test_three_ranks_cover_every_key_once_and_match_one_process(tmp_path):
    write_tiny_split(tmp_path / "d", "query", tiny_images(5, 7, seed=3), 5, shard_bytes=3000)  # 35: not / 3
    cfg = tiny_config(tmp_path / "d", tmp_path, "three", extract__checkpoint="init", extract__batch_size=4,
                      extract__splits=["query"])
    run_ranks(extract_rank, 3, cfg)
    feats = load_features(RunDir(cfg.run_dir), "query")
    split = ShardSplit(tmp_path / "d", "query")
    assert feats.keys.tolist() == split.keys.tolist()  # each key once, in split order
    assert np.array_equal(feats.labels, split.labels)
    parts = sorted(p.name for p in RunDir(cfg.run_dir).features("query").glob("part-*"))
    assert parts == sorted(f"part-{r:05d}-of-00003.{ext}" for r in range(3) for ext in ("npy", "npz"))

    single = tiny_config(tmp_path / "d", tmp_path, "one", extract__checkpoint="init", extract__splits=["query"])
    extract_stage(single, RunDir(single.run_dir), DistInfo())
    np.testing.assert_allclose(load_features(RunDir(single.run_dir), "query").embeddings,
                               feats.embeddings, atol=1e-5)


def test_interrupted_extraction_redoes_only_missing_parts(tmp_path):
    write_tiny_split(tmp_path / "d", "query", tiny_images(3, 5, seed=4), 3)
    cfg = tiny_config(tmp_path / "d", tmp_path, "resume", extract__checkpoint="init", extract__splits=["query"])
    run_ranks(extract_rank, 2, cfg)
    out = RunDir(cfg.run_dir).features("query")
    (out / "manifest.json").unlink()  # as if the job died after part 0 was written
    (out / "part-00001-of-00002.npz").unlink()  # rank 1 died between its embeddings and its keys
    kept = (out / "part-00000-of-00002.npy").stat().st_mtime_ns
    redone = (out / "part-00001-of-00002.npy").stat().st_mtime_ns
    run_ranks(extract_rank, 2, cfg)
    assert (out / "part-00000-of-00002.npy").stat().st_mtime_ns == kept
    assert (out / "part-00001-of-00002.npy").stat().st_mtime_ns != redone
    assert json.loads((out / "manifest.json").read_text())["num_samples"] == 15
    assert len(load_features(RunDir(cfg.run_dir), "query").keys) == 15

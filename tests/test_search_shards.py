"""Database sharding: merged shard results equal the unsharded search, ids, ranks and metrics."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from imret import features
from imret.evaluate import sharded as evaluate_sharded
from imret.evaluate.stage import evaluate_stage
from imret.search import knn as search_knn
from imret.search import ranks as search_ranks
from imret.search import sharded as search_sharded
from imret.config import ExperimentConfig, from_dict
from imret.distributed import DistInfo
from imret.metrics import compute
from imret.rundir import RunDir, atomic_write_bytes, atomic_write_json, atomic_write_npy

NAMES = ["map", "map@R", "map@5", "r_precision", "precision@1", "recall@1", "recall@4"]


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def data(seed: int, tied: bool, nq: int = 50, ndb: int = 403) -> tuple[np.ndarray, ...]:
    """403 database rows: no shard count used here divides them. ``tied``: many exact duplicates."""
    rng = np.random.default_rng(seed)
    if tied:
        base = unit(rng.normal(size=(10, 8)))
        q, db = base[rng.integers(0, 10, nq)], base[rng.integers(0, 10, ndb)]
    else:
        q, db = unit(rng.normal(size=(nq, 16))), unit(rng.normal(size=(ndb, 16)))
    return q, rng.integers(0, 7, nq), db, rng.integers(0, 6, ndb)  # label 6: queries without positives


def bounds(n: int, shards: int) -> list[tuple[int, int]]:
    return [(n * i // shards, n * (i + 1) // shards) for i in range(shards)]


@pytest.mark.parametrize("shards", [1, 3, 4])
@pytest.mark.parametrize("tied", [False, True])
def test_merged_shard_topk_equals_unsharded(shards, tied):
    q, ql, db, dl = data(1, tied)
    k = 12
    whole = search_knn.knn(q, db, k)
    parts = [search_knn.search_shard(q, db[lo:hi], lo, k) for lo, hi in bounds(len(db), shards)]
    merged = search_knn.merge_topk(parts, k)
    assert np.array_equal(merged.ids, whole.ids) and np.array_equal(merged.scores, whole.scores)
    # equal scores are listed by ascending id, whichever shard they came from
    same = merged.scores[:, 1:] == merged.scores[:, :-1]
    assert (merged.ids[:, 1:][same] > merged.ids[:, :-1][same]).all()
    assert compute(search_ranks.ranks_from_knn(merged, ql, dl), NAMES[4:]) == compute(search_ranks.ranks_from_knn(whole, ql, dl),
                                                                               NAMES[4:])


@pytest.mark.parametrize("shards", [1, 3, 4])
def test_self_retrieval_over_shards_never_returns_the_query(shards):
    q, ql, _, _ = data(2, tied=True, nq=90)
    k = 10
    parts = [search_knn.search_shard(q, q[lo:hi], lo, k, np.arange(len(q))) for lo, hi in bounds(len(q), shards)]
    merged = search_knn.merge_topk(parts, k)
    assert merged.ids.shape == (90, k)
    assert not (merged.ids == np.arange(90)[:, None]).any()
    whole = search_knn.knn(q, q, k, exclude_self=True)
    assert np.array_equal(merged.ids, whole.ids)


def test_a_shard_smaller_than_k_keeps_every_item():
    q, _, db, _ = data(3, tied=False)
    part = search_knn.search_shard(q, db[:5], 100, 8, self_ids=np.arange(len(q)) + 100)
    assert part.ids.shape == (len(q), 5)
    # queries 0..4 are items 100..104: each loses itself and keeps the other four
    assert ((part.ids[:5] >= 0).sum(1) == 4).all() and ((part.ids[5:] >= 0).sum(1) == 5).all()


@pytest.mark.parametrize("shards", [1, 3, 4])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("self_search", [False, True])
def test_two_pass_sharded_full_ranking_equals_one_matrix(shards, tied, self_search):
    q, ql, db, dl = data(4, tied)
    if self_search:
        db, dl = q, ql
    own = np.arange(len(q)) if self_search else None
    whole = search_ranks.full_ranks(q, ql, None if self_search else db, None if self_search else dl)
    spans = bounds(len(db), shards)
    positives = [search_sharded.positive_scores(q, ql, db[lo:hi], dl[lo:hi], lo, own) for lo, hi in spans]
    thresholds = search_sharded.Csr.merge_sorted(positives)
    negatives = sum(search_sharded.negative_counts(q, ql, db[lo:hi], dl[lo:hi], thresholds) for lo, hi in spans)
    num_pos = search_ranks.positives_per_query(ql, dl, self_search)
    ranks = search_sharded.ranks_from_counts(thresholds, negatives, num_pos, len(db) - int(self_search))
    assert np.array_equal(ranks.offsets, whole.offsets)
    assert np.array_equal(ranks.ranks, whole.ranks) and np.array_equal(ranks.hits, whole.hits)
    assert compute(ranks, NAMES) == compute(whole, NAMES)


def test_topk_beyond_the_faiss_gpu_limit_is_exact():
    rng = np.random.default_rng(5)
    q, db = unit(rng.normal(size=(6, 8))), unit(rng.normal(size=(3000, 8)))
    k = search_knn.FAISS_GPU_MAX_K + 300
    scores, ids = search_knn.torch_knn(q, db, k)  # the GPU path's method, run on the CPU
    ours = search_knn.sort_lists(search_knn.Neighbours(scores, ids))
    ref = search_knn.knn(q, db, k)
    assert ref.ids.shape == (6, k)
    assert np.array_equal(np.sort(ours.ids, 1), np.sort(ref.ids, 1))
    np.testing.assert_allclose(ours.scores, ref.scores, atol=1e-6)


def test_merge_needs_at_least_one_shard():
    with pytest.raises(ValueError, match="at least one"):
        search_knn.merge_topk([], 5)


# ----------------------------------------------------------------------------- the stage, sharded


def write_features(run: RunDir, split: str, embeddings: np.ndarray, labels: np.ndarray, parts: int = 2) -> None:
    """Features in the extract stage's format, as if ``parts`` ranks had written them."""
    out = run.features(split)
    for r in range(parts):
        lo, hi = len(labels) * r // parts, len(labels) * (r + 1) // parts
        part = features.part_path(out, r, parts)
        atomic_write_npy(features.embeddings_path(part), embeddings[lo:hi].astype(np.float32))
        buf = io.BytesIO()
        np.savez(buf, keys=np.array([f"{split}{i:05d}" for i in range(lo, hi)]), labels=labels[lo:hi],
                 range=np.array([lo, hi]))
        atomic_write_bytes(part, buf.getvalue())
    atomic_write_json(out / "manifest.json", {
        "split": split, "num_samples": len(labels), "parts": [features.part_path(out, r, parts).name for r in range(parts)],
        "format": features.FORMAT, "dim": embeddings.shape[1], "dtype": "float32"})


def stage_config(tmp: Path, name: str, **evaluate_fields: object) -> ExperimentConfig:
    ev = {"metrics": NAMES + ["roc_auc", "cos_sim_pos", "cos_sim_neg"], "roc_pairs": 5000, **evaluate_fields}
    return from_dict({"run": {"root": str(tmp / "runs"), "name": name}, "data": {"root": str(tmp / "no-shards")},
                      "evaluate": ev}, name)


def fake_run(tmp: Path, name: str, self_search: bool, **evaluate_fields: object) -> tuple[ExperimentConfig, RunDir]:
    q, ql, db, dl = data(6, tied=True, nq=60)
    cfg = stage_config(tmp, name, database="" if self_search else "database", **evaluate_fields)
    run = RunDir(cfg.run_dir)
    write_features(run, "query", q, ql)
    if not self_search:
        write_features(run, "database", db, dl, parts=3)
    return cfg, run


@pytest.mark.parametrize("self_search", [False, True])
def test_sharded_stage_writes_the_unsharded_results(tmp_path, self_search):
    one_cfg, one = fake_run(tmp_path, "one", self_search)
    evaluate_stage(one_cfg, one, DistInfo())
    four_cfg, four = fake_run(tmp_path, "four", self_search, db_shards=4)
    evaluate_stage(four_cfg, four, DistInfo())
    a, b = json.loads(one.results.read_text()), json.loads(four.results.read_text())
    for key in NAMES + ["roc_auc", "cos_sim_pos", "cos_sim_neg"]:
        assert a[key] == b[key], key
    assert b["meta"]["db_shards"] == 4 and "over 4 database shards" in b["meta"]["ranking"]
    assert a["meta"]["roc_pairs_sampled"] == b["meta"]["roc_pairs_sampled"]
    with np.load(one.eval / "neighbours.npz") as x, np.load(four.eval / "neighbours.npz") as y:
        assert np.array_equal(x["ids"], y["ids"]) and np.array_equal(x["scores"], y["scores"])
    assert len(list((four.eval / "shards").glob("count-*"))) == 4  # map needed the second pass


def test_array_tasks_run_in_any_order_and_the_merge_names_missing_ones(tmp_path):
    cfg, run = fake_run(tmp_path, "tasks", self_search=False, db_shards=3)
    for i in (2, 0):
        evaluate_sharded.search_task(cfg, run, i, 3)
    with pytest.raises(ValueError, match=r"tasks \[1\] of 3 are missing"):
        evaluate_sharded.count_task(cfg, run, 0, 3)
    evaluate_sharded.search_task(cfg, run, 1, 3)
    assert evaluate_sharded.needs_count_pass(cfg)
    for i in (1, 2, 0):
        evaluate_sharded.count_task(cfg, run, i, 3)
    out = evaluate_sharded.merge_shards(cfg, run, DistInfo())
    ref_cfg, ref = fake_run(tmp_path, "ref", self_search=False)
    assert evaluate_stage(ref_cfg, ref, DistInfo()) == out
    with pytest.raises(ValueError, match=r"task 3 of 3"):
        evaluate_sharded.search_task(cfg, run, 3, 3)


def test_sampled_queries_search_the_whole_split_without_themselves(tmp_path):
    cfg, run = fake_run(tmp_path, "sampled", self_search=True, sample_queries=20, metrics=["recall@1", "map"])
    evaluate_stage(cfg, run, DistInfo())
    results = json.loads(run.results.read_text())
    assert results["meta"]["num_queries"] == 20 and results["meta"]["num_database"] == 59
    assert results["meta"]["sampled_queries"] is True
    with np.load(run.eval / "neighbours.npz") as z:
        assert len(z["queries"]) == 20 and not (z["ids"] == z["queries"][:, None]).any()
        assert z["ids"].max() >= 20  # the database is the whole split, not the sample

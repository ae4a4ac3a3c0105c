"""The evaluation under a small memory budget (many blocks) equals one with a large budget, value for value.

The one-pass scan splits the queries into blocks by ``evaluate.block_mb``; nothing it
returns may depend on where the blocks fall: every metric, every saved neighbour (id and
score), with the queries searched against another split or against themselves, with
heavily tied scores, and with queries that have no positive at all. The values also equal
those of the two-pass protocol (FAISS top-k lists, all ranks in memory) and scikit-learn's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from imret import metrics as metric_lib
from imret.config import ConfigError, from_dict
from imret.distributed import DistInfo
from imret.evaluate import ExactSearch, evaluate
from imret.evaluate.core import SearchPlan
from imret.evaluate.stage import evaluate_stage
from imret.rundir import RunDir
from imret.search.blocks import GEMM_ROWS, Workspace, gpu_path, score_block
from imret.search.knn import search_shard
from imret.search.ranks import full_ranks
from imret.search.scan import plan_rows
from tests.test_search_shards import write_features

NAMES = ["map", "map@R", "map@5", "r_precision", "precision@1", "recall@1", "recall@4", "top3"]
SMALL_MB = 0.01  # one product of GEMM_ROWS rows per block: several blocks for these sizes
LARGE_MB = 1e5  # every query in one block


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def data(seed: int, tied: bool, nq: int = 150, ndb: int = 1500, d: int = 16) -> tuple[np.ndarray, ...]:
    """Database labels 0-3, query labels 0-4 and two labels of one query each: queries without a
    positive, searched against the database or against the queries themselves.
    ``tied``: eight distinct vectors, so that nearly every score ties with many others."""
    rng = np.random.default_rng(seed)
    if tied:
        base = unit(rng.normal(size=(8, d)))
        q, db = base[rng.integers(0, 8, nq)], base[rng.integers(0, 8, ndb)]
    else:
        q, db = unit(rng.normal(size=(nq, d))), unit(rng.normal(size=(ndb, d)))
    ql = rng.integers(0, 5, nq)
    ql[[0, nq // 2]] = 9, 10
    return q, ql, db, rng.integers(0, 4, ndb)


def run(q: np.ndarray, ql: np.ndarray, db: np.ndarray | None, dl: np.ndarray | None, block_mb: float,
        neighbours: int = 20):
    return evaluate(q, ql, db, dl, NAMES, neighbours=neighbours, search=ExactSearch(device="cpu", block_mb=block_mb))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("self_search", [False, True])
def test_small_budget_equals_large_budget(tied, self_search):
    q, ql, db, dl = data(1 + tied, tied)
    if self_search:
        db, dl = None, None
    n = len(q) if self_search else len(db)
    assert plan_rows(n, int(np.bincount(ql).max()), SMALL_MB, torch.device("cpu")) == GEMM_ROWS < len(q)  # blocks
    small, large = run(q, ql, db, dl, SMALL_MB), run(q, ql, db, dl, LARGE_MB)
    assert small.metrics == large.metrics and small.meta == large.meta
    assert small.meta["queries_without_positives"] > 0
    assert np.array_equal(small.neighbours.ids, large.neighbours.ids)
    assert np.array_equal(small.neighbours.scores, large.neighbours.scores)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("self_search", [False, True])
def test_one_pass_equals_the_two_pass_protocol_and_sklearn(tied, self_search):
    """Metrics as computed from all ranks at once; lists as FAISS finds them; map as scikit-learn's."""
    q, ql, db, dl = data(3 + tied, tied)
    own = np.arange(len(q)) if self_search else None
    if self_search:
        db, dl = q, ql
    result = run(q, ql, None if self_search else db, None if self_search else dl, SMALL_MB)
    ranks = full_ranks(q, ql, db, dl, self_ids=own, block_mb=LARGE_MB)
    assert result.metrics == metric_lib.compute(ranks, NAMES)
    faiss = search_shard(q, db, 0, 20, own)
    assert np.array_equal(result.neighbours.ids, faiss.ids)
    np.testing.assert_allclose(result.neighbours.scores, faiss.scores, atol=1e-6)
    # scikit-learn ranks the very scores imret ranks: numpy's own products differ in the last bit
    # (and do not even give duplicate rows equal scores), which would swap near-equal scores
    scores = score_block(q, torch.from_numpy(db), Workspace()).numpy()
    expected = []
    for i in range(len(q)):
        keep = np.arange(len(db)) != i if self_search else np.ones(len(db), bool)
        if (dl[keep] == ql[i]).any():
            expected.append(average_precision_score(dl[keep] == ql[i], scores[i, keep]))
    assert result.metrics["map"] == pytest.approx(np.mean(expected), abs=1e-12)


def test_gpu_code_path_on_cpu_equals_the_cpu_path():
    """The GPU's path (one block at a time, one counting call per block, torch's sort) run on CPU tensors."""
    q, ql, db, dl = data(5, True)
    cpu = run(q, ql, db, dl, SMALL_MB)
    with gpu_path():
        gpu = run(q, ql, db, dl, SMALL_MB)
    assert cpu.metrics == gpu.metrics
    assert np.array_equal(cpu.neighbours.ids, gpu.neighbours.ids)
    assert np.array_equal(cpu.neighbours.scores, gpu.neighbours.scores)


def test_per_query_values_give_computes_means():
    q, ql, db, dl = data(6, False)
    ranks = full_ranks(q, ql, db, dl)
    valid = ranks.num_positives > 0
    per_query = metric_lib.per_query(ranks, NAMES + ["roc_auc"])
    assert list(per_query) == NAMES  # pair metrics are not rank metrics
    assert {name: float(v[valid].mean()) for name, v in per_query.items()} == metric_lib.compute(ranks, NAMES)


def test_a_plan_without_the_full_ranking_keeps_the_faiss_top_k():
    q, ql, db, dl = data(7, False)
    names = ["map@R", "recall@1"]
    assert not SearchPlan.make(names, ql, dl, None, 0).full
    result = evaluate(q, ql, db, dl, names, neighbours=0, search=ExactSearch(block_mb=SMALL_MB))
    assert result.meta["ranking"].startswith("faiss exact top-")
    assert result.metrics == {k: v for k, v in run(q, ql, db, dl, SMALL_MB).metrics.items() if k in names}


# ----------------------------------------------------------------------------- the stage and its config


def stage_run(tmp_path, name: str, **evaluate_fields: object) -> tuple:
    q, ql, db, dl = data(8, True, nq=100, ndb=400)
    cfg = from_dict({"run": {"root": str(tmp_path / "runs"), "name": name}, "data": {"root": str(tmp_path / "none")},
                     "evaluate": {"metrics": NAMES, **evaluate_fields}}, name)
    run_dir = RunDir(cfg.run_dir)
    write_features(run_dir, "query", q, ql)
    write_features(run_dir, "database", db, dl, parts=3)
    evaluate_stage(cfg, run_dir, DistInfo())
    return run_dir


def test_stage_block_mb_changes_no_result(tmp_path):
    small, default = stage_run(tmp_path, "small", block_mb=SMALL_MB), stage_run(tmp_path, "default")
    a, b = json.loads(small.results.read_text()), json.loads(default.results.read_text())
    assert {k: v for k, v in a.items() if k != "meta"} == {k: v for k, v in b.items() if k != "meta"}
    with np.load(small.eval / "neighbours.npz") as x, np.load(default.eval / "neighbours.npz") as y:
        assert np.array_equal(x["ids"], y["ids"]) and np.array_equal(x["scores"], y["scores"])


@pytest.mark.parametrize("value", [0, -5])
def test_config_refuses_a_budget_that_is_not_positive(value):
    with pytest.raises(ConfigError, match=r"evaluate\.block_mb: .* positive number of MiB, got"):
        from_dict({"evaluate": {"block_mb": value}}, "bad")


def test_the_budget_is_not_part_of_the_config_digest():
    """It changes no result, so results written under another budget stay current."""
    assert from_dict({"evaluate": {"block_mb": 64}}, "e").digest() == from_dict({}, "e").digest()


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("self_search", [False, True])
def test_seeds_rank_metrics_under_a_small_budget(tied, self_search):
    """mips_map@K and ap_hits@K (the seeds' own), reduced block by block, equal the unblocked run
    and the same metrics computed from all ranks at once. Tied: groups of ~190 equal scores, so no
    positive ranks within 5 and ap_hits@5 is 0 (a block without a hit must not fail)."""
    q, ql, db, dl = data(9 + tied, tied)
    own = np.arange(len(q)) if self_search else None
    names = ["map", "mips_map@5", "ap_hits@5", "mips_map@40", "ap_hits@40"]
    db_arg, dl_arg = (None, None) if self_search else (db, dl)
    small, large = (evaluate(q, ql, db_arg, dl_arg, names, neighbours=0, search=ExactSearch(device="cpu", block_mb=mb))
                    for mb in (SMALL_MB, LARGE_MB))
    assert small.metrics == large.metrics
    ranks = full_ranks(q, ql, q if self_search else db, ql if self_search else dl, self_ids=own, block_mb=LARGE_MB)
    assert small.metrics == metric_lib.compute(ranks, names)
    if tied:
        assert small.metrics["ap_hits@5"] == 0
    else:
        assert 0 < small.metrics["ap_hits@5"] <= 1 and small.metrics["mips_map@40"] < small.metrics["ap_hits@40"]

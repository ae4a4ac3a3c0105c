"""Retrieval metrics on hand-computed cases, against scikit-learn, and across ranking methods."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from imret import metrics
from imret.metrics import compute, ranks_from_lists
from imret.search import full_ranks, knn, ranks_from_knn

NAMES = ["map", "map@R", "map@2", "r_precision", "precision@1", "recall@1", "recall@2", "recall@4", "top3"]


def test_hand_computed_case():
    # query A: R=2 positives at ranks 1 and 3; query B: R=3 at ranks 2, 3, 6; query C: no positives.
    ranks = ranks_from_lists([[1, 3], [2, 3, 6], []], [2, 3, 0], depth=6, database_size=6)
    out = compute(ranks, NAMES)
    ap_a = (1 / 1 + 2 / 3) / 2
    ap_b = (1 / 2 + 2 / 3 + 3 / 6) / 3
    assert out["map"] == pytest.approx((ap_a + ap_b) / 2)
    # map@R: A (R=2): only rank 1 within top 2 -> 1/2; B (R=3): ranks 2,3 -> (1/2 + 2/3)/3
    assert out["map@R"] == pytest.approx((1 / 2 + (1 / 2 + 2 / 3) / 3) / 2)
    # map@2: A: (1/1) / min(2, 2) = 0.5; B: (1/2) / min(2, 3) = 0.25
    assert out["map@2"] == pytest.approx((0.5 + 0.25) / 2)
    assert out["r_precision"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert out["precision@1"] == pytest.approx(0.5) and out["recall@1"] == pytest.approx(0.5)
    assert out["recall@2"] == pytest.approx(1.0) and out["top3"] == pytest.approx(1.0)


def test_truncated_ranking_refuses_deep_metrics():
    ranks = ranks_from_lists([[1], [2]], [3, 3], depth=2, database_size=10)
    assert compute(ranks, ["recall@2"])["recall@2"] == 1.0
    with pytest.raises(ValueError, match="map needs the ranking to depth 10"):
        compute(ranks, ["map"])
    with pytest.raises(ValueError, match="recall@4 needs"):
        compute(ranks, ["recall@4"])


def test_check_metric_names():
    for name in NAMES + ["map@100", "roc_auc", "recall@32"]:
        metrics.check_metric_name(name)
    for bad in ["mAP", "recall@", "precision@5x", "auc"]:
        with pytest.raises(ValueError):
            metrics.check_metric_name(bad)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def data(seed: int, nq: int = 60, ndb: int = 400, d: int = 16, classes: int = 9):
    rng = np.random.default_rng(seed)
    return (unit(rng.normal(size=(nq, d))), rng.integers(0, classes, nq),
            unit(rng.normal(size=(ndb, d))), rng.integers(0, classes - 1, ndb))  # last class: no positives


@pytest.mark.parametrize("seed", [0, 1])
def test_map_equals_sklearn_average_precision(seed):
    q, ql, db, dl = data(seed)
    ranks = full_ranks(q, ql, db, dl, block=7)
    expected = [average_precision_score(dl == ql[i], db @ q[i]) for i in range(len(q)) if (dl == ql[i]).any()]
    assert compute(ranks, ["map"])["map"] == pytest.approx(np.mean(expected), abs=1e-12)


def test_self_retrieval_matches_sklearn_and_never_returns_the_query():
    q, ql, _, _ = data(3, nq=120)
    ranks = full_ranks(q, ql, None, None, block=50)
    expected = []
    for i in range(len(q)):
        others = np.arange(len(q)) != i
        if (ql[others] == ql[i]).any():
            expected.append(average_precision_score(ql[others] == ql[i], q[others] @ q[i]))
    assert compute(ranks, ["map"])["map"] == pytest.approx(np.mean(expected), abs=1e-12)
    neigh = knn(q, q, 10, exclude_self=True)
    assert not (neigh.ids == np.arange(len(q))[:, None]).any()
    assert neigh.ids.shape == (120, 10)


@pytest.mark.parametrize("self_search", [False, True])
def test_faiss_topk_and_exact_full_ranking_agree(self_search):
    q, ql, db, dl = data(5)
    if self_search:
        db, dl = None, None
    full = full_ranks(q, ql, db, dl, block=16)
    size = len(q) - 1 if self_search else len(db)
    neigh = knn(q, q if self_search else db, size, exclude_self=self_search)
    top = ranks_from_knn(neigh, ql, ql if self_search else dl, exclude_self=self_search)
    assert np.array_equal(full.ranks, top.ranks) and np.array_equal(full.offsets, top.offsets)
    assert compute(full, NAMES) == compute(top, NAMES)


def test_queries_without_positives_are_excluded():
    q, ql, db, dl = data(7)
    ranks = full_ranks(q, ql, db, dl)
    has = (dl[None, :] == ql[:, None]).any(1)
    assert (~has).sum() > 0  # the data has such queries
    keep = np.flatnonzero(has)
    sub = full_ranks(q[keep], ql[keep], db, dl)
    assert compute(ranks, NAMES) == compute(sub, NAMES)


def tied_data(seed: int):
    """Embeddings with many exact duplicates, so that scores tie."""
    rng = np.random.default_rng(seed)
    base = unit(rng.normal(size=(12, 8)))
    q_idx, db_idx = rng.integers(0, 12, 40), rng.integers(0, 12, 300)
    return base[q_idx], rng.integers(0, 4, 40), base[db_idx], rng.integers(0, 4, 300)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ties_follow_sklearn(seed):
    q, ql, db, dl = tied_data(seed)
    ranks = full_ranks(q, ql, db, dl, block=9)
    expected = [average_precision_score(dl == ql[i], db @ q[i]) for i in range(len(q)) if (dl == ql[i]).any()]
    assert compute(ranks, ["map"])["map"] == pytest.approx(np.mean(expected), abs=1e-9)
    # the same numbers from FAISS lists over the whole database, whatever order FAISS put ties in
    top = ranks_from_knn(knn(q, db, len(db)), ql, dl)
    assert compute(top, NAMES) == pytest.approx(compute(ranks, NAMES))


def test_all_tied_scores_give_the_base_rate_not_perfect_scores():
    db = np.tile(unit(np.ones((1, 4))), (10, 1))
    labels = np.array([0, 1] * 5)
    ranks = full_ranks(db[:2], labels[:2], db, labels)
    out = compute(ranks, ["map", "recall@1", "recall@10"])
    assert out["map"] == pytest.approx(0.5) and out["recall@1"] == 0.0 and out["recall@10"] == 1.0


def test_topk_lists_are_exact_to_depth_k_with_one_extra_neighbour():
    q, ql, db, dl = tied_data(4)
    full = compute(full_ranks(q, ql, db, dl), ["recall@1", "recall@4", "map@5", "precision@1"])
    top = ranks_from_knn(knn(q, db, 6), ql, dl)
    assert top.depth == 5
    assert compute(top, ["recall@1", "recall@4", "map@5", "precision@1"]) == pytest.approx(full)

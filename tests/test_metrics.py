"""Retrieval metrics on hand-computed cases, against scikit-learn, and across ranking methods."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from imret import metrics
from imret.metrics import compute, ranks_from_lists
from imret.search.knn import knn
from imret.search.ranks import full_ranks, ranks_from_knn

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


# ----------------------------------------------------------------------------- counting without sorting


def brute_counts(scores: np.ndarray, thresholds: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    return np.array([[(scores[r] >= thresholds[r, j]).sum() if j < sizes[r] else 0
                      for j in range(thresholds.shape[1])] for r in range(len(scores))])


@pytest.mark.parametrize("kind", ["continuous", "few values", "one ulp apart", "all equal"])
@pytest.mark.parametrize("bins", [None, 8, 256])
def test_count_at_least_is_exact(kind, bins):
    import torch

    from imret.search.counting import count_at_least

    rng = np.random.default_rng(11)
    rows, n, width = 9, 500, 40
    if kind == "continuous":
        scores = rng.normal(size=(rows, n)).astype(np.float32)
    elif kind == "few values":
        scores = rng.choice(rng.normal(size=7).astype(np.float32), size=(rows, n))
    elif kind == "one ulp apart":  # neighbouring floats: only an exact comparison separates them
        scores = np.nextafter(np.float32(0.25), np.float32(1), dtype=np.float32) * np.ones((rows, n), np.float32)
        scores = scores + rng.integers(-3, 4, (rows, n)).astype(np.float32) * np.float32(2 ** -25)
    else:
        scores = np.full((rows, n), 0.5, np.float32)
    scores[0, :3] = -np.inf  # left-out items (the query itself)
    sizes = rng.integers(0, width + 1, rows)
    sizes[1], sizes[2] = 0, 1
    thresholds = np.full((rows, width), np.inf, np.float32)
    for r in range(rows):
        thresholds[r, :sizes[r]] = np.sort(rng.choice(scores[r, 3:], sizes[r], replace=False))
    got = count_at_least(torch.from_numpy(scores), torch.from_numpy(thresholds), torch.from_numpy(sizes), bins)
    real = np.arange(width)[None, :] < sizes[:, None]
    assert np.array_equal(got.numpy()[real], brute_counts(scores, thresholds, sizes)[real])


def test_full_ranking_of_sampled_queries_leaves_each_out_of_its_own_ranking():
    q, ql, _, _ = data(8, nq=80)
    chosen = np.array([3, 10, 11, 40, 79])
    ranks = full_ranks(q[chosen], ql[chosen], q, ql, self_ids=chosen)
    expected = []
    for i in chosen:
        others = np.arange(len(q)) != i
        if (ql[others] == ql[i]).any():
            expected.append(average_precision_score(ql[others] == ql[i], q[others] @ q[i]))
    assert compute(ranks, ["map"])["map"] == pytest.approx(np.mean(expected), abs=1e-12)


# ----------------------------------------------------------------------------- every metric by hand


def test_each_rank_metric_on_a_hand_ranked_query():
    # one query, R = 4 positives at ranks 2, 3, 7, 9 of a 10-item ranking
    ranks = ranks_from_lists([[2, 3, 7, 9]], [4], depth=10, database_size=10)
    out = compute(ranks, ["map", "map@4", "map@R", "r_precision", "precision@1", "recall@1", "recall@2",
                          "recall@8", "top1", "top3", "map@1"])
    assert out["map"] == pytest.approx((1 / 2 + 2 / 3 + 3 / 7 + 4 / 9) / 4)
    assert out["map@4"] == pytest.approx((1 / 2 + 2 / 3) / 4)  # normalised by min(4, R) = 4
    assert out["map@R"] == pytest.approx((1 / 2 + 2 / 3) / 4)
    assert out["r_precision"] == pytest.approx(2 / 4)
    assert out["map@1"] == 0.0 and out["precision@1"] == 0.0 and out["recall@1"] == 0.0 and out["top1"] == 0.0
    assert out["recall@2"] == 1.0 and out["recall@8"] == 1.0 and out["top3"] == 1.0


def test_tied_scores_share_the_worst_rank_of_their_group():
    # scores: 0.9 (neg), 0.5 (pos), 0.5 (neg), 0.5 (pos), 0.1 (pos): the tie group holds places 2-4
    db = np.array([[0.9], [0.5], [0.5], [0.5], [0.1]], np.float32)
    labels = np.array([1, 0, 1, 0, 0])
    ranks = full_ranks(np.ones((1, 1), np.float32), np.array([0]), db, labels)
    assert ranks.ranks.tolist() == [4, 4, 5] and ranks.hits.tolist() == [2, 2, 3]
    expected = average_precision_score(labels == 0, db[:, 0])
    assert compute(ranks, ["map"])["map"] == pytest.approx(expected)
    assert expected == pytest.approx((2 / 4 + 2 / 4 + 3 / 5) / 3)  # each positive: hits / rank


# ----------------------------------------------------------------------------- pair metrics


def test_pair_metrics_by_hand():
    sims = np.array([0.9, 0.8, 0.4, 0.4, 0.1])
    positive = np.array([True, False, True, False, False])
    out = metrics.pair_metrics(sims, positive, ["roc_auc", "cos_sim_pos", "cos_sim_neg"])
    # positive 0.9 beats all 3 negatives; positive 0.4 beats 0.1, ties 0.4 (half), loses to 0.8
    assert out["roc_auc"] == pytest.approx((3 + 1.5) / 6)
    assert out["cos_sim_pos"] == pytest.approx(0.65) and out["cos_sim_neg"] == pytest.approx(1.3 / 3)
    curve = metrics.roc_curve(sims, positive)
    assert curve.fpr.tolist() == [0, 0, 1 / 3, 2 / 3, 1] and curve.tpr.tolist() == [0, 0.5, 0.5, 1, 1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_auc_equals_sklearn(seed):
    from sklearn.metrics import roc_auc_score, roc_curve

    rng = np.random.default_rng(seed)
    sims = rng.normal(size=500) if seed != 2 else rng.integers(0, 6, 500).astype(float)  # seed 2: heavy ties
    positive = rng.random(500) < 0.2 + 0.1 * seed
    sims = sims + positive * 0.5
    curve = metrics.roc_curve(sims, positive)
    assert curve.auc == pytest.approx(roc_auc_score(positive, sims), abs=1e-12)
    fpr, tpr, _ = roc_curve(positive, sims, drop_intermediate=False)
    assert np.allclose(curve.fpr, fpr) and np.allclose(curve.tpr, tpr)
    thin = curve.thinned(20)
    assert len(thin.fpr) <= 20 and thin.fpr[0] == 0 and thin.tpr[-1] == 1


def test_pair_metrics_need_both_kinds_of_pair():
    with pytest.raises(ValueError, match="positive and negative pairs"):
        metrics.roc_curve(np.array([0.1, 0.2]), np.array([True, True]))
    assert np.isnan(metrics.pair_metrics(np.array([0.3]), np.array([True]), ["roc_auc"])["roc_auc"])

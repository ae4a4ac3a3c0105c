"""The seeds' own metric definitions against values computed by the seeds' own code.

- ``mips_map@K``: the CIFAR seed's ``process_data/mips_cifar.py`` (tests/data/mips_cifar_reference.npz);
- ``ap_hits@K``: the CBIR seed's ``utils/metrics.py: APatk`` (tests/data/cbir_ap_reference.npz);
- ``roc21_auc``: the sketch seed's ``utils/roc_curve_from_scratch.py`` (tests/data/sketch_roc_reference.npz);
- ``inbatch_topK`` and the triplet cosines: the sketch seed's validation step, whose code
  cannot run on its own (a closure inside a LightningModule), written out here from
  ``train/train.py`` lines 191-204 and 244-267.

bench/make_*_reference.py say how each file was made.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from imret.evaluate import evaluate
from imret.evaluate.triplets import sample_triples
from imret.metrics import (ap_over_hits, check_metric_name, grid_roc, grid_roc_auc, mips_average_precision,
                           pair_metrics)
from imret.search.ranks import full_ranks

DATA = Path(__file__).parent / "data"


def load(name: str) -> dict[str, np.ndarray]:
    with np.load(DATA / name) as z:
        return {k: z[k] for k in z.files}


def inputs(ref: dict[str, np.ndarray], case: str) -> tuple[np.ndarray, ...]:
    return (ref[f"{case}__query"], ref[f"{case}__query_class"], ref[f"{case}__database"],
            ref[f"{case}__database_class"])


# ----------------------------------------------------------------------------- CIFAR: top-500 MIPS mAP


def test_mips_map_equals_the_cifar_seeds_per_query_values():
    ref = load("mips_cifar_reference.npz")
    for case in ("R500", "R100"):
        ranks = full_ranks(*inputs(ref, case), device="cpu")
        np.testing.assert_allclose(mips_average_precision(ranks, 500), ref[f"{case}__seed_ap_per_query"],
                                   rtol=0, atol=1e-12, err_msg=case)
        got = evaluate(*inputs(ref, case), ["mips_map@500", "map@500"])  # through FAISS's top-k search
        assert got.metrics["mips_map@500"] == pytest.approx(float(ref[f"{case}__seed_map"]), abs=1e-12)
    # map@500 divides by min(500, R): the same on CIFAR's 500 images per class, not with 100
    assert got.metrics["map@500"] > got.metrics["mips_map@500"] + 0.1


def test_mips_map_divides_by_k_where_the_seed_divides_by_a_literal_500():
    ref = load("mips_cifar_reference.npz")
    ranks = full_ranks(*inputs(ref, "k50"), device="cpu")
    assert int(ref["k50__k"]) == 50
    np.testing.assert_allclose(mips_average_precision(ranks, 50) * 50 / 500, ref["k50__seed_ap_per_query"],
                               rtol=0, atol=1e-12)


def test_mips_map_on_tied_scores_differs_from_the_seed_only_by_the_order_of_ties():
    ref = load("mips_cifar_reference.npz")
    ours = mips_average_precision(full_ranks(*inputs(ref, "ties"), device="cpu"), 500)
    seed = ref["ties__seed_ap_per_query"]
    # the seed keeps torch.topk's order of equal scores, imret ranks a tie group at its worst rank
    # (docs/evaluation.md); on 15-fold duplicated vectors the two part by at most 0.0053 per query
    assert 0 < np.abs(ours - seed).max() < 0.01


# ----------------------------------------------------------------------------- CBIR: AP over the hits in the top r


def test_ap_hits_equals_the_cbir_seeds_apatk():
    ref = load("cbir_ap_reference.npz")
    for case in ref["cases"]:
        r = int(ref[f"{case}__r"])
        ranks = full_ranks(*inputs(ref, case), device="cpu")
        np.testing.assert_allclose(ap_over_hits(ranks, r), ref[f"{case}__seed_ap_per_query"], rtol=0, atol=1e-12)
        got = evaluate(*inputs(ref, case), [f"ap_hits@{r}", f"map@{r}"]).metrics
        assert got[f"ap_hits@{r}"] == pytest.approx(float(ref[f"{case}__seed_map"]), abs=1e-12)
        assert abs(got[f"map@{r}"] - got[f"ap_hits@{r}"]) > 0.1  # map@K divides by min(K, R), not the hits
    assert (ref["few__seed_ap_per_query"] == 0).sum() == 2  # queries with no hit in their top r score 0


def test_ap_hits_hand_case():
    from imret.metrics import ranks_from_lists

    # hits at ranks 2 and 5 of the top 5: (1/2 + 2/5) / 2; a query whose positives are all beyond 5: 0
    ranks = ranks_from_lists([[2, 5, 9], [6, 7]], [3, 2], depth=20, database_size=20)
    assert ap_over_hits(ranks, 5).tolist() == pytest.approx([(1 / 2 + 2 / 5) / 2, 0.0])


# ----------------------------------------------------------------------------- sketch: the 21-threshold ROC


@pytest.mark.parametrize("case", ["random", "threshold_ties", "outside_grid"])
def test_roc21_equals_the_sketch_seeds_curve_and_area(case):
    ref = load("sketch_roc_reference.npz")
    sims, positive = ref[f"{case}__prediction"], ref[f"{case}__actual"] == 1
    tpr, fpr = grid_roc(sims, positive)
    np.testing.assert_array_equal(tpr, ref[f"{case}__tpr"])
    np.testing.assert_array_equal(fpr, ref[f"{case}__fpr"])
    auc = grid_roc_auc(sims, positive)
    assert auc == pytest.approx(abs(float(ref[f"{case}__trapz_raw"])), abs=1e-15)
    assert round(auc, 4) == float(ref[f"{case}__auc_seed"])
    assert pair_metrics(sims, positive, ["roc21_auc"])["roc21_auc"] == auc


def test_roc21_with_one_class_is_a_clear_error_or_nan():
    ref = load("sketch_roc_reference.npz")
    assert "ZeroDivisionError" in str(ref["one_class__error"])  # what the seed's script does
    sims, positive = ref["one_class__prediction"], ref["one_class__actual"] == 1
    with pytest.raises(ValueError, match="needs positive and negative pairs; got 5 positive and 0 negative"):
        grid_roc(sims, positive)
    assert np.isnan(pair_metrics(sims, positive, ["roc21_auc", "roc_auc"])["roc21_auc"])


def test_roc21_sees_only_its_grid_where_roc_auc_sees_every_pair():
    sims = np.array([0.91, 0.92, 0.93, 0.94])  # all inside one grid cell: the grid cannot order them
    positive = np.array([False, False, True, True])
    assert pair_metrics(sims, positive, ["roc_auc"])["roc_auc"] == 1.0
    # every grid point is (1, 1) (thresholds <= 0.9) or (0, 0) (>= 0.95): the diagonal, chance
    assert grid_roc_auc(sims, positive) == pytest.approx(0.5, abs=1e-15)


# ----------------------------------------------------------------------------- sketch: in-batch top-k, triplet cosines


def seed_validation_batch(q: np.ndarray, p: np.ndarray, n: np.ndarray, cls: np.ndarray) -> tuple[float, ...]:
    """The sketch seed's validation_step figures for one batch, written out from its loop: for each query i,
    cos(q_i, every p_j), the top 3; a hit when cls[i] is among the classes of those positives."""
    q, p, n = (np.asarray(x, np.float64) for x in (q, p, n))
    cos = lambda a, b: (a @ b.T) / np.outer(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1))  # noqa: E731
    top1 = top3 = 0
    for i in range(len(q)):
        sim = cos(q[i:i + 1], p)[0]
        inds = np.argsort(-sim, kind="stable")[:3]
        top3 += int(cls[i] in cls[inds])
        top1 += int(cls[i] == cls[inds[0]])
    pos = np.mean([cos(q[i:i + 1], p[i:i + 1])[0, 0] for i in range(len(q))])
    neg = np.mean([cos(q[i:i + 1], n[i:i + 1])[0, 0] for i in range(len(q))])
    return top1 / len(q), top3 / len(q), pos, neg


def sketch_like(seed: int, queries: int = 50, sketches: int = 120, classes: int = 6, dim: int = 8):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((classes, dim))
    q_cls, d_cls = rng.integers(0, classes, queries), rng.integers(0, classes, sketches)
    scale = rng.uniform(0.5, 20, (queries, 1))  # raw, unnormalised features, as the seed's pooled ones
    q = scale * (centers[q_cls] + 1.2 * rng.standard_normal((queries, dim)))
    d = rng.uniform(0.5, 20, (sketches, 1)) * (centers[d_cls] + 1.2 * rng.standard_normal((sketches, dim)))
    return q.astype(np.float32), q_cls, d.astype(np.float32), d_cls


NAMES = ["inbatch_top1", "inbatch_top3", "cos_sim_triplet_pos", "cos_sim_triplet_neg"]


def test_inbatch_metrics_follow_the_sketch_seeds_validation_step():
    q, q_cls, d, d_cls = sketch_like(0)
    result = evaluate(q, q_cls, d, d_cls, NAMES + ["recall@1"], triplet_batch=8, seed=4)
    triples = sample_triples(q_cls, d_cls, None, 8, 4)
    assert len(triples.query) == 48 and result.meta["triplet_batches"] == 6  # 50 queries: 2 left over
    per_batch = []
    for b in range(6):
        rows = slice(8 * b, 8 * b + 8)
        qi, pi, ni = triples.query[rows], triples.positive[rows], triples.negative[rows]
        per_batch.append(seed_validation_batch(q[qi], d[pi], d[ni], q_cls[qi]))
    expected = np.mean(per_batch, axis=0)  # PL's epoch mean of equal-sized batches
    for name, value in zip(NAMES, expected):
        assert result.metrics[name] == pytest.approx(value, abs=1e-12), name
    assert result.metrics["inbatch_top3"] > result.metrics["inbatch_top1"]
    assert result.metrics["cos_sim_triplet_pos"] > result.metrics["cos_sim_triplet_neg"]


def test_triples_are_seeded_class_consistent_and_never_self():
    q, q_cls, d, d_cls = sketch_like(1)
    a, b = sample_triples(q_cls, d_cls, None, 5, 9), sample_triples(q_cls, d_cls, None, 5, 9)
    assert all(np.array_equal(x, y) for x, y in ((a.query, b.query), (a.positive, b.positive), (a.negative, b.negative)))
    assert not np.array_equal(a.query, sample_triples(q_cls, d_cls, None, 5, 10).query)
    assert (d_cls[a.positive] == q_cls[a.query]).all() and (d_cls[a.negative] != q_cls[a.query]).all()
    labels = np.array([0, 0, 1, 1, 1, 2])  # self-search: the queries are the database; class 2 has no positive
    own = sample_triples(labels, labels, np.arange(6), 1, 0)
    assert sorted(own.query.tolist()) == [0, 1, 2, 3, 4] and (own.positive != own.query).all()
    assert (labels[own.positive] == labels[own.query]).all()


def test_triplet_metrics_are_nan_without_a_full_batch_and_topk_needs_k_positives():
    q, q_cls, d, d_cls = sketch_like(2, queries=5)
    assert np.isnan(evaluate(q, q_cls, d, d_cls, ["inbatch_top1"], triplet_batch=8).metrics["inbatch_top1"])
    with pytest.raises(ValueError, match="inbatch_top3 needs batches of at least 3 triples, got 2"):
        evaluate(q, q_cls, d, d_cls, ["inbatch_top3"], triplet_batch=2)


def test_the_new_names_are_known_and_triplet_metrics_refuse_a_sharded_evaluation(tmp_path):
    for name in ("mips_map@500", "ap_hits@10", "roc21_auc", "inbatch_top1", "inbatch_top3", "cos_sim_triplet_pos",
                 "cos_sim_triplet_neg"):
        check_metric_name(name)
    with pytest.raises(ValueError, match="unknown metric 'inbatch_topk'"):
        check_metric_name("inbatch_topk")

    from imret.checks import resolve
    from imret.config import ConfigError, Experiments

    exps = Experiments.load(Path(__file__).resolve().parents[1] / "experiments.yaml")
    with pytest.raises(ConfigError, match="inbatch_top1 draws .* set evaluate.db_shards: 1"):
        resolve(exps, "sketchy_tiny", ["evaluate.db_shards=2", "evaluate.metrics=[inbatch_top1]"])

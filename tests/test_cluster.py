"""The cluster stage: planted clusters are recovered, quality figures are right, sidecars keep the seed's masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score, pair_confusion_matrix

from imret import features, metrics
from imret.cluster import density as peaks
from imret.cluster import methods
from imret.cluster.stage import cluster_stage
from imret.extract import extract_stage
from imret.search import graph
from imret.config import ClusterConfig
from imret.data.labels import LABELLED, SELECTED, UNSELECTED, build_sidecar, load_sidecar
from imret.data.shards import ShardSplit
from imret.distributed import DistInfo
from imret.rundir import RunDir
from tests.helpers import tiny_images, write_tiny_split
from tests.test_train import tiny_config

BLOBS, PER_BLOB, DIM, NOISE = 30, 40, 32, 200


def planted(seed: int = 0, sigma: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """30 blobs x 40 unit vectors (within-blob cosine ~0.94) and 200 uniform noise points (label -1)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((BLOBS, DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(BLOBS), PER_BLOB)
    members = centres[labels] + sigma / np.sqrt(DIM) * rng.standard_normal((len(labels), DIM))
    x = np.concatenate([members, rng.standard_normal((NOISE, DIM))])
    order = rng.permutation(len(x))  # interleave blobs and noise: nothing may depend on input order
    labels = np.concatenate([labels, np.full(NOISE, -1)])[order]
    return graph.normalise(x[order].astype(np.float32)), labels


# ----------------------------------------------------------------------------- recovering planted clusters


def test_planted_blobs_are_recovered_and_noise_is_left_unselected():
    x, truth = planted()
    result = peaks.density_peaks(x, ClusterConfig())
    blob, noise = truth >= 0, truth < 0
    sel = result.selected
    assert not sel[noise].any()  # every noise point is left out
    assert sel[blob].mean() >= 0.95  # and nearly every blob member is kept
    q = metrics.quality(result.labels[sel], truth[sel])
    print({k: round(v, 4) for k, v in q.items()})
    assert q["pairwise_f"] > 0.95 and q["bcubed_f"] > 0.95 and q["nmi"] > 0.95
    assert len(np.unique(result.labels[sel])) == BLOBS
    sidecar = build_sidecar(np.array([], str), np.array([], np.int64), np.arange(len(x)).astype(str),
                                    result.labels, sel)
    assert (sidecar.mask[noise] == UNSELECTED).all() and (sidecar.labels[noise] == -1).all()


def test_levels_join_blobs_that_local_links_split():
    """With tau near the within-blob similarity, links alone cut some blobs; the next level joins them."""
    x, truth = planted()
    one = peaks.density_peaks(x, ClusterConfig(levels=1))
    full = peaks.density_peaks(x, ClusterConfig())
    pieces = len(np.unique(one.labels[one.selected]))
    assert pieces > BLOBS  # this data does over-segment at level 0 ...
    assert len(np.unique(full.labels[full.selected])) == BLOBS  # ... and levels repair it
    assert full.info["clusters_per_level"][0] == int(one.labels.max()) + 1
    q_one = metrics.quality(one.labels[one.selected], truth[one.selected])
    assert q_one["pairwise_precision"] == 1.0 and q_one["pairwise_recall"] < 0.99


def test_loose_blobs_are_not_merged_when_members_are_less_similar_than_tau():
    x, truth = planted(sigma=0.4)  # within-blob cosine ~0.86 < tau 0.9: too loose to be one class
    result = peaks.density_peaks(x, ClusterConfig())
    q = metrics.quality(result.labels, truth)
    assert q["pairwise_precision"] == 1.0 and len(np.unique(result.labels[truth >= 0])) > BLOBS


def test_average_linkage_is_the_mean_similarity_between_members():
    rng = np.random.default_rng(5)
    x = graph.normalise(rng.standard_normal((40, 6)).astype(np.float32))
    labels = rng.integers(0, 5, 40)
    means = peaks.cluster_means(x, labels, 5)
    cos = graph.normalise(means) @ graph.normalise(means).T
    ids = np.array([[j for j in range(5) if j != i] for i in range(5)])
    linked = peaks.average_linkage(np.take_along_axis(cos, ids, 1), ids, np.linalg.norm(means, axis=1))
    brute = np.array([[(x[labels == i] @ x[labels == j].T).mean() for j in row] for i, row in enumerate(ids)])
    np.testing.assert_allclose(linked, brute, atol=1e-5)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_graph_agrees_with_exact(kind):
    x, truth = planted(seed=1)
    exact_sims, exact_ids, exact_info = graph.knn_graph(x, 10)
    sims, ids, info = graph.knn_graph(x, 10, exact_below=0, index=kind, recall_sample=300)
    assert exact_info["method"] == "exact" and exact_info["recall"] is None
    assert info["method"] == kind and info["recall"] >= 0.95
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), exact_ids.tolist())])
    assert overlap >= 0.95, f"{kind} found {overlap:.3f} of the exact neighbours"
    assert (ids != np.arange(len(x))[:, None]).all()  # never a point itself
    assert (np.diff(sims, axis=1) <= 0).all()  # lists run from the most similar down
    result = peaks.density_peaks(x, ClusterConfig(exact_below=0, index=kind))
    assert metrics.quality(result.labels[result.selected], truth[result.selected])["pairwise_f"] > 0.95


def test_knn_graph_excludes_self_even_among_duplicates_and_caps_k():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 8)).astype(np.float32)
    x = np.concatenate([x, x[:2]])  # rows 6 and 7 duplicate rows 0 and 1
    sims, ids, _ = graph.knn_graph(x * 5.0, 20)  # unnormalised input, k larger than n - 1
    assert ids.shape == (8, 7)
    assert (ids != np.arange(8)[:, None]).all()
    assert ids[0, 0] == 6 and ids[6, 0] == 0 and ids[7, 0] == 1
    np.testing.assert_allclose(sims[[0, 6, 7], 0], 1.0, atol=1e-5)  # similarities are cosines


def test_recall_counts_a_tie_at_the_kth_place_as_found():
    # rows 1 and 2 coincide: for rows 0 and 3 they tie as nearest neighbour, and either one is right
    x = graph.normalise(np.array([[1, 0], [1, 0.1], [1, 0.1], [0, 1]], np.float32))
    ids = np.array([[2], [2], [1], [2]])
    sims = np.take_along_axis(x @ x.T, ids, 1)
    assert graph.exact_knn(x, 1)[1][[0, 3], 0].tolist() == [1, 1]  # exact search names the lower id
    assert graph.knn_recall(x, sims, ids, 4) == 1.0
    ids[3, 0] = 0  # a genuinely worse neighbour
    assert graph.knn_recall(x, np.take_along_axis(x @ x.T, ids, 1), ids, 4) == 0.75
    assert graph.knn_recall(x, sims, ids, 0) is None


# ----------------------------------------------------------------------------- density, links, selection


def test_links_go_to_the_most_similar_denser_neighbour_above_tau():
    ids = np.array([[1, 2], [0, 2], [1, 0], [0, 1]])
    sims = np.array([[0.95, 0.93], [0.95, 0.97], [0.97, 0.93], [0.5, 0.4]], np.float32)
    dens = np.array([0.5, 0.9, 0.6, 0.99], np.float32)
    # 0 -> 1 (most similar denser), 2 -> 1, 1 is a peak, 3 is denser than all but has no edge above tau
    labels = peaks.link_to_denser(ids, sims, dens, tau=0.9)
    assert labels.tolist() == [0, 0, 0, 1]
    # 0's link to 1 (0.95) is cut by tau 0.96, and 2 at 0.93 is below it too: 0 becomes its own peak
    assert peaks.link_to_denser(ids, sims, dens, tau=0.96).tolist() == [0, 1, 1, 2]


def test_equal_densities_are_ordered_by_index_and_form_no_cycle():
    n = 5
    ids = np.array([[j for j in range(n) if j != i] for i in range(n)])
    sims = np.full(ids.shape, 0.95, np.float32)
    labels = peaks.link_to_denser(ids, sims, np.full(n, 0.7, np.float32), tau=0.9)
    assert labels.tolist() == [0] * n  # one tree: every node points to a lower index, node 0 is the root
    shuffled = np.random.default_rng(0).permuted(np.arange(n - 1)[None].repeat(n, 0), axis=1)
    again = peaks.link_to_denser(np.take_along_axis(ids, shuffled, 1), sims, np.full(n, 0.7, np.float32), 0.9)
    assert again.tolist() == labels.tolist()


def test_density_is_mean_neighbour_similarity_and_missing_neighbours_count_zero():
    sims = np.array([[0.9, 0.8], [0.6, -np.inf]], np.float32)
    np.testing.assert_allclose(peaks.density(sims), [0.85, 0.3])


def test_select_keeps_dense_samples_of_clusters_with_enough_of_them():
    dens = np.array([0.9, 0.95, 0.85, 0.5, 0.99, 0.7], np.float32)
    labels = np.array([0, 0, 0, 0, 1, 1])
    assert peaks.select(dens, labels, 0.8, 2).tolist() == [True, True, True, False, False, False]
    assert peaks.select(dens, labels, 0.8, 1).tolist() == [True, True, True, False, True, False]


def test_find_roots_follows_long_chains():
    parent = np.concatenate([[0], np.arange(999)])  # 999 -> 998 -> ... -> 0
    assert (peaks.find_roots(parent) == 0).all()


# ----------------------------------------------------------------------------- quality


def test_quality_on_a_hand_computed_case():
    truth = np.array([0, 0, 0, 1, 1])
    pred = np.array([0, 0, 1, 1, 1])
    q = metrics.quality(pred, truth)
    # pairs together in both: {0,1}, {3,4}; in the prediction 4 pairs, in the truth 4 pairs
    assert q["pairwise_precision"] == q["pairwise_recall"] == q["pairwise_f"] == 0.5
    # BCubed per sample: precision 1, 1, 1/3, 2/3, 2/3; recall 2/3, 2/3, 1/3, 1, 1
    assert q["bcubed_precision"] == pytest.approx(11 / 15) and q["bcubed_recall"] == pytest.approx(11 / 15)
    assert q["nmi"] == pytest.approx(normalized_mutual_info_score(truth, pred))


def brute_bcubed(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    same_pred, same_truth = pred[:, None] == pred[None], truth[:, None] == truth[None]
    both = (same_pred & same_truth).sum(1)
    return float((both / same_pred.sum(1)).mean()), float((both / same_truth.sum(1)).mean())


@pytest.mark.parametrize("seed", range(4))
def test_quality_matches_sklearn_and_brute_force(seed):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 7, 300) * 3 - 5  # arbitrary label values, negatives too
    pred = np.where(rng.random(300) < 0.7, truth, rng.integers(0, 12, 300))
    q = metrics.quality(pred, truth)
    (_, fp), (fn, tp) = pair_confusion_matrix(truth, pred)
    assert q["pairwise_precision"] == pytest.approx(tp / (tp + fp))
    assert q["pairwise_recall"] == pytest.approx(tp / (tp + fn))
    assert (q["bcubed_precision"], q["bcubed_recall"]) == pytest.approx(brute_bcubed(pred, truth))
    assert q["nmi"] == pytest.approx(normalized_mutual_info_score(truth, pred), abs=1e-12)


def test_quality_edge_cases_follow_the_definitions():
    labels = np.arange(6)
    assert metrics.quality(labels, labels) == pytest.approx({k: 1.0 for k in metrics.quality(labels, labels)})
    one = np.zeros(6, int)
    q = metrics.quality(labels, one)  # all singletons against one class: precise, no recall
    assert q["pairwise_precision"] == 1.0 and q["pairwise_recall"] == 0.0 and q["pairwise_f"] == 0.0
    assert q["nmi"] == normalized_mutual_info_score(one, labels) == 0.0
    assert metrics.quality(one, one)["nmi"] == 1.0
    with pytest.raises(ValueError, match="equally long"):
        metrics.quality(labels, labels[:3])


# ----------------------------------------------------------------------------- sidecar and parameters


def test_sidecar_has_the_seeds_mask_semantics():
    clusters = np.array([5, 5, 2, 2, 8, 9])
    selected = np.array([True, True, True, True, False, False])
    side = build_sidecar(np.array(["a", "b", "c", "d"]), np.array([7, 3, 7, 9]),
                                 np.array(["u0", "u1", "u2", "u3", "u4", "u5"]), clusters, selected)
    assert side.keys.tolist() == ["a", "b", "c", "d", "u0", "u1", "u2", "u3", "u4", "u5"]
    assert side.mask.tolist() == [LABELLED] * 4 + [SELECTED] * 4 + [UNSELECTED] * 2
    # true labels 3 < 7 < 9 -> 0, 1, 2 (C = 3); selected clusters 2 < 5 -> C + 0, C + 1; the rest -1
    assert side.labels.tolist() == [1, 0, 1, 2, 4, 4, 3, 3, -1, -1]
    assert (side.classes, side.clusters) == (3, 2)
    assert side.mask.dtype == np.int8 and side.labels.dtype == np.int64


def test_sidecar_refuses_duplicate_keys_and_unlabelled_samples_among_the_labelled():
    with pytest.raises(ValueError, match="more than once"):
        build_sidecar(np.array(["a", "b"]), np.array([0, 1]), np.array(["b"]), np.array([0]),
                              np.array([True]))
    with pytest.raises(ValueError, match="without a label"):
        build_sidecar(np.array(["a"]), np.array([-1]), np.array(["b"]), np.array([0]), np.array([True]))


def test_unknown_method_and_bad_parameters_are_explained():
    with pytest.raises(ValueError, match="known methods are density"):
        methods.get_method("dbscan")
    with pytest.raises(ValueError, match="cosine similarity"):
        methods.check(ClusterConfig(splits=["u"], tau=1.5))
    with pytest.raises(ValueError, match="not both"):
        methods.check(ClusterConfig(splits=["u"], labelled=["u"]))
    with pytest.raises(ValueError, match="at least 1"):
        methods.check(ClusterConfig(splits=["u"], k=0))
    with pytest.raises(ValueError, match="unknown approximate index"):
        graph.knn_graph(np.eye(4, dtype=np.float32), 2, exact_below=0, index="lsh")


# ----------------------------------------------------------------------------- the stage


def stage_config(tmp_path: Path, thresh: float, tau: float = 0.9):
    return tiny_config(tmp_path / "d", tmp_path / "runs", "iter0", extract__checkpoint="init",
                       extract__splits=["unlab"], cluster__splits=["unlab"], cluster__labelled=["train"],
                       cluster__thresh=thresh, cluster__tau=tau)


def test_stage_writes_sidecar_results_and_tensorboard_and_rebuilds_on_rerun(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write_tiny_split(tmp_path / "d", "train", tiny_images(4, 6, seed=1, prefix="t"), 4)
    write_tiny_split(tmp_path / "d", "unlab", tiny_images(3, 10, seed=2, prefix="u"), 3)
    cfg = stage_config(tmp_path, 0.0)
    run = RunDir(cfg.run_dir)
    extract_stage(cfg, run, DistInfo())
    feats = features.load_features(run, "unlab")
    # Random-init features are all alike: thresholds at their medians give several clusters and
    # about half the samples selected, whatever the network's initialisation happens to be.
    sims = graph.knn_graph(feats.embeddings, cfg.cluster.k)[0]
    tau, thresh = float(np.median(sims)), float(np.median(peaks.density(sims)))
    cfg = stage_config(tmp_path, thresh, tau)

    assert cluster_stage(cfg, run, DistInfo(rank=1, world_size=2)) == {}  # other ranks do nothing
    assert not (run.cluster / "labels.npz").exists()
    summary = cluster_stage(cfg, run, DistInfo())
    side = load_sidecar(run.cluster / "labels.npz")
    train = ShardSplit(tmp_path / "d", "train")
    assert side["keys"].tolist() == train.keys.tolist() + feats.keys.tolist()
    n_lab = len(train.keys)
    assert (side["mask"][:n_lab] == LABELLED).all() and side["labels"][:n_lab].tolist() == train.labels.tolist()
    mask_u, lab_u = side["mask"][n_lab:], side["labels"][n_lab:]
    assert set(mask_u.tolist()) == {SELECTED, UNSELECTED}
    assert (lab_u[mask_u == UNSELECTED] == -1).all()
    assert sorted(set(lab_u[mask_u == SELECTED].tolist())) == list(range(4, 4 + summary["clusters"]))
    assert summary["clusters"] >= 2

    results = json.loads((run.cluster / "results.json").read_text())
    for key in ("samples", "clusters", "clusters_all", "selected", "selected_fraction", "unselected", "labelled",
                "labelled_classes", "pairwise_f", "bcubed_f", "nmi", "pairwise_f_all", "bcubed_f_all", "nmi_all",
                "seconds"):
        assert isinstance(results[key], (int, float)), key
    assert results["selected"] == int((mask_u == SELECTED).sum()) and results["labelled_classes"] == 4
    assert results["meta"]["index"] == "exact" and results["meta"]["k"] == 10

    acc = EventAccumulator(str(run.tb))
    acc.Reload()
    events = acc.Scalars("cluster/selected")
    assert [(e.step, e.value) for e in events] == [(0, results["selected"])]
    assert "cluster/pairwise_f_all" in acc.Tags()["scalars"]

    # Rerun with a threshold no density exceeds: the sidecar is rebuilt, the earlier selections are gone.
    cluster_stage(stage_config(tmp_path, 1.0, tau), run, DistInfo())
    side = load_sidecar(run.cluster / "labels.npz")
    assert (side["mask"][n_lab:] == UNSELECTED).all() and (side["labels"][n_lab:] == -1).all()
    assert len(side["keys"]) == n_lab + len(feats.keys)
    rerun = json.loads((run.cluster / "results.json").read_text())
    assert rerun["selected"] == 0 and "pairwise_f" not in rerun and "pairwise_f_all" in rerun

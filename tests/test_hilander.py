"""imret.cluster.hilander's own rules, on tiny graphs built here: what the reference file cannot pin down.

The reference comparison (test_hilander_reference.py) covers the numerics. These tests
cover determinism, the equivalence of our minibatch and whole-graph paths, chunking,
tie-breaking and the decoding rules, each on data small enough to reason about.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import imret.cluster.hilander as L


def blobs(seed: int = 0, sizes: tuple[int, ...] = (24, 16, 10), dim: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.ones(dim) + rng.normal(size=(len(sizes), dim))
    x = np.concatenate([c + 0.3 * rng.normal(size=(s, dim)) for c, s in zip(centres, sizes)])
    return x.astype(np.float32), np.repeat(np.arange(len(sizes)), sizes)


TINY = dict(knn_k=(5, 3), levels=(2, 2), hidden=16, epochs=2, batch_size=25, lr=0.05, device="cpu")


def test_training_is_deterministic_under_a_seed() -> None:
    x, y = blobs()
    first, _ = L.train_hilander(x, y, L.LanderParams(**TINY, seed=3))
    again, _ = L.train_hilander(x, y, L.LanderParams(**TINY, seed=3))
    other, _ = L.train_hilander(x, y, L.LanderParams(**TINY, seed=4))
    for name, value in first.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name
    assert any(not torch.equal(v, other.state_dict()[k]) for k, v in first.state_dict().items())


def test_training_leaves_the_global_torch_rng_alone() -> None:
    x, y = blobs()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    L.train_hilander(x, y, L.LanderParams(**TINY))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("num_conv, gat", [(2, True), (3, False)])
def test_minibatch_path_equals_the_whole_graph(num_conv: int, gat: bool) -> None:
    x, y = blobs()
    graph = L.build_level_graph(L.l2_normalise(x), 6, y)
    model = L.Lander(8, hidden=16, num_conv=num_conv, gat=gat, gat_k=2).eval()
    g = L.to_tensors(model, graph, torch.device("cpu"))
    probs, dens = L.predict(model, g)
    seeds = np.array([3, 17, 40, 41])  # a few nodes: their neighbourhoods are all the batch sees
    with torch.no_grad():
        logits, batch_dens = L.forward_batch(model, g, seeds)
    np.testing.assert_allclose(logits.softmax(-1).numpy(), probs.numpy()[seeds], atol=1e-6)
    np.testing.assert_allclose(batch_dens.numpy(), dens.numpy()[seeds], atol=1e-6)


def test_prediction_does_not_depend_on_the_chunk_size() -> None:
    x, y = blobs()
    graph = L.build_level_graph(L.l2_normalise(x), 6)
    model = L.Lander(8, hidden=16, num_conv=2).eval()
    g = L.to_tensors(model, graph, torch.device("cpu"))
    whole, small = L.predict(model, g, chunk=10**6), L.predict(model, g, chunk=7)
    for a, b in zip(whole, small):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)


def hand_graph(nbr: list[list[int]]) -> L.LevelGraph:
    """A graph with given neighbour lists (column 0 is the node itself) and similarity 0.5 everywhere."""
    nbr_a = np.array(nbr, dtype=np.int64)
    feats = np.eye(len(nbr), dtype=np.float32)
    return L.graph_from_knn(feats, nbr_a, np.full(nbr_a.shape, 0.5, np.float32))


def test_parent_is_the_most_probable_denser_neighbour_ties_to_the_smaller_id() -> None:
    graph = hand_graph([[0, 3, 2, 1], [1, 0, 2, 3], [2, 0, 1, 3], [3, 0, 1, 2]])
    density = np.array([0.1, 0.5, 0.5, 0.9], np.float32)
    other = np.array([[0.0, 0.05, 0.05, 0.05],  # node 0: three denser neighbours, all tied
                      [0.0, 0.0, 0.02, 0.08],  # node 1: 0 is sparser, 2 equally dense: only 3 counts
                      [0.0, 0.0, 0.0, 0.5],  # node 2: 3 is denser but improbable (0.5 >= 1 - tau)
                      [0.0, 0.0, 0.0, 0.0]], np.float32)  # node 3: the densest, a peak
    parent = L.choose_parents(graph, other, density, tau=0.9)
    np.testing.assert_array_equal(parent, [1, 3, -1, -1])
    labels, peaks = L.forest_labels(parent)
    np.testing.assert_array_equal(peaks, [2, 3])
    np.testing.assert_array_equal(labels, [1, 1, 0, 1])


def test_graph_drops_self_and_negative_similarities() -> None:
    x = np.array([[1, 0], [0.8, 0.6], [0.6, 0.8], [-1, 0.1]], np.float32)
    graph = L.build_level_graph(L.l2_normalise(x), 4)
    cos = L.l2_normalise(x) @ L.l2_normalise(x).T
    expected_valid = (graph.nbr != np.arange(4)[:, None]) & (cos[np.arange(4)[:, None], graph.nbr] >= 0)
    np.testing.assert_array_equal(graph.valid, expected_valid)
    assert (~graph.valid).sum() > 4  # some neighbours are dropped for their negative similarity
    got = graph.raw_affine[graph.valid]
    np.testing.assert_allclose(got, cos[np.arange(4)[:, None], graph.nbr][graph.valid], atol=1e-6)


def test_ground_truth_density_by_hand() -> None:
    nbr = np.array([[0, 1, 2], [1, 0, 2], [2, 1, 0]])
    dist = np.array([[0, 0.2, 0.4], [0, 0.2, 0.5], [0, 0.5, 0.4]], np.float32)
    labels = np.array([7, 7, 8])
    # node 0: +0.8 (same) - 0.6 (other); node 1: +0.8 - 0.5; node 2: -0.5 - 0.6; over k - 1 = 2
    np.testing.assert_allclose(L.ground_truth_density(dist, nbr, labels), [0.1, 0.15, -0.55], atol=1e-6)


@pytest.mark.parametrize("level, added, before, stop", [
    (9, 5, 100, True),  # the last level
    (1, 0, 100, True),  # nothing merged
    (1, 20, 100, True),  # 100 / 20 < k - 1: as many edges as the level before, roughly
    (1, 5, 100, False),  # 100 / 5 >= k - 1: still shrinking fast
    (0, 50, float("inf"), False),  # the first level
])
def test_stopping_rules(level: int, added: int, before: float, stop: bool) -> None:
    assert L.stop_iterating(level, 10, True, added, before, 10) is stop


def test_forest_joins_levels_through_original_ids() -> None:
    forest = L.Forest.start(6)
    peaks = forest.merge(np.array([-1, 0, -1, 2, -1, 4]))  # level 0: trees {0,1}, {2,3}, {4,5}
    np.testing.assert_array_equal(peaks, [0, 2, 4])
    forest.merge(np.array([-1, 0, -1]))  # level 1 over the peaks 0, 2, 4: 2 joins 0
    np.testing.assert_array_equal(forest.labels(), [0, 0, 0, 0, 1, 1])
    assert forest.added == [3, 1]
    np.testing.assert_array_equal(forest.ids, [0, 4])


def test_a_model_sure_of_nothing_links_nothing_and_selects_nothing() -> None:
    x, _ = blobs()
    model = L.Lander(8, hidden=16)
    with torch.no_grad():
        model.classifier_conn[3].weight.zero_()
        model.classifier_conn[3].bias.copy_(torch.tensor([10.0, -10.0]))  # always "other class"
    labels, density, selected, info = L.infer_hilander(model, x, L.LanderParams(test_k=5, device="cpu"))
    np.testing.assert_array_equal(labels, np.arange(len(x)))
    assert info["edges_added"] == [0] and not selected.any() and (density < 0).all()


def test_a_model_sure_of_everything_merges_and_stops() -> None:
    x, _ = blobs()
    model = L.Lander(8, hidden=16)
    with torch.no_grad():
        model.classifier_conn[3].weight.zero_()
        model.classifier_conn[3].bias.copy_(torch.tensor([-10.0, 10.0]))  # always "same class"
    labels, density, selected, info = L.infer_hilander(model, x, L.LanderParams(test_k=5, device="cpu"))
    assert info["edges_added"][0] > 0 and len(np.unique(labels)) < len(x)
    # Every node's density is then its mean neighbour similarity, so selection is by that.
    graph = L.build_level_graph(L.l2_normalise(x), 5)
    np.testing.assert_allclose(density, graph.raw_affine.sum(1) / graph.valid.sum(1), atol=1e-5)
    np.testing.assert_array_equal(selected, density > 0.8)


# ----------------------------------------------------------------------------- cluster.method: hilander


def test_the_method_is_registered_and_given_known() -> None:
    from imret.cluster.methods import LEARNS, get_method

    assert "hilander" in LEARNS and get_method("hilander") is L.hilander


def test_the_method_trains_keeps_its_files_and_clusters(tmp_path) -> None:
    from imret.cluster.clustering import Known
    from imret.config import ClusterConfig

    x, y = blobs(sizes=(30, 24, 20, 16))
    params = ClusterConfig(method="hilander", k=5)
    params.hilander.epochs, params.hilander.hidden, params.hilander.device = 3, 16, "cpu"
    result = L.hilander(x[::2], params, Known(x[1::2], y[1::2], tmp_path / "hl"))
    assert result.labels.dtype == np.int64 and len(result.labels) == len(x[::2])
    assert np.array_equal(result.selected, result.density.astype(np.float64) > params.thresh)
    saved = torch.load(tmp_path / "hl" / L.CHECKPOINT, weights_only=True)
    again = L.load_model(tmp_path / "hl" / L.CHECKPOINT, 8, L.LanderParams.from_config(params))
    assert all(torch.equal(saved[k], v) for k, v in again.state_dict().items())
    assert len((tmp_path / "hl" / L.TRAIN_LOG).read_text().splitlines()) == 3
    assert result.info["training_graph_nodes"][0] == len(x[1::2]) and result.info["knn"] == "exact"


@pytest.mark.parametrize("labels, message", [(None, "cluster.labelled"), ("one", "at least 2 classes"),
                                             ("few", "too few")])
def test_too_little_to_learn_from_is_a_clear_error(labels, message, tmp_path) -> None:
    from imret.cluster.clustering import Known
    from imret.config import ClusterConfig

    x, y = blobs()
    known = None if labels is None else Known(x[:30], np.zeros(30, np.int64) if labels == "one" else y[:30],
                                               tmp_path)
    if labels == "few":
        known = Known(x[:3], np.array([0, 1, 1]), tmp_path)
    with pytest.raises(ValueError, match=message):
        L.hilander(x, ClusterConfig(method="hilander"), known)


@pytest.mark.parametrize("change, message", [
    ({"hilander": {"epochs": 0}}, "cluster.hilander.epochs: must be >= 1"),
    ({"hilander": {"lr": -1.0}}, "cluster.hilander.lr: must be >= 0"),
    ({"hilander": {"train_levels": [2, 3]}}, "equally long"),
    ({"hilander": {"train_k": [10, 1, 3]}}, "every k >= 2"),
    ({"hilander": {"num_conv": 5}}, "1 to 4"),
    ({"hilander": {"momentum": 1.0}}, "below 1"),
    ({"hilander": {"device": "gpu0"}}, "cuda:N"),
    ({"tau": 1.5}, "[-1, 1]"),
    ({"tau": -0.1}, "probability"),
    ({"index": "ivf"}, "HNSW only"),
])
def test_bad_hilander_settings_are_refused(change, message) -> None:
    from imret.cluster.methods import check
    from imret.config import from_dict

    cluster = {"method": "hilander", "splits": ["u"], **change}
    with pytest.raises(ValueError) as err:
        check(from_dict({"cluster": cluster}, "x").cluster)
    assert message in str(err.value)


def test_pss_defaults_and_the_digest() -> None:
    from imret.config import from_dict

    cfg = from_dict({"cluster": {"method": "hilander"}}, "x")
    p = L.LanderParams.from_config(cfg.cluster)
    assert p == L.LanderParams(device="auto")  # the config's defaults are PSS's recipe, as LanderParams's
    density = from_dict({}, "x")
    retuned = from_dict({"cluster": {"hilander": {"epochs": 5}}}, "x")
    assert retuned.digest() == density.digest()  # the density method does not read the hilander section
    trained = from_dict({"cluster": {"method": "hilander", "hilander": {"epochs": 5}}}, "x")
    assert trained.digest() != from_dict({"cluster": {"method": "hilander"}}, "x").digest()

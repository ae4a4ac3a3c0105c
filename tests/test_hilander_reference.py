"""imret.cluster.hilander against the DGL Hi-LANDER it ports, through numbers the reference computed.

tests/data/hilander_reference.npz was written by bench/hilander_reference.py in a DGL environment (its
docstring says how); these tests need no DGL. They load the reference's weights into our
model by their own names and compare graphs, edge probabilities, densities, decodes, the
whole hierarchical clustering, the losses and eight epochs of training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import imret.cluster.hilander as L

REF = np.load(Path(__file__).parent / "data" / "hilander_reference.npz")
CONFIGS = {  # the models of bench/hilander_reference.py
    "A": dict(hidden=32, num_conv=1, gat=True, gat_k=1, use_cluster_feat=False),
    "B": dict(hidden=16, num_conv=2, gat=True, gat_k=2, use_cluster_feat=True),
    "C": dict(hidden=16, num_conv=1, gat=False, gat_k=1, use_cluster_feat=False),
}
DIM = REF["lab_x"].shape[1]


def model_from(name: str, prefix: str) -> L.Lander:
    model = L.Lander(DIM, **CONFIGS[name])
    state = {k[len(prefix) + 2:]: torch.from_numpy(REF[k]) for k in REF.files if k.startswith(prefix + "w.")}
    model.load_state_dict(state, strict=True)  # same parameter names, nothing missing or extra
    return model.eval()


def ref_graph(prefix: str) -> L.LevelGraph:
    """A graph of the reference, from its own k-NN lists (independent of FAISS versions)."""
    return L.graph_from_knn(REF[prefix + "features"], REF[prefix + "nbrs"], REF[prefix + "dists"],
                            REF[prefix + "labels"], REF[prefix + "cluster_features"])


def edge_slots(graph: L.LevelGraph, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of each reference edge (src -> dst) in our (n, k) tables."""
    src, dst = REF[prefix + "src"], REF[prefix + "dst"]
    hit = (graph.nbr[dst] == src[:, None]) & graph.valid[dst]
    assert (hit.sum(1) == 1).all(), "every reference edge is exactly one valid slot"
    return dst, hit.argmax(1)


def graph_names() -> list[str]:
    return [f"g{i}_" for i in range(len(REF["graph_k"]))] + ["t_"]


def graph_k(prefix: str) -> int:
    return 10 if prefix == "t_" else int(REF["graph_k"][int(prefix[1:-1])])


# ----------------------------------------------------------------------------- graphs


@pytest.mark.parametrize("prefix", graph_names())
def test_knn_graph_matches_reference(prefix: str) -> None:
    ours = L.build_level_graph(REF[prefix + "features"], graph_k(prefix), REF[prefix + "labels"],
                               REF[prefix + "cluster_features"])
    np.testing.assert_array_equal(ours.nbr, REF[prefix + "nbrs"])
    np.testing.assert_allclose(ours.dist, REF[prefix + "dists"], atol=1e-6)
    np.testing.assert_allclose(ours.density, REF[prefix + "density"], atol=1e-6)
    rows, cols = edge_slots(ours, prefix)
    assert ours.valid.sum() == len(rows)  # and no edge the reference does not have
    np.testing.assert_allclose(ours.raw_affine[rows, cols], REF[prefix + "raw_affine"], atol=1e-6)


def test_training_graphs_match_reference() -> None:
    graphs, ks = L.build_training_graphs(REF["lab_x"], REF["lab_y"], (10, 5), (2, 3))
    assert ks == REF["graph_k"].tolist()
    for i, graph in enumerate(graphs):
        p = f"g{i}_"
        np.testing.assert_allclose(graph.features, REF[p + "features"], atol=1e-6)
        np.testing.assert_allclose(graph.cluster_features, REF[p + "cluster_features"], atol=1e-6)
        np.testing.assert_array_equal(graph.labels, REF[p + "labels"])
        np.testing.assert_array_equal(graph.nbr, REF[p + "nbrs"])
        np.testing.assert_allclose(graph.density, REF[p + "density"], atol=1e-6)
    # The top level has cluster means as cluster features, not its nodes' own features.
    assert np.abs(graphs[-1].cluster_features - graphs[-1].features).max() > 0.01


# ----------------------------------------------------------------------------- forward and decode


@pytest.mark.parametrize("model_name, graph_prefix", [("A", "t_"), ("B", "g2_"), ("B", "t_"), ("C", "t_")])
def test_forward_matches_reference(model_name: str, graph_prefix: str) -> None:
    model, graph = model_from(model_name, f"{model_name}_"), ref_graph(graph_prefix)
    probs, dens = L.predict(model, L.to_tensors(model, graph, torch.device("cpu")), chunk=50)
    rows, cols = edge_slots(graph, graph_prefix)
    tag = f"{model_name}_{graph_prefix}"
    np.testing.assert_allclose(probs.numpy()[rows, cols], REF[tag + "prob"], atol=1e-5)
    np.testing.assert_allclose(dens.numpy(), REF[tag + "pred_den"], atol=1e-5)
    assert REF[tag + "prob"][:, 1].std() > 0.01  # the check is not on a degenerate output


@pytest.mark.parametrize("tau", [90, 50])
def test_one_level_decode_matches_reference(tau: int) -> None:
    model, graph = model_from("A", "A_"), ref_graph("t_")
    probs, dens = L.predict(model, L.to_tensors(model, graph, torch.device("cpu")))
    labels, peaks = L.forest_labels(L.choose_parents(graph, probs.numpy()[..., 0], dens.numpy(), tau / 100))
    np.testing.assert_array_equal(peaks, REF[f"A_t_tau{tau}_peaks"])
    np.testing.assert_array_equal(labels, REF[f"A_t_tau{tau}_labels"])
    assert 1 < len(peaks) < graph.n  # some nodes linked, some did not


@pytest.mark.parametrize("tau", [90, 70, 50])
def test_hierarchy_matches_reference(tau: int) -> None:
    params = L.LanderParams(hidden=32, test_k=10, test_levels=10, tau=tau / 100, thresh=0.8, early_stop=True,
                              device="cpu")
    labels, _, selected, info = L.infer_hilander(model_from("A", "A_"), REF["unl_x"], params)
    tag = f"A_hier_tau{tau}_"
    np.testing.assert_array_equal(labels, REF[tag + "labels"])
    np.testing.assert_array_equal(selected, REF[tag + "selected"])
    assert info["nodes"] == REF[tag + "nodes"].tolist()
    assert info["edges_added"] == REF[tag + "edges_added"].tolist()


def test_a_level_above_zero_merges_in_the_reference() -> None:
    """Keeps the hierarchy test meaningful: one stored run adds tree edges at level 1."""
    assert any(REF[f"A_hier_tau{t}_edges_added"][1:].sum() > 0 for t in (90, 70, 50))


# ----------------------------------------------------------------------------- loss and training


def our_loss(model: L.Lander, prefix: str, mask: np.ndarray | None, focal: bool) -> tuple[float, float, float]:
    """The loss of the whole graph, through the minibatch path with every node a seed."""
    graph = ref_graph(prefix)
    g = L.to_tensors(model, graph, torch.device("cpu"))
    with torch.no_grad():
        logits, dens = L.forward_batch(model, g, np.arange(graph.n))
        keep = g.valid & (g.density[g.nbr] > g.density[:, None])
        if mask is not None:  # the edges the reference kept after balancing
            rows, cols = edge_slots(graph, prefix)
            keep = torch.zeros_like(keep)
            keep[rows[mask], cols[mask]] = True
        loss, den, conn = L.lander_loss(logits, dens, g.density, g.edge_labels, keep, focal)
    return loss.item(), den, conn


@pytest.mark.parametrize("model_name, prefix, focal", [("A", "g0_", False), ("B", "g2_", True), ("C", "g0_", False)])
def test_loss_matches_reference(model_name: str, prefix: str, focal: bool) -> None:
    model = model_from(model_name, f"{model_name}_")
    np.testing.assert_allclose(our_loss(model, prefix, None, focal), REF[f"{model_name}_{prefix}loss"], atol=1e-5)


def test_balanced_loss_matches_reference_on_its_edges() -> None:
    mask = REF["A_g0_balanced_mask"]
    rows, cols = edge_slots(ref_graph("g0_"), "g0_")
    same = (REF["g0_labels"][REF["g0_src"]] == REF["g0_labels"][REF["g0_dst"]])
    assert mask.sum() < REF["A_g0_mask"].sum() and (same & mask).sum() == (~same & mask).sum()
    got = our_loss(model_from("A", "A_"), "g0_", mask, False)
    np.testing.assert_allclose(got, REF["A_g0_balanced_loss"], atol=1e-5)


def test_balance_mask_keeps_equal_classes_within_the_mask() -> None:
    g = L.to_tensors(model_from("A", "A_"), ref_graph("g0_"), torch.device("cpu"))
    mask = g.valid & (g.density[g.nbr] > g.density[:, None])
    kept = L.balance_mask(mask, g.edge_labels, np.random.default_rng(0))
    pos, neg = int((kept & (g.edge_labels == 1)).sum()), int((kept & (g.edge_labels == 0)).sum())
    assert pos == neg == min(int((mask & (g.edge_labels == 1)).sum()), int((mask & (g.edge_labels == 0)).sum()))
    assert not (kept & ~mask).any()


def test_eight_epochs_of_training_match_reference() -> None:
    """Full-batch, unbalanced, so nothing random: the same SGD steps and cosine schedule."""
    params = L.LanderParams(knn_k=(10, 5), levels=(2, 3), hidden=32, epochs=8, lr=0.1, batch_size=1024,
                              balance=False, device="cpu")
    model, log = L.train_hilander(REF["lab_x"], REF["lab_y"], params, model=model_from("A", "A_init_").train())
    np.testing.assert_allclose(np.array(log["epochs"]), REF["A_short_history"], atol=1e-5)
    for name, value in model.state_dict().items():
        np.testing.assert_allclose(value.numpy(), REF[f"A_short_w.{name}"], atol=1e-5, err_msg=name)
    moved = max(np.abs(REF[f"A_short_w.{k}"] - REF[f"A_init_w.{k}"]).max() for k in model.state_dict())
    assert moved > 0.01  # training changed the weights far beyond the tolerance

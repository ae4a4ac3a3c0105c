"""imret's Hi-LANDER training against the DGL reference's, on the reference's own random draws.

tests/data/hilander_replay.npz was written by ``bench/hilander_replay_dgl.py --tiny`` in the DGL
environment (bench/hilander_reference.py's docstring says how to make it): model A of
tests/data/hilander_reference.npz, trained six epochs in shuffled minibatches of 64 seed
nodes (several per graph and epoch) with the edge loss balanced. It recorded the initial
weights, each step's graph, seed nodes and the edges the balancing kept, each step's loss
and the final weights. tests/test_hilander_reference.py trains full-batch, unshuffled and
unbalanced; this covers the minibatch planning and the balanced loss, and that a seed
initialises as the reference does under the same ``torch.manual_seed``. No DGL needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import imret.cluster.hilander as L

REF = np.load(Path(__file__).parent / "data" / "hilander_replay.npz")
RECIPE = json.loads(str(REF["params"]))
PARAMS = L.LanderParams(knn_k=tuple(RECIPE["knn_k"]), levels=tuple(RECIPE["levels"]), hidden=RECIPE["hidden"],
                        epochs=RECIPE["epochs"], lr=RECIPE["lr"], batch_size=RECIPE["batch_size"],
                        seed=RECIPE["seed"], device="cpu")


def weights(prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 2:]: torch.from_numpy(REF[k]) for k in REF.files if k.startswith(prefix + "w.")}


def kept_masks(graphs: list[L.LevelGraph]) -> list[torch.Tensor]:
    """Each step's balanced edge mask over its seeds' in-edges, from the reference's kept edge ids."""
    slots = []
    for i, g in enumerate(graphs):
        src, dst = REF[f"g{i}_src"], REF[f"g{i}_dst"]
        hit = (g.nbr[dst] == src[:, None]) & g.valid[dst]
        assert (hit.sum(1) == 1).all() and len(src) == g.valid.sum(), "the graphs' edges differ"
        slots.append(dst * g.nbr.shape[1] + hit.argmax(1))
    masks, off = [], REF["step_kept_offsets"]
    for s, i in enumerate(REF["step_graph"]):
        bits = np.unpackbits(REF["step_kept"][off[s]:off[s + 1]])[:len(slots[i])].astype(bool)
        full = np.zeros(graphs[i].nbr.size, bool)
        full[slots[i][bits]] = True
        masks.append(torch.from_numpy(full.reshape(graphs[i].nbr.shape)[step_seeds(s)]))
    return masks


def step_seeds(s: int) -> np.ndarray:
    off = REF["step_seeds_offsets"]
    return REF["step_seeds"][off[s]:off[s + 1]].astype(np.int64)


def test_a_seed_initialises_as_the_reference_under_the_same_torch_seed() -> None:
    model = L.make_model(REF["lab_x"].shape[1], PARAMS)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), REF[f"init_w.{name}"], err_msg=name)


def test_replayed_minibatch_training_matches_reference() -> None:
    graphs, _ = L.build_training_graphs(REF["lab_x"], REF["lab_y"], PARAMS.knn_k, PARAMS.levels)
    assert [g.n for g in graphs] == [len(REF[f"g{i}_density"]) for i in range(len(REF["graph_k"]))]
    masks = kept_masks(graphs)
    model = L.Lander(REF["lab_x"].shape[1], PARAMS.hidden)
    model.load_state_dict(weights("init_"))
    tensors = [L.to_tensors(model.train(), g, torch.device("cpu")) for g in graphs]
    opt = torch.optim.SGD(model.parameters(), lr=PARAMS.lr, momentum=PARAMS.momentum,
                          weight_decay=PARAMS.weight_decay)  # as train.fit builds them
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=len(masks), eta_min=PARAMS.eta_min)
    losses = []
    for s, (i, mask) in enumerate(zip(REF["step_graph"], masks)):
        g, seeds = tensors[i], step_seeds(s)
        assert len(seeds) < len(g.nbr) or i == len(graphs) - 1  # minibatches smaller than the graph
        opt.zero_grad()
        logits, dens = L.forward_batch(model, g, seeds)
        rows = torch.from_numpy(seeds)
        assert g.density is not None and g.edge_labels is not None
        assert bool((mask <= (g.valid[rows] & (g.density[g.nbr[rows]] > g.density[rows, None]))).all())
        loss, den, conn = L.lander_loss(logits, dens, g.density[rows], g.edge_labels[rows], mask)
        loss.backward()
        opt.step()
        sched.step()
        losses.append((loss.item(), den, conn))
    np.testing.assert_allclose(np.array(losses), REF["step_loss"], atol=2e-6)
    moved = max(float((v - weights("init_")[k]).abs().max()) for k, v in model.state_dict().items())
    assert moved > 1e-2  # training did move the weights, so agreement below says something
    for name, value in model.state_dict().items():
        np.testing.assert_allclose(value.detach().numpy(), REF[f"w.{name}"], atol=2e-6, err_msg=name)

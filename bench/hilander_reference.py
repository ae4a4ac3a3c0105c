"""Write tests/data/hilander_reference.npz, and run the planted comparison, with the DGL Hi-LANDER.

tests/test_hilander_reference.py checks imret.cluster.hilander against the file, without
DGL. DGL is not a dependency of imret: this script runs once, by hand, in a separate
virtualenv on the CPU (torch 2.2.1, dgl 2.1.0, torchdata 0.7.1, numpy < 2 (1.26.4),
pandas < 2.3, faiss-cpu 1.9.0, scipy, scikit-learn < 1.6) against the example's code at
dmlc/dgl commit 3d16000b (``examples/pytorch/hilander`` last changed in 540dd2ba).
bench/hilander_dgl.py holds the import shims and the loops of PSS's two scripts. The
committed file was made with:

    python3 -m venv /tmp/dglenv && /tmp/dglenv/bin/pip install torch==2.2.1 "numpy<2" dgl==2.1.0 \
        torchdata==0.7.1 "pandas<2.3" pydantic pyyaml psutil tqdm scipy requests "faiss-cpu>=1.8,<1.10" \
        "scikit-learn<1.6"
    git --git-dir=<dgl clone>/.git archive 3d16000b examples/pytorch/hilander | tar -x -C ref_src
    /tmp/dglenv/bin/python -m bench.hilander_reference ref_src/examples/pytorch/hilander \
        tests/data/hilander_reference.npz

and the reference's figures of bench/hilander_planted_reference.json with (one per seed, about
20-60 min each on a 2-core machine; planted_data.npz holds bench.cluster_open_world.open_world()'s
arrays, ``np.savez(..., **open_world())``):

    OMP_NUM_THREADS=1 /tmp/dglenv/bin/python -m bench.hilander_reference planted \
        ref_src/examples/pytorch/hilander planted_data.npz planted_ref_seed<S>.npz 1000 <S>

tests/data/hilander_replay.npz (tests/test_hilander_replay.py: minibatches, shuffled and
balanced, on this file's labelled data) and the replayed-randomness comparison of
BENCHMARKS.md are made by bench/hilander_replay_dgl.py in the same virtualenv:

    OMP_NUM_THREADS=1 /tmp/dglenv/bin/python -m bench.hilander_replay_dgl ref_src/examples/pytorch/hilander \
        tests/data/hilander_reference.npz tests/data/hilander_replay.npz --tiny --seed 0

What the npz stores (``g<i>_*``: training graph i; ``<m>_*``: model m):

- the tiny data: labelled (``lab_*``) and unlabelled (``unl_*``) raw features and labels;
- the training graphs of LanderDataset with k 10/5 and 2/3 levels: each level's normalised
  and cluster features, ground-truth density, neighbour ids and distances;
- model A (PSS's architecture: one GAT conv, cross-entropy, hidden 32): its initial
  weights, its weights after 8 epochs of the training loop (full-batch, no shuffling or
  balancing, so nothing random), and the weights after 150 more epochs (``A_*``);
- model A's edge probabilities and densities on the unlabelled level-0 graph (test-script
  minibatches of 32 nodes), its level-0 decode at tau 0.9 and 0.5, and the whole
  hierarchical clustering of test_subg_inat.py (k 10, levels 10, early stop, thresh 0.8,
  and taus 0.7 and 0.5 to make it merge more on a graph this small);
- model A's loss on training graph 0, plain and balanced (with the edges balancing kept);
- models B (2 convs, 2 heads, cluster features, focal loss; on the level-1 graph of k 5,
  whose cluster features are cluster means, and on the unlabelled graph) and C (the
  non-attention layer), each after 20 epochs of training: edge probabilities, densities
  and losses.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # DGL's CPU kernels sum in thread order otherwise

import numpy as np
import torch

from bench.hilander_dgl import cluster, load_hilander, make_lander, predict, train, training_graphs

D = 8
OPT = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-5, "batch_size": 1024, "epochs": 100, "balance": True}


def planted(rng: np.random.Generator, sizes: list[int], noise: int, label0: int) -> tuple[np.ndarray, np.ndarray]:
    """Classes of two sub-blobs each, around centres that share a common direction (cosines
    stay positive), at random raw scales. The sub-blobs give level 0 fragments to join later."""
    common = np.ones(D) / np.sqrt(D)
    centres = common + 0.9 * rng.normal(size=(len(sizes), D)) / np.sqrt(D)
    parts = []
    for c, s in zip(centres, sizes):
        subs = c + 0.3 * rng.normal(size=(2, D)) / np.sqrt(D)
        parts.append(subs[np.arange(s) % 2] + 0.2 * rng.normal(size=(s, D)) / np.sqrt(D))
    x = np.concatenate(parts)
    y = np.repeat(np.arange(label0, label0 + len(sizes)), sizes)
    x = np.concatenate([x, common + 1.2 * rng.normal(size=(noise, D)) / np.sqrt(D)])
    y = np.concatenate([y, label0 + len(sizes) + np.arange(noise)])  # every noise point its own class
    scale = rng.uniform(0.5, 2.0, size=(len(x), 1))  # raw norms vary: the pipeline normalises
    return (x * scale).astype(np.float32), y.astype(np.int64)


def graph_arrays(prefix: str, g, nbrs: np.ndarray, dists: np.ndarray) -> dict[str, np.ndarray]:
    src, dst = (t.numpy() for t in g.edges())
    nodes = {name: g.ndata[name].numpy() for name in ("features", "cluster_features", "labels", "density")}
    arrays = {**nodes, "nbrs": nbrs.astype(np.int64), "dists": dists.astype(np.float32), "src": src, "dst": dst,
              "raw_affine": g.edata["raw_affine"].numpy()}
    return {prefix + name: value for name, value in arrays.items()}


def _ascending(g) -> bool:
    src, dst = (t.numpy() for t in g.edges())
    return bool((np.diff(dst) >= 0).all() and (np.diff(src)[np.diff(dst) == 0] > 0).all())


def weights(prefix: str, model) -> dict[str, np.ndarray]:
    return {f"{prefix}w.{k}": v.detach().numpy().copy() for k, v in model.state_dict().items()}


def forward_arrays(prefix: str, model, g, k: int, num_conv: int, batch: int) -> dict[str, np.ndarray]:
    predict(model, g, k, num_conv, batch)
    return {f"{prefix}prob": g.edata["prob_conn"].numpy().copy(),
            f"{prefix}pred_den": g.ndata["pred_den"].numpy().copy()}


def loss_arrays(prefix: str, model, g, balance: bool) -> dict[str, np.ndarray]:
    """compute_loss on the full graph (the DGLGraph branch of LANDER.forward)."""
    model.eval()
    model.balance = balance
    g = g.local_var()
    g.edata["mask_conn"] = g.edata["mask_conn"].clone()  # compute_loss balances it in place
    np.random.seed(0)  # the balancing draws from numpy's global generator
    with torch.no_grad():
        loss, den, conn = model.compute_loss(model(g))
    tag = "balanced_" if balance else ""
    return {f"{prefix}{tag}loss": np.array([loss.item(), den, conn]),
            f"{prefix}{tag}mask": g.edata["mask_conn"].numpy()}


def decode_arrays(prefix: str, g, tau: float) -> dict[str, np.ndarray]:
    from utils import decode

    labels, peaks = decode(g, tau, "prob", False)
    return {f"{prefix}labels": np.asarray(labels), f"{prefix}peaks": np.asarray(peaks)}


def main(example_dir: str, out_path: str) -> None:
    load_hilander(example_dir)
    from dataset import LanderDataset

    rng = np.random.default_rng(0)
    lab_x, lab_y = planted(rng, [40, 30, 24, 18, 14, 12, 10, 8, 7, 6, 5, 4], 0, 0)
    unl_x, unl_y = planted(rng, [30, 24, 18, 14, 12, 10, 8, 6, 5, 4], 8, 100)
    out: dict[str, np.ndarray] = {"lab_x": lab_x, "lab_y": lab_y, "unl_x": unl_x, "unl_y": unl_y}

    knn_k, levels = [10, 5], [2, 3]
    # train_subg_inat.py:85-98: one LanderDataset per (k, levels), all their graphs in one list.
    datasets = [LanderDataset(features=lab_x, labels=lab_y, k=k, levels=lv) for k, lv in zip(knn_k, levels)]
    gs = [g for d in datasets for g in d.gs]
    ks = [k for k, d in zip(knn_k, datasets) for _ in d.gs]
    nbrs = [n for d in datasets for n in d.nbrs]
    dists = [x for d in datasets for x in d.dists]
    for i, g in enumerate(gs):
        out.update(graph_arrays(f"g{i}_", g, nbrs[i], dists[i]))
    out["graph_k"] = np.array(ks)
    # imret.cluster.hilander.decode breaks ties between parents as the edge order does: by ascending source id.
    out["edges_ascending"] = np.array(all(_ascending(g) for g in gs))

    pa = {"hidden": 32, "num_conv": 1, "gat": True, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-5,
          "batch_size": 1024, "epochs": 8}
    torch.manual_seed(0)
    model = make_lander(D, pa)
    out.update(weights("A_init_", model))
    out["A_short_history"] = np.array(train(model, gs, ks, pa, shuffle=False))
    out.update(weights("A_short_", model))
    train(model, gs, ks, {**pa, "epochs": 150}, shuffle=False)
    out.update(weights("A_", model))

    test_data = LanderDataset(features=unl_x, labels=unl_y, k=10, levels=1)
    test_g = test_data.gs[0]
    out.update(graph_arrays("t_", test_g, test_data.nbrs[0], test_data.dists[0]))
    out.update(forward_arrays("A_t_", model, test_g, 10, 1, 32))
    out.update(decode_arrays("A_t_tau90_", test_g, 0.9))
    out.update(decode_arrays("A_t_tau50_", test_g, 0.5))
    for tau in (0.9, 0.7, 0.5):
        res = cluster(model, unl_x.copy(), unl_y.copy(), {"test_k": 10, "test_levels": 10, "tau": tau,
                                                          "early_stop": True, "thresh": 0.8, "num_conv": 1,
                                                          "test_batch_size": 32})
        tag = f"A_hier_tau{int(tau * 100)}_"
        out.update({f"{tag}labels": res["labels"], f"{tag}selected": res["selected"],
                    f"{tag}nodes": np.array(res["nodes"]), f"{tag}edges_added": np.array(res["edges_added"])})
    out.update(loss_arrays("A_g0_", model, gs[0], balance=False))
    out.update(loss_arrays("A_g0_", model, gs[0], balance=True))

    pb = {"hidden": 16, "num_conv": 2, "gat": True, "gat_k": 2, "use_cluster_feat": True, "use_focal_loss": True}
    torch.manual_seed(1)
    model_b = make_lander(D, pb)
    # A few epochs away from the initialisation, whose edge probabilities hardly vary.
    train(model_b, gs, ks, {**pb, **OPT}, shuffle=False)
    out.update(weights("B_", model_b))
    out.update(forward_arrays("B_g2_", model_b, gs[2], ks[2], 2, 16))  # a level-1 graph: real cluster features
    out.update(loss_arrays("B_g2_", model_b, gs[2], balance=False))
    out.update(forward_arrays("B_t_", model_b, test_g, 10, 2, 4096))

    pc = {"hidden": 16, "num_conv": 1, "gat": False}
    torch.manual_seed(2)
    model_c = make_lander(D, pc)
    train(model_c, gs, ks, {**pc, **OPT}, shuffle=False)
    out.update(weights("C_", model_c))
    out.update(forward_arrays("C_t_", model_c, test_g, 10, 1, 4096))
    out.update(loss_arrays("C_g0_", model_c, gs[0], balance=False))
    np.savez_compressed(out_path, **out)
    print(f"wrote {out_path}: {len(out)} arrays")


# PSS/train.sh:29-34 (train_subg_inat.py) and 37-44 (test_subg_inat.py); momentum and weight
# decay are train_subg_inat.py's defaults (lines 44-45), dropout 0 and one head its others.
TRAIN = {"knn_k": [10, 5, 3], "levels": [2, 3, 4], "hidden": 512, "epochs": 1000, "lr": 0.01, "batch_size": 4096,
         "num_conv": 1, "gat": True, "gat_k": 1, "balance": True, "momentum": 0.9, "weight_decay": 1e-5}
TEST = {"test_k": 10, "tau": 0.9, "test_levels": 10, "early_stop": True, "thresh": 0.8, "num_conv": 1,
        "test_batch_size": 4096}


def run_planted(example_dir: str, data_path: str, out_path: str, epochs: int, seed: int, weights: str | None) -> None:
    """The reference trained on the planted labelled part and run on the unlabelled part; saves its outputs."""
    load_hilander(example_dir)
    data = np.load(data_path)
    p = {**TRAIN, "epochs": epochs}
    # train_subg_inat.py leaves setup_seed(20) commented out. Seeding fixes the initial weights and the
    # sampler's order, not which edges the balancing drops (the block's edge order varies from run to run;
    # bench/hilander_replay_dgl.py): runs are not repeatable.
    torch.manual_seed(seed)
    np.random.seed(seed)
    started = time.perf_counter()
    model = make_lander(data["lab_x"].shape[1], p)
    history, graph_nodes = [], []
    if weights:  # the reference's inference with another run's weights (ours): no training
        saved = np.load(weights)
        model.load_state_dict({k[2:]: torch.from_numpy(saved[k]) for k in saved.files if k.startswith("w.")})
    else:
        gs, ks = training_graphs(data["lab_x"].copy(), data["lab_y"].copy(), p["knn_k"], p["levels"])
        graph_nodes = [g.num_nodes() for g in gs]
        history = train(model, gs, ks, p, shuffle=True)
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    res = cluster(model, data["unl_x"].copy(), data["unl_y"].copy(), TEST)
    infer_s = time.perf_counter() - started
    state = {f"w.{k}": v.detach().numpy() for k, v in model.state_dict().items()}
    np.savez_compressed(out_path, labels=res["labels"], density=res["density"], selected=res["selected"],
                        nodes=np.array(res["nodes"]), edges_added=np.array(res["edges_added"]),
                        history=np.array(history), train_s=train_s, infer_s=infer_s,
                        graph_nodes=np.array(graph_nodes), params=json.dumps({**p, **TEST}), **state)
    print(json.dumps({"train_s": train_s, "infer_s": infer_s, "nodes": res["nodes"], "edges_added": res["edges_added"],
                      "selected": float(res["selected"].mean()), "graph_nodes": graph_nodes,
                      "last_epoch": history[-1] if history else None}))


if __name__ == "__main__":
    if sys.argv[1] == "planted":  # planted EXAMPLE_DIR DATA OUT [EPOCHS] [SEED] [WEIGHTS]
        a = sys.argv[2:]
        run_planted(a[0], a[1], a[2], int(a[3]) if len(a) > 3 else 1000, int(a[4]) if len(a) > 4 else 0,
                    a[5] if len(a) > 5 else None)
    else:
        main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "tests/data/hilander_reference.npz")

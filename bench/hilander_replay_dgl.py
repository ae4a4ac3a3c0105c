"""The DGL side of the replayed-randomness Hi-LANDER comparison: train once, record every random draw.

Independent seeds cannot tell a slip in imret's port of Hi-LANDER from the different
random draws of the two (initialisation, the sampler's shuffling, the loss balancing).
This runs the DGL reference (dmlc/dgl ``examples/pytorch/hilander``) with PSS's full
recipe on the planted open-world data (bench/hilander_reference.py's ``TRAIN``/``TEST``)
and records what was drawn, so bench/hilander_replay.py can train imret on exactly the
same draws:

- the initial weights;
- for every step: which training graph, the seed nodes in the sampler's order, and the
  edges the balancing kept in the edge loss (a bit per edge id of that graph; the blocks
  carry ``global_eid``), with the step's (loss, density loss, edge loss);
- weights and SGD momentum buffers at a few epochs (``--snapshots``), so imret can also
  restart from the reference's state there;
- the training graphs' edges and densities (to compare with imret's);
- the final weights, and test_subg_inat.py's clustering of the unlabelled part (labels,
  selection, level-0 densities, as ``planted`` mode), plus the level-0 edge probabilities.

Runs only in the DGL virtualenv (see bench/hilander_reference.py's docstring), one thread.
BENCHMARKS.md's replay (about 730 s of training on the 2-core machine) was made with

    OMP_NUM_THREADS=1 /tmp/dglenv/bin/python -m bench.hilander_replay_dgl \
        <ref_src>/examples/pytorch/hilander planted_data.npz replay/dgl_seed0.npz --epochs 1000 --seed 0

and tests/data/hilander_replay.npz (``--tiny``: model A of bench/hilander_reference.py on
that file's labelled data, minibatches of 64, lr 0.01, 6 epochs; no clustering) with

    OMP_NUM_THREADS=1 /tmp/dglenv/bin/python -m bench.hilander_replay_dgl \
        <ref_src>/examples/pytorch/hilander tests/data/hilander_reference.npz tests/data/hilander_replay.npz \
        --tiny --seed 0

Seeding torch and numpy fixes the initial weights and the sampler's order, but not the
balancing: two runs with seed 0 kept different edges from the first step on. numpy's state
was the same, but the sampler returned the block's edges in another order, and the
balancing draws positions in that order. That is why the outcome is recorded rather than
re-drawn.

The step loop is bench/hilander_dgl.py's ``train`` (train_subg_inat.py:152-227); the
recording is its step and epoch callbacks, which draw nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch

from bench.hilander_dgl import cluster, load_hilander, make_lander, predict, train, training_graphs
from bench.hilander_reference import TEST, TRAIN


def snapshot(prefix: str, model: Any, opt: Any) -> dict[str, np.ndarray]:
    """Weights and momentum buffers, by parameter name."""
    out = {f"{prefix}w.{k}": v.detach().numpy().copy() for k, v in model.state_dict().items()}
    for name, param in model.named_parameters():
        buf = opt.state.get(param, {}).get("momentum_buffer")
        if buf is not None:
            out[f"{prefix}m.{name}"] = buf.detach().numpy().copy()
    return out


def train_recorded(model: Any, gs: list, ks: list, p: dict[str, Any], snapshots: set[int]) -> dict[str, Any]:
    """bench.hilander_dgl.train, recording each step's graph, seed order, kept edges and losses."""
    import dgl

    rec: dict[str, Any] = {"graph": [], "seeds": [], "kept": [], "loss": [], "snap": {}}

    def step(i: int, seeds: Any, out: Any, losses: tuple[float, float, float]) -> None:
        # compute_loss balanced the block's mask_conn in place: the edges the loss used.
        kept = np.zeros(gs[i].num_edges(), bool)
        kept[out.edata["global_eid"][out.edata["mask_conn"]].numpy()] = True
        assert out.num_dst_nodes() == len(seeds) and bool((out.dstdata[dgl.NID] == seeds).all())
        rec["graph"].append(i)
        rec["seeds"].append(seeds.numpy().astype(np.int32))
        rec["kept"].append(np.packbits(kept))
        rec["loss"].append(losses)

    def epoch_end(epoch: int, opt: Any) -> None:
        if epoch + 1 in snapshots:
            rec["snap"].update(snapshot(f"e{epoch + 1}_", model, opt))

    train(model, gs, ks, p, shuffle=True, on_step=step, on_epoch=epoch_end)
    return rec


def graph_record(gs: list) -> dict[str, np.ndarray]:
    """Each training graph's edges (src, dst by edge id), ground-truth density and labels."""
    out: dict[str, np.ndarray] = {}
    for i, g in enumerate(gs):
        src, dst = (t.numpy() for t in g.edges())
        out.update({f"g{i}_src": src, f"g{i}_dst": dst, f"g{i}_density": g.ndata["density"].numpy(),
                    f"g{i}_labels": g.ndata["labels"].numpy(), f"g{i}_features": g.ndata["features"].numpy(),
                    f"g{i}_mask_conn": g.edata["mask_conn"].numpy(), f"g{i}_labels_conn": g.edata["labels_conn"].numpy()})
    return out


def flat(prefix: str, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    """A ragged list as one array and its offsets."""
    return {prefix: np.concatenate(arrays), f"{prefix}_offsets": np.cumsum([0] + [len(a) for a in arrays])}


def level0_probs(model: Any, unl_x: np.ndarray, unl_y: np.ndarray) -> dict[str, np.ndarray]:
    """The unlabelled level-0 graph's edges, edge probabilities and densities (test_subg_inat.py's predict)."""
    from dataset import LanderDataset

    g = LanderDataset(features=unl_x.copy(), labels=unl_y.copy(), k=TEST["test_k"], levels=1, faiss_gpu=False).gs[0]
    predict(model, g, TEST["test_k"], TEST["num_conv"], TEST["test_batch_size"])
    src, dst = (t.numpy() for t in g.edges())
    return {"t_src": src, "t_dst": dst, "t_prob": g.edata["prob_conn"].numpy(), "t_pred_den": g.ndata["pred_den"].numpy()}


# A tiny replay for tests/test_hilander_replay.py: model A of bench/hilander_reference.py on
# its labelled data, in minibatches smaller than the graphs (several per graph and epoch,
# shuffled), balanced; nothing is clustered.
TINY = {**TRAIN, "knn_k": [10, 5], "levels": [2, 3], "hidden": 32, "epochs": 6, "lr": 0.01, "batch_size": 64}


def record(lab_x: np.ndarray, lab_y: np.ndarray, p: dict[str, Any], seed: int,
           snapshots: list[int]) -> tuple[Any, dict[str, Any]]:
    """Seeds torch and numpy, builds the model and the training graphs, trains recording every draw."""
    torch.manual_seed(seed)  # as ``planted`` mode: the reference seeds nothing itself
    np.random.seed(seed)
    model = make_lander(lab_x.shape[1], p)
    out: dict[str, Any] = {f"init_w.{k}": v.detach().numpy().copy() for k, v in model.state_dict().items()}
    gs, ks = training_graphs(lab_x.copy(), lab_y.copy(), p["knn_k"], p["levels"])
    out.update(graph_record(gs))
    started = time.perf_counter()
    rec = train_recorded(model, gs, ks, p, set(snapshots))
    out.update(rec["snap"])
    out.update(flat("step_seeds", rec["seeds"]))
    out.update(flat("step_kept", rec["kept"]))
    out.update({"step_graph": np.array(rec["graph"]), "step_loss": np.array(rec["loss"]), "graph_k": np.array(ks),
                "train_s": time.perf_counter() - started, "params": json.dumps({**p, "seed": seed})})
    out.update({f"w.{k}": v.detach().numpy().copy() for k, v in model.state_dict().items()})
    print(json.dumps({"train_s": out["train_s"], "steps": len(rec["graph"]),
                      "graph_nodes": [g.num_nodes() for g in gs], "last_loss": rec["loss"][-1]}))
    return model, out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("example_dir")
    ap.add_argument("data", help="planted_data.npz; with --tiny, tests/data/hilander_reference.npz")
    ap.add_argument("out")
    ap.add_argument("--epochs", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--snapshots", type=int, nargs="*", default=[1, 2, 8, 100, 101, 500, 501, 1000])
    ap.add_argument("--tiny", action="store_true", help="the small replay of tests/data/hilander_replay.npz")
    args = ap.parse_args(argv)
    load_hilander(args.example_dir)
    data = np.load(args.data)
    if args.tiny:
        _, out = record(data["lab_x"], data["lab_y"], TINY, args.seed, [])
        out.update(lab_x=data["lab_x"], lab_y=data["lab_y"])
        np.savez_compressed(args.out, **out)
        return
    p = {**TRAIN, "epochs": args.epochs}
    model, out = record(data["lab_x"], data["lab_y"], p, args.seed, args.snapshots)
    res = cluster(model, data["unl_x"].copy(), data["unl_y"].copy(), TEST)
    out.update(level0_probs(model, data["unl_x"], data["unl_y"]))
    out.update(labels=res["labels"], density=res["density"], selected=res["selected"], nodes=np.array(res["nodes"]),
               edges_added=np.array(res["edges_added"]),
               params=json.dumps({**p, **TEST, "seed": args.seed, "snapshots": args.snapshots}))
    np.savez_compressed(args.out, **out)
    print(json.dumps({"nodes": res["nodes"], "selected": float(res["selected"].mean())}))


if __name__ == "__main__":
    main()

"""imret's Hi-LANDER trained on the DGL reference's recorded random draws, and compared with it.

bench/hilander_replay_dgl.py runs the reference with PSS's recipe on the planted
open-world data and records its initial weights, every step's graph and seed order, and
the edges its balancing kept. Here imret's own pieces (``build_training_graphs``,
``Lander``, ``forward_batch``, ``lander_loss``, SGD and the cosine schedule as
``imret.cluster.hilander.train.fit`` builds them) train on exactly those draws; imret's
balancing is not called, the recorded mask takes its place. Nothing in the library is
patched. Then imret clusters the unlabelled part with ``infer_hilander``, and both are
scored with ``imret.metrics.quality`` as bench/cluster.py does. What it reports:

- whether the training graphs are the reference's (node counts, edge sets, densities,
  the unbalanced edge masks);
- per step, imret's loss against the reference's on the same weights' trajectory;
- max |weight difference| at the reference's snapshot epochs, for the free replay (from
  the initial weights to the end) and for restarts from the reference's own weights and
  momentum at a snapshot (which show one epoch's error without the growth of earlier
  differences);
- the unlabelled level-0 graph: edge probabilities and densities of the two final models;
- the scores of the reference, of imret's replay, and of imret's inference with the
  reference's final weights.

BENCHMARKS.md's figures (about 5 minutes each on 1 thread) came from

    OMP_NUM_THREADS=1 python -m bench.hilander_replay replay/dgl_seed0.npz planted_data.npz replay/imret_seed0
    OMP_NUM_THREADS=1 python -m bench.hilander_replay replay/dgl_seed0.npz planted_data.npz \
        replay/imret_seed0_sorted --sorted-seeds

The second run feeds each step's seeds in ascending id: the same sums in another order,
so it differs from the first by float rounding alone, which measures how far rounding
carries over 9,000 steps. Each run writes OUT.json (the report) and OUT.npz (imret's
labels, selection, densities, final weights and the weights at the snapshot epochs).
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imret.cluster.hilander import (
    LanderParams, build_level_graph, build_training_graphs, forward_batch, infer_hilander, l2_normalise, lander_loss,
    predict, to_tensors,
)
from imret.cluster.hilander.model import GraphTensors, Lander
from imret.cluster.hilander.graphs import LevelGraph
from imret.metrics import quality


def weights_of(ref: Any, prefix: str) -> dict[str, torch.Tensor]:
    """The state dict stored under ``prefix`` (``init_``, ``e<epoch>_`` or ``""`` for the final weights)."""
    return {k[len(prefix) + 2:]: torch.from_numpy(ref[k]) for k in ref.files if k.startswith(prefix + "w.")}


def max_diff(model: torch.nn.Module, ref: Any, prefix: str) -> float:
    """max |w_imret - w_ref| over every weight of the snapshot ``prefix``."""
    want = weights_of(ref, prefix)
    return max(float((v.detach() - want[k]).abs().max()) for k, v in model.state_dict().items())


def edge_index(graph: LevelGraph, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Each reference edge's flat position dst * k + column in imret's (n, k) tables; -1 if absent."""
    k = graph.nbr.shape[1]
    hit = (graph.nbr[dst] == src[:, None]) & graph.valid[dst]
    return np.where(hit.any(1), dst * k + hit.argmax(1), -1)


def compare_graphs(graphs: list[LevelGraph], ref: Any) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Are imret's training graphs the reference's? Also each graph's reference-edge -> imret-slot map."""
    report: dict[str, Any] = {"graphs": len(graphs), "ref_graphs": len(ref["graph_k"]), "per_graph": []}
    maps = []
    for i, g in enumerate(graphs):
        src, dst = ref[f"g{i}_src"], ref[f"g{i}_dst"]
        where = edge_index(g, src, dst)
        maps.append(where)
        assert g.density is not None
        mask = g.valid & (g.density[g.nbr_safe] > g.density[:, None])
        labels = g.edge_labels()
        found = where >= 0
        report["per_graph"].append({
            "nodes": g.n, "ref_nodes": len(ref[f"g{i}_density"]), "edges": int(g.valid.sum()), "ref_edges": len(src),
            "ref_edges_missing": int((~found).sum()),
            "features_max_diff": float(np.abs(g.features - ref[f"g{i}_features"]).max()),
            "density_max_diff": float(np.abs(g.density - ref[f"g{i}_density"]).max()),
            "labels_equal": bool((g.labels == ref[f"g{i}_labels"]).all()),
            "mask_equal": bool((mask.flatten()[where[found]] == ref[f"g{i}_mask_conn"][found]).all()),
            "edge_labels_equal": bool((labels.flatten()[where[found]] == ref[f"g{i}_labels_conn"][found]).all())})
    return report, maps


class Replay:
    """The reference's recorded steps, as imret's seed arrays and (seeds, k) loss masks."""

    def __init__(self, ref: Any, graphs: list[LevelGraph], maps: list[np.ndarray], sort: bool = False) -> None:
        self.ref, self.graphs, self.maps, self.sort = ref, graphs, maps, sort
        self.graph, self.loss = ref["step_graph"], ref["step_loss"]
        self.seeds, self.seed_off = ref["step_seeds"], ref["step_seeds_offsets"]
        self.kept, self.kept_off = ref["step_kept"], ref["step_kept_offsets"]

    def __len__(self) -> int:
        """Steps recorded."""
        return len(self.graph)

    def step(self, s: int) -> tuple[int, np.ndarray, torch.Tensor]:
        """(graph index, seed ids in the sampler's order, the balanced mask of their in-edges)."""
        i = int(self.graph[s])
        seeds = self.seeds[self.seed_off[s]:self.seed_off[s + 1]].astype(np.int64)
        seeds = np.sort(seeds) if self.sort else seeds
        where = self.maps[i]
        bits = np.unpackbits(self.kept[self.kept_off[s]:self.kept_off[s + 1]])[:len(where)].astype(bool)
        assert (where[bits] >= 0).all(), "the reference kept an edge imret's graph lacks"
        full = np.zeros(self.graphs[i].nbr.size, bool)
        full[where[bits]] = True
        return i, seeds, torch.from_numpy(full.reshape(self.graphs[i].nbr.shape)[seeds])


def make_optimiser(model: Lander, params: LanderParams, steps: int) -> tuple[torch.optim.SGD, Any]:
    """SGD and the cosine schedule exactly as imret.cluster.hilander.train.fit builds them."""
    opt = torch.optim.SGD(model.parameters(), lr=params.lr, momentum=params.momentum,
                          weight_decay=params.weight_decay)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=params.eta_min)


def run_steps(model: Lander, tensors: list[GraphTensors], replay: Replay, opt: Any, sched: Any, first: int,
              last: int) -> np.ndarray:
    """Steps [first, last) of the replay; each step's (loss, density loss, edge loss)."""
    out = []
    for s in range(first, last):
        i, seeds, mask = replay.step(s)
        g = tensors[i]
        assert g.density is not None and g.edge_labels is not None
        opt.zero_grad()
        logits, dens = forward_batch(model, g, seeds)
        rows = torch.from_numpy(seeds)
        loss, den, conn = lander_loss(logits, dens, g.density[rows], g.edge_labels[rows], mask)
        loss.backward()
        opt.step()
        sched.step()
        out.append((loss.item(), den, conn))
    return np.array(out, dtype=np.float64).reshape(-1, 3)


def restart(model: Lander, ref: Any, epoch: int, params: LanderParams, steps: int,
            per_epoch: int) -> tuple[torch.optim.SGD, Any]:
    """The reference's weights and momentum at ``epoch``, and the schedule advanced to it."""
    model.load_state_dict(weights_of(ref, f"e{epoch}_"))
    opt, sched = make_optimiser(model, params, steps)
    for name, p in model.named_parameters():
        opt.state[p]["momentum_buffer"] = torch.from_numpy(ref[f"e{epoch}_m.{name}"].copy())
    with warnings.catch_warnings():  # stepping the schedule alone is the point here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(epoch * per_epoch):
            sched.step()
    return opt, sched


def snapshot_epochs(ref: Any) -> list[int]:
    """The epochs whose weights the reference stored."""
    return sorted({int(k[1:k.index("_")]) for k in ref.files if k.startswith("e") and "_w." in k})


def scores(labels: np.ndarray, selected: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """The figures of bench/cluster.py's table."""
    sel = quality(labels[selected], truth[selected]) if selected.any() else {}
    every = quality(labels, truth)
    out = {"selected_fraction": float(selected.mean())}
    out.update({k: sel.get(k, math.nan) for k in ("pairwise_f", "bcubed_f", "nmi")})
    out.update({f"{k}_all": every[k] for k in ("pairwise_f", "bcubed_f", "nmi")})
    return out


def level0(model: Lander, unl_x: np.ndarray, ref: Any, params: LanderParams) -> dict[str, float]:
    """Edge probabilities and densities of the model on the unlabelled level-0 graph, against the reference's."""
    graph = build_level_graph(l2_normalise(unl_x), params.test_k)
    probs, dens = predict(model.eval(), to_tensors(model, graph, torch.device("cpu")))
    where = edge_index(graph, ref["t_src"], ref["t_dst"])
    assert (where >= 0).all() and int(graph.valid.sum()) == len(where)
    p_same = probs[..., 1].numpy().flatten()[where]
    ref_same = ref["t_prob"][:, 1]
    tau = params.tau
    return {"prob_max_diff": float(np.abs(p_same - ref_same).max()),
            "prob_mean_diff": float(np.abs(p_same - ref_same).mean()),
            "density_max_diff": float(np.abs(dens.numpy() - ref["t_pred_den"]).max()),
            "edges_over_tau": int((p_same > tau).sum()), "ref_edges_over_tau": int((ref_same > tau).sum()),
            "edges_over_tau_disagree": int(((p_same > tau) != (ref_same > tau)).sum()),
            "selected_disagree": int(((dens.numpy() > params.thresh) != (ref["t_pred_den"] > params.thresh)).sum())}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference", help="the npz of bench/hilander_replay_dgl.py")
    ap.add_argument("data", help="planted_data.npz (bench.cluster_open_world.open_world()'s arrays)")
    ap.add_argument("out", help="output prefix: OUT.json and OUT.npz")
    ap.add_argument("--restarts", type=int, nargs="*", default=None,
                    help="snapshot epochs to restart from for one epoch (default: each with the next one recorded)")
    ap.add_argument("--sorted-seeds", action="store_true",
                    help="each step's seeds in ascending id, not the sampler's order: the same sums in another "
                         "order, so the run differs from the recorded one by float rounding alone")
    args = ap.parse_args(argv)
    ref, data = np.load(args.reference), np.load(args.data)
    recipe = json.loads(str(ref["params"]))
    params = LanderParams(epochs=recipe["epochs"], device="cpu")
    assert tuple(recipe["knn_k"]) == params.knn_k and recipe["hidden"] == params.hidden and recipe["lr"] == params.lr
    report: dict[str, Any] = {"reference": args.reference, "epochs": params.epochs, "sorted_seeds": args.sorted_seeds}
    graphs, _ = build_training_graphs(data["lab_x"], data["lab_y"], params.knn_k, params.levels)
    report["graphs"], maps = compare_graphs(graphs, ref)
    replay = Replay(ref, graphs, maps, args.sorted_seeds)
    per_epoch = len(replay) // params.epochs
    model = Lander(data["lab_x"].shape[1], params.hidden).train()
    tensors = [to_tensors(model, g, torch.device("cpu")) for g in graphs]
    epochs = snapshot_epochs(ref)
    report["restarts"] = restarts(model, tensors, replay, ref, params, per_epoch, epochs, args.restarts)
    report.update(free_replay(model, tensors, replay, ref, params, per_epoch, epochs))
    report.update(inference(model, data, ref, params))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out + ".npz", **report.pop("arrays"), **report.pop("snapshot_arrays"))
    Path(args.out + ".json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


def restarts(model: Lander, tensors: list[GraphTensors], replay: Replay, ref: Any, params: LanderParams,
             per_epoch: int, epochs: list[int], chosen: list[int] | None) -> list[dict[str, Any]]:
    """One epoch of imret from the reference's state at a snapshot, against the reference's next snapshot."""
    out = []
    for e in (chosen if chosen is not None else [e for e in epochs if e + 1 in epochs]):
        opt, sched = restart(model, ref, e, params, len(replay), per_epoch)
        losses = run_steps(model, tensors, replay, opt, sched, e * per_epoch, (e + 1) * per_epoch)
        ref_losses = replay.loss[e * per_epoch:(e + 1) * per_epoch]
        out.append({"from_epoch": e, "weights_max_diff": max_diff(model, ref, f"e{e + 1}_"),
                    "loss_max_diff": float(np.abs(losses - ref_losses).max())})
    return out


def free_replay(model: Lander, tensors: list[GraphTensors], replay: Replay, ref: Any, params: LanderParams,
                per_epoch: int, epochs: list[int]) -> dict[str, Any]:
    """All the steps from the reference's initial weights; weights compared at every snapshot."""
    model.load_state_dict(weights_of(ref, "init_"))
    opt, sched = make_optimiser(model, params, len(replay))
    started, done, losses, at, snaps = time.perf_counter(), 0, [], [], {}
    for e in epochs:
        losses.append(run_steps(model, tensors, replay, opt, sched, done * per_epoch, e * per_epoch))
        done = e
        at.append({"epoch": e, "weights_max_diff": max_diff(model, ref, f"e{e}_")})
        snaps.update({f"e{e}_w.{k}": v.detach().numpy().copy() for k, v in model.state_dict().items()})
        print(json.dumps(at[-1]), flush=True)
    losses.append(run_steps(model, tensors, replay, opt, sched, done * per_epoch, len(replay)))
    loss = np.concatenate(losses)
    gap = np.abs(loss - replay.loss).max(1)
    first = [int(np.argmax(gap > t)) if (gap > t).any() else None for t in (1e-5, 1e-3, 1e-1)]
    return {"train_s": time.perf_counter() - started, "snapshots": at,
            "final_weights_max_diff": max_diff(model, ref, ""), "snapshot_arrays": snaps,
            "step_loss_max_diff": float(gap.max()), "first_step_loss_diff_over_1e-5_1e-3_1e-1": first,
            "step_loss_diff_by_epoch_decile": [float(gap[j:j + len(gap) // 10].max())
                                               for j in range(0, len(gap), max(1, len(gap) // 10))]}


def inference(model: Lander, data: Any, ref: Any, params: LanderParams) -> dict[str, Any]:
    """Scores of the reference, of imret's replayed model, and of imret's inference with the reference's weights."""
    truth = data["unl_y"]
    out: dict[str, Any] = {"ref_scores": scores(ref["labels"], ref["selected"], truth)}
    labels, density, selected, info = infer_hilander(model.eval(), data["unl_x"], params)
    out["imret_scores"] = scores(labels, selected, truth)
    out["imret_levels"] = info["nodes"]
    out["arrays"] = {"labels": labels, "density": density, "selected": selected,
                     **{f"w.{k}": v.detach().numpy() for k, v in model.state_dict().items()}}
    out["level0"] = level0(model, data["unl_x"], ref, params)
    out["level0_density_vs_ref_run"] = float(np.abs(density - ref["density"]).max())
    same = Lander(data["unl_x"].shape[1], params.hidden)
    same.load_state_dict(weights_of(ref, ""))
    labels_r, density_r, selected_r, _ = infer_hilander(same.eval(), data["unl_x"], params)
    out["imret_infer_ref_weights"] = {**scores(labels_r, selected_r, truth),
                                      "labels_equal_ref": bool((labels_r == ref["labels"]).all()),
                                      "selected_equal_ref": bool((selected_r == ref["selected"]).all()),
                                      "density_max_diff": float(np.abs(density_r - ref["density"]).max())}
    return out


if __name__ == "__main__":
    main()

"""Hi-LANDER, the learned clusterer of the PSS loop, in plain PyTorch (``cluster.method: hilander``).

The Smooth-AP seed pseudo-labels its unlabelled images with Hi-LANDER (Xing et al., ICCV
2021; dmlc/dgl ``examples/pytorch/hilander``, run by ``PSS/train.sh``). A graph network
trained on labelled features predicts, for every k-NN edge, the probability that both
ends share a class, and from those a density per node; nodes link to their most probable
denser neighbour, the trees are clustered again level after level, and nodes whose
predicted density exceeds ``thresh`` are selected. DGL is not needed: every node has at
most k in-edges, so dense ``(n, k)`` tables carry the graph (``graphs``), and the
network (``model``), its training (``train``) and the decode (``decode``, ``infer``)
follow the reference's numerics; tests/test_hilander_reference.py checks them against
numbers the DGL code computed. docs/clustering.md says where this differs from the seed.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from imret.cluster.clustering import Clustering, Known
from imret.cluster.hilander.decode import (
    Forest, build_training_graphs, choose_parents, forest_labels, stop_iterating,
)
from imret.cluster.hilander.graphs import (
    LevelGraph, build_level_graph, graph_from_knn, ground_truth_density, l2_normalise,
)
from imret.cluster.hilander.infer import infer_hilander
from imret.cluster.hilander.model import Lander, forward_batch, predict, to_tensors
from imret.cluster.hilander.params import LanderParams
from imret.cluster.hilander.train import balance_mask, lander_loss, load_model, make_model, save_model, train_hilander
from imret.config import ClusterConfig

CHECKPOINT = "model.pt"  # in Known.workdir: the trained state dict
TRAIN_LOG = "train.jsonl"  # in Known.workdir: one line per epoch (loss, density loss, edge loss)

__all__ = [
    "CHECKPOINT", "TRAIN_LOG", "Forest", "Lander", "LanderParams", "LevelGraph", "balance_mask", "build_level_graph",
    "build_training_graphs", "choose_parents", "check_known", "forest_labels", "forward_batch", "graph_from_knn",
    "ground_truth_density", "hilander", "infer_hilander", "l2_normalise", "lander_loss", "load_model", "make_model",
    "predict", "save_model", "stop_iterating", "to_tensors", "train_hilander",
]


def hilander(features: np.ndarray, params: ClusterConfig, known: Known | None) -> Clustering:
    """Trains LANDER on ``known`` (checkpoint and log in ``known.workdir``), then clusters ``features``."""
    check_known(features, known, params)
    assert known is not None
    train_params = LanderParams.from_config(params, len(known.features))
    started = time.perf_counter()
    model, log = train_hilander(np.asarray(known.features, np.float32), np.asarray(known.labels, np.int64),
                                train_params, log_path=known.workdir / TRAIN_LOG)
    save_model(model, known.workdir / CHECKPOINT)
    infer_params = dataclasses.replace(train_params, knn=LanderParams.from_config(params, len(features)).knn)
    labels, density, selected, info = infer_hilander(model, features, infer_params)
    info.update(train_s=log["train_s"], graphs_s=log["graphs_s"], training_graph_nodes=log["graph_nodes"],
                steps=log["steps"], device=log["device"], final_loss=log["epochs"][-1] if log["epochs"] else None,
                knn=infer_params.knn, checkpoint=str(known.workdir / CHECKPOINT), total_s=time.perf_counter() - started)
    return Clustering(labels.astype(np.int64), density.astype(np.float32), selected.astype(bool), info)


def check_known(features: np.ndarray, known: Known | None, params: ClusterConfig) -> None:
    """ValueError naming the fix when there is nothing (or too little) to learn from or to cluster."""
    if known is None:
        raise ValueError("cluster.method hilander learns from labelled features, and none were given: name the "
                         "labelled splits in cluster.labelled (or pass --labelled to tools.cluster)")
    x, y = np.asarray(known.features), np.asarray(known.labels)
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"hilander: the labelled features {x.shape} and labels {y.shape} do not match: give one "
                         "label per feature row")
    classes, smallest_k = len(np.unique(y)), min(params.hilander.train_k)
    if classes < 2 or len(x) <= smallest_k:
        raise ValueError(f"hilander: {len(x)} labelled points in {classes} class(es) are too few to train on: it "
                         f"needs at least 2 classes and more than {smallest_k} points (cluster.hilander.train_k)")
    if np.ndim(features) != 2 or len(features) < 2 or np.shape(features)[1] != x.shape[1]:
        raise ValueError(f"hilander: the features to cluster have shape {np.shape(features)}; they need at least 2 "
                         f"rows of the labelled features' dimension {x.shape[1]}")

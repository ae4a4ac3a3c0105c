"""Hierarchical inference: Hi-LANDER clusters unlabelled features, as test_subg_inat.py does.

Per level: a k-NN graph of the current nodes, the model's edge probabilities and
densities, edges kept when the source is denser and P(same) > tau, each node's parent
its most probable kept neighbour; the peaks go on to the next level with their own
features and, as cluster features, the means of their trees' raw inputs. It stops after
``levels`` levels, after a level that adds no edge, or by utils/misc.py's early stop.
Selection is PSS's ``selectbydensity``: level-0 predicted density > thresh.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from imret.cluster.hilander.decode import Forest, choose_parents, cluster_means, stop_iterating
from imret.cluster.hilander.graphs import LevelGraph, build_level_graph, l2_normalise
from imret.cluster.hilander.model import Lander, predict, to_tensors
from imret.cluster.hilander.params import LanderParams, resolve_device


def infer_hilander(model: Lander, features: np.ndarray,
                   params: LanderParams) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Clusters unlabelled features as PSS's test_subg_inat.py (mode selectbydensity) does.

    Returns (cluster label per node after the last level, level-0 predicted density,
    selected = density > thresh, info with the nodes and tree edges of every level).
    """
    started = time.perf_counter()
    device = resolve_device(params.device)
    model = model.to(device).eval()
    raw = np.asarray(features, dtype=np.float32)
    feats, cluster = l2_normalise(raw), None
    forest, added_before, info = Forest.start(len(raw)), math.inf, {"nodes": [], "knn_s": 0.0, "model_s": 0.0}
    density0 = np.zeros(0, np.float32)
    for level in range(params.test_levels):
        graph, probs, dens = _level(model, feats, cluster, params, device, info)
        density0 = dens if level == 0 else density0
        peaks = forest.merge(choose_parents(graph, probs[..., 0], dens, params.tau))
        if stop_iterating(level, params.test_levels, params.early_stop, forest.added[-1], added_before,
                          params.test_k):
            break
        added_before = forest.added[-1]
        if len(peaks) <= params.test_k:  # the reference's next graph would be empty and it would fail
            info["stopped"] = "fewer peaks than k"
            break
        feats = feats[peaks]
        cluster = cluster_means(raw, forest.labels(), len(peaks))
    info.update(edges_added=forest.added, seconds=time.perf_counter() - started)
    # Compared in float64, as the reference does after .astype(float).
    return forest.labels(), density0, density0.astype(np.float64) > params.thresh, info


def _level(model: Lander, feats: np.ndarray, cluster: np.ndarray | None, params: LanderParams,
           device: torch.device, info: dict[str, Any]) -> tuple[LevelGraph, np.ndarray, np.ndarray]:
    """One level's graph, edge probabilities (n, k, 2) and predicted densities; adds its timings to ``info``."""
    started = time.perf_counter()
    graph = build_level_graph(feats, params.test_k, None, cluster, params.knn)
    info["knn_s"] += time.perf_counter() - started
    started = time.perf_counter()
    probs, dens = predict(model, to_tensors(model, graph, device), params.chunk)
    info["model_s"] += time.perf_counter() - started
    info["nodes"].append(graph.n)
    return graph, probs.cpu().numpy(), dens.cpu().numpy()

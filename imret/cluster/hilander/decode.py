"""Hi-LANDER's decode: parents, density peaks, the forest of all levels, and the stop rules.

Used twice: with the model's predicted densities and edge probabilities at inference
(``imret.cluster.hilander.infer``), and with the ground-truth densities and raw
similarities to build the multi-level training graphs (``build_training_graphs``), as
the reference's deduce.py, dataset.py and utils/misc.py do.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from imret.cluster.density import find_roots as roots_of
from imret.cluster.hilander.graphs import LevelGraph, build_level_graph, l2_normalise


def choose_parents(graph: LevelGraph, edge_dist: np.ndarray, density: np.ndarray, tau: float) -> np.ndarray:
    """Each node's parent: its in-neighbour with the smallest ``edge_dist`` among the kept.

    An edge j -> i is kept when j is strictly denser and ``edge_dist < 1 - tau``. Ties go
    to the smaller j: the reference takes the first in edge-id order, and its edges come
    from a COO matrix sorted by row, then column (checked in bench/hilander_reference.py's graphs).
    -1: no kept edge (a peak).
    """
    nbr = graph.nbr_safe
    bound = np.float32(1 - tau)
    keep = graph.valid & (density[nbr] > density[:, None]) & (edge_dist.astype(np.float32) < bound)
    masked = np.where(keep, edge_dist, np.inf)
    best = masked.min(1, keepdims=True)
    candidate = keep & (masked == best)
    first = np.where(candidate, nbr, np.iinfo(np.int64).max).min(1)
    return np.where(candidate.any(1), first, -1)


def find_roots(parent: np.ndarray) -> np.ndarray:
    """Each node's tree root (parent = -1 marks a root)."""
    return roots_of(np.where(parent < 0, np.arange(len(parent)), parent))


def forest_labels(parent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cluster label per node, peaks). Labels number the peaks in ascending id, as the reference does."""
    roots = find_roots(parent)
    peaks = np.flatnonzero(parent < 0)
    return np.searchsorted(peaks, roots), peaks


@dataclass
class Forest:
    """The trees of all levels over the original nodes (the reference's global edges)."""

    parent: np.ndarray  # (n,) global parent, -1 for current peaks
    ids: np.ndarray  # the current level's nodes, as original ids (ascending)
    added: list[int] = field(default_factory=list)  # tree edges added per level

    @classmethod
    def start(cls, n: int) -> Forest:
        """n roots, no edges: level 0 before decoding."""
        return cls(np.full(n, -1, np.int64), np.arange(n))

    def merge(self, local_parent: np.ndarray) -> np.ndarray:
        """Adds one level's tree edges; returns the level's peaks (local indices)."""
        child = np.flatnonzero(local_parent >= 0)
        self.parent[self.ids[child]] = self.ids[local_parent[child]]
        self.added.append(len(child))
        peaks = np.flatnonzero(local_parent < 0)
        self.ids = self.ids[peaks]
        return peaks

    def labels(self) -> np.ndarray:
        """Each original node's cluster: its tree, numbered by ascending peak id."""
        return forest_labels(self.parent)[0]


def cluster_means(x: np.ndarray, labels: np.ndarray, clusters: int) -> np.ndarray:
    """Each cluster's mean of ``x`` (cluster features of the next level), not normalised.

    Summed in float64 like the reference's numpy means (imret.cluster.density's float32
    version would move the cluster features by an ulp or two).
    """
    sums = np.zeros((clusters, x.shape[1]), np.float64)
    np.add.at(sums, labels, x)
    return (sums / np.bincount(labels, minlength=clusters)[:, None]).astype(np.float32)


def stop_iterating(level: int, levels: int, early_stop: bool, added: int, added_before: float, k: int) -> bool:
    """The reference's three stopping rules (utils/misc.py)."""
    if level == levels - 1 or added == 0:
        return True
    # Early stop: this level added more than 1/(k-1) of the previous level's edges.
    return early_stop and added_before / added < k - 1


def build_training_graphs(features: np.ndarray, labels: np.ndarray, knn_k: tuple[int, ...],
                          levels: tuple[int, ...], method: str = "exact") -> tuple[list[LevelGraph], list[int]]:
    """The reference's training graphs: for each (k, levels), a hierarchy decoded from labels.

    Level l+1's nodes are level l's peaks, found with the ground-truth density and the raw
    similarity (tau 0: any positive similarity links); their cluster features are the
    means of their clusters' normalised level-0 features. Returns the graphs and each one's k.
    """
    graphs, ks = [], []
    for k, depth in zip(knn_k, levels):
        for graph in _hierarchy(l2_normalise(features), np.asarray(labels, np.int64), k, depth, method):
            graphs.append(graph)
            ks.append(k)
    return graphs, ks


def _hierarchy(x: np.ndarray, labels: np.ndarray, k: int, depth: int, method: str) -> Iterator[LevelGraph]:
    feats, cluster, forest = x, x, Forest.start(len(x))
    for level in range(depth):
        if len(feats) <= k:
            return
        graph = build_level_graph(feats, k, labels, cluster, method)
        yield graph
        if level == depth - 1:
            return
        edge_dist = (np.float32(1) - graph.raw_affine).astype(np.float32)
        assert graph.density is not None
        peaks = forest.merge(choose_parents(graph, edge_dist, graph.density, tau=0.0))
        feats, labels = feats[peaks], labels[peaks]
        cluster = cluster_means(x, forest.labels(), len(peaks))

"""Density-peak clustering: the training-free counterpart of Hi-LANDER's decoding.

1. the k-NN graph of the features (``imret.search.graph``);
2. each node's density: the mean similarity to its k neighbours;
3. each node links to its most similar neighbour that is denser and more similar than
   ``tau``; the trees these links form are the clusters, their roots the density peaks;
4. Hi-LANDER's levels: the clusters are clustered the same way, level after level,
   two clusters being as similar as their members are on average, until a level
   merges nothing;
5. a sample is selected when its density exceeds ``thresh`` and its cluster keeps at
   least ``min_size`` selected samples.
"""

from __future__ import annotations

import time

import numpy as np

from imret.cluster.clustering import Clustering, Known
from imret.config import ClusterConfig
from imret.search.graph import knn_graph, normalise


def density(sims: np.ndarray) -> np.ndarray:
    """Each node's mean similarity to its k neighbours (a missing neighbour counts as 0).

    Hi-LANDER weighs each neighbour's similarity by a learned "same class" confidence;
    with no learned model every neighbour is trusted, which leaves the mean similarity.
    """
    present = np.isfinite(sims)
    total = np.where(present, sims, 0.0).sum(axis=1, dtype=np.float64)  # row sums: no thread-order effects
    return (total / sims.shape[1]).astype(np.float32)


def link_to_denser(ids: np.ndarray, sims: np.ndarray, dens: np.ndarray, tau: float) -> np.ndarray:
    """Cluster ids (0..K-1, in order of the clusters' peaks): the trees of links toward density.

    Each node links to its most similar neighbour with similarity > tau that is denser.
    "Denser" is a strict total order, density and then the lower index, so equal
    densities never form a cycle and the result does not depend on evaluation order.
    Every tree has one root, its density peak; trees are found by pointer jumping.
    """
    n = len(ids)
    present = ids >= 0
    nbr = np.where(present, ids, 0)
    nd, mine = dens[nbr], dens[:, None]
    denser = (nd > mine) | ((nd == mine) & (nbr < np.arange(n)[:, None]))
    allowed = present & (sims > tau) & denser
    best = np.argmax(np.where(allowed, sims, -np.inf), axis=1)  # first of equal sims: the lower id
    linked = allowed[np.arange(n), best]
    parent = np.where(linked, nbr[np.arange(n), best], np.arange(n))
    return np.unique(find_roots(parent), return_inverse=True)[1].astype(np.int64)


def find_roots(parent: np.ndarray) -> np.ndarray:
    """The root of every node of a forest given as parent pointers (roots point to themselves)."""
    while True:
        grand = parent[parent]  # each pass halves every remaining path: O(log depth) passes
        if np.array_equal(grand, parent):
            return parent
        parent = grand


def select(dens: np.ndarray, labels: np.ndarray, thresh: float, min_size: int) -> np.ndarray:
    """Samples denser than ``thresh`` whose cluster keeps at least ``min_size`` such samples.

    A selected node's parent is denser still, so each cluster's selected part is a
    connected subtree around its peak. Clusters with one selected sample would make
    classes the P x K sampler cannot pair, hence ``min_size`` (2 by default).
    """
    dense = dens > thresh
    counts = np.bincount(labels[dense], minlength=int(labels.max(initial=-1)) + 1)
    return dense & (counts[labels] >= min_size)


def density_peaks(features: np.ndarray, params: ClusterConfig, known: Known | None = None) -> Clustering:
    """The "density" method: k-NN graph, density, links toward denser neighbours, levels, selection.

    It learns nothing, so ``known`` is unused.
    """
    x = normalise(features)
    sims, ids, info = knn_graph(x, params.k, params.exact_below, params.index, params.recall_sample)
    started = time.perf_counter()
    dens = density(sims)
    labels = link_to_denser(ids, sims, dens, params.tau)
    info["link_s"] = time.perf_counter() - started
    started = time.perf_counter()
    labels, info["clusters_per_level"] = merge_levels(x, labels, params)
    info["levels_s"] = time.perf_counter() - started
    # Selection looks at the samples' own density (level 0), as the seed's selectbydensity does.
    chosen = select(dens, labels, params.thresh, params.min_size)
    return Clustering(labels, dens, chosen, info)


def merge_levels(x: np.ndarray, labels: np.ndarray, params: ClusterConfig) -> tuple[np.ndarray, list[int]]:
    """Hi-LANDER's levels: cluster the clusters, each one node, the same way as the samples.

    Local links with a hard tau can cut one dense blob into a few trees; the next level
    joins trees whose members are, on average, more similar than tau (average linkage:
    for single samples that is their similarity, so level 0's rule carries over).
    Neighbours are found by the cosine of the clusters' mean features. Stops after
    ``params.levels`` levels in all, or when a level merges nothing. Returns the final
    labels and the number of clusters after each level.
    """
    counts = [int(labels.max(initial=-1)) + 1]
    for _ in range(params.levels - 1):
        if counts[-1] < 2:
            break
        means = cluster_means(x, labels, counts[-1])
        sims, ids, _ = knn_graph(means, params.k, params.exact_below, params.index, recall_sample=0)
        sims = average_linkage(sims, ids, np.sqrt(np.einsum("ij,ij->i", means, means)))
        coarse = link_to_denser(ids, sims, density(sims), params.tau)
        if int(coarse.max()) + 1 == counts[-1]:
            break
        labels = coarse[labels]
        counts.append(int(coarse.max()) + 1)
    return labels, counts


def cluster_means(x: np.ndarray, labels: np.ndarray, clusters: int) -> np.ndarray:
    """Each cluster's mean feature (not normalised: its length says how tight the cluster is)."""
    from scipy.sparse import csr_matrix

    members = csr_matrix((np.ones(len(labels), np.float32), (labels, np.arange(len(labels)))),
                         shape=(clusters, len(labels)))
    sums = np.asarray(members @ x, dtype=np.float32)  # row by row, in sample order: no thread effects
    return sums / np.bincount(labels, minlength=clusters).astype(np.float32)[:, None]


def average_linkage(cosines: np.ndarray, ids: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """Mean member-to-member similarity of two clusters from the cosine of their means.

    For unit vectors, mean(A) . mean(B) is the average of a . b over the pairs, and
    mean(A) . mean(B) = cos(mean(A), mean(B)) |mean(A)| |mean(B)|.
    """
    present = ids >= 0
    scaled = cosines * norms[:, None] * norms[np.where(present, ids, 0)]
    return np.where(present, scaled, -np.inf).astype(np.float32)


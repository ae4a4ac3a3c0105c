"""The k-NN graph of one Hi-LANDER level, as dense ``(n, k)`` tables.

Every node of the reference's k-NN graph has at most k in-edges (its k nearest,
self included, minus itself and negative similarities), so the neighbour ids, their
validity and the edge weights fit in ``(n, k)`` arrays; ``imret.cluster.hilander.model``
runs DGL's message passing over them. The numbers follow the reference step by step,
including its float32/float64 round trips (knn.py, dataset.py and adjacency.py of dmlc/dgl
``examples/pytorch/hilander``), so edge sets and densities agree exactly: that is why
the search here is FAISS's exact ``IndexFlatIP`` with self included, not
``imret.search.graph.knn_graph`` (which drops self and orders ties by id).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from imret.search.graph import HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M


@dataclass
class LevelGraph:
    """One level's k-NN graph. Row i lists i's k nearest (self included, as FAISS returns it).

    An edge j -> i exists for column c when ``valid[i, c]``: j = nbr[i, c] is not i and
    their similarity is not negative (the reference drops both when building its sparse
    adjacency). ``nbr_safe`` points invalid columns at i itself, with weight 0 everywhere.
    """

    features: np.ndarray  # (n, d) float32, L2-normalised
    cluster_features: np.ndarray  # (n, d) float32
    nbr: np.ndarray  # (n, k) int64, -1 where the index found fewer than k
    dist: np.ndarray  # (n, k) float32: 1 - cosine, ascending
    valid: np.ndarray  # (n, k) bool
    raw_affine: np.ndarray  # (n, k) float32: the edge's similarity
    affine: np.ndarray  # (n, k) float32: similarity / the row's sum (the non-GAT layer's weights)
    labels: np.ndarray | None = None  # (n,) int64 ground truth (training graphs)
    density: np.ndarray | None = None  # (n,) float32 ground-truth density (training graphs)

    @property
    def n(self) -> int:
        """Number of nodes."""
        return len(self.nbr)

    @property
    def nbr_safe(self) -> np.ndarray:
        """``nbr`` with invalid columns pointing at the row itself (their weights are 0)."""
        return np.where(self.valid, self.nbr, np.arange(self.n)[:, None])

    def edge_labels(self) -> np.ndarray:
        """1 where both ends of the edge share a class (the reference's labels_conn)."""
        assert self.labels is not None
        return (self.labels[self.nbr_safe] == self.labels[:, None]).astype(np.int64)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows divided by their norms in float32, as the reference does (dataset.py:37)."""
    x = np.array(x, dtype=np.float32, copy=True)
    x /= np.linalg.norm(x, axis=1).reshape(-1, 1)
    return x


def knn_search(x: np.ndarray, k: int, method: str = "exact") -> tuple[np.ndarray, np.ndarray]:
    """(ids, 1 - cosine) of each row's k nearest rows, self included, nearest first."""
    import faiss

    if method == "exact":
        index = faiss.IndexFlatIP(x.shape[1])
    elif method == "hnsw":
        # Not in the reference (its GPU path is IVF-PQ): for scale, with imret.search's HNSW settings.
        index = faiss.IndexHNSWFlat(x.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction, index.hnsw.efSearch = HNSW_EF_CONSTRUCTION, max(HNSW_EF_SEARCH, 2 * k)
    else:
        raise ValueError(f"knn = {method!r}: choose 'exact' or 'hnsw'")
    index.add(x)
    sims, ids = index.search(x, k)
    # The reference stores 1 - cosine in float32 and re-sorts it ascending (stable for k <= 16).
    dist = (1 - sims.astype(np.float32)).astype(np.float32)
    order = np.argsort(dist, axis=1, kind="stable")
    return np.take_along_axis(ids, order, 1).astype(np.int64), np.take_along_axis(dist, order, 1)


def graph_from_knn(features: np.ndarray, nbr: np.ndarray, dist: np.ndarray, labels: np.ndarray | None = None,
                   cluster_features: np.ndarray | None = None) -> LevelGraph:
    """The reference's graph of one level, from given k-NN lists (FAISS's or stored ones)."""
    n = len(nbr)
    sims = 1.0 - dist.astype(np.float64)  # the reference's similarity goes through float32 1 - cos
    valid = (nbr >= 0) & (nbr != np.arange(n)[:, None]) & (sims >= 0)
    row_sum = np.where(valid, sims, 0.0).sum(1)
    r_inv = 1.0 / np.where(row_sum <= 0, 1.0, row_sum)
    affine = np.where(valid, sims * r_inv[:, None], 0.0).astype(np.float32)
    # raw_affine = affine / (1 / row sum), both in float32, exactly as the reference divides.
    raw = np.where(valid, affine / r_inv.astype(np.float32)[:, None], 0.0).astype(np.float32)
    cluster = features if cluster_features is None else cluster_features.astype(np.float32)
    graph = LevelGraph(features, cluster, nbr, dist, valid, raw, affine)
    if labels is not None:
        graph.labels = np.asarray(labels, dtype=np.int64)
        graph.density = ground_truth_density(dist, nbr, graph.labels)
    return graph


def build_level_graph(features: np.ndarray, k: int, labels: np.ndarray | None = None,
                      cluster_features: np.ndarray | None = None, method: str = "exact") -> LevelGraph:
    """The k-NN graph of ``features`` (L2-normalised); with labels, its ground-truth density too."""
    nbr, dist = knn_search(features, k, method)
    return graph_from_knn(features, nbr, dist, labels, cluster_features)


def ground_truth_density(dist: np.ndarray, nbr: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Supervised density: (similarity to same-class minus other-class neighbours) / (k - 1).

    As in the reference, column 0 is taken to be the node itself, and negative
    similarities count here although they are not edges of the graph.
    """
    k = nbr.shape[1]
    same = labels[np.where(nbr >= 0, nbr, 0)] == labels[:, None]
    sims = 1 - dist[:, 1:].astype(np.float64)
    pos = (sims * same[:, 1:]).sum(1)
    neg = (sims * (1 - same[:, 1:])).sum(1)
    return ((pos - neg) / (k - 1)).astype(np.float32)

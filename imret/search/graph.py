"""The k-NN graph of a set of features: each point's nearest other points by cosine similarity.

The clusterers build on it. Below ``exact_below`` points the search is exact (FAISS
flat inner product, on GPU when present); above it an approximate FAISS index (HNSW
or IVF) is used and its recall is measured on a sample against exact search. Lists
order equal similarities by ascending id, so they do not depend on FAISS's order.
Nothing here holds an n x n matrix: memory is O(n k).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from imret.search.knn import FAISS_GPU_MAX_K, Neighbours, drop_own, faiss_gpus, knn, sort_lists

# HNSW: 32 links per node and a search beam of 128 keep recall@10 high on tightly
# clustered data, where a sparser graph strands whole clusters (see docs/clustering.md).
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128
# IVF: about 4 sqrt(n) lists, each trained on at most 64 points (FAISS warns below 39);
# 32 probed lists find a tight cluster even when it straddles a few cells.
IVF_LISTS_PER_SQRT_N = 4
IVF_TRAIN_PER_LIST = 64
IVF_MIN_PER_LIST = 39
IVF_NPROBE = 32
SEARCH_BLOCK = 65536  # queries per FAISS call: bounds the temporaries, whatever n is
RECALL_TIE_TOL = 1e-5  # a neighbour this close to the k-th exact similarity counts as found


def normalise(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32), so inner products are cosines and tau a cosine."""
    x = np.ascontiguousarray(features, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))  # einsum: no n x d temporary
    if np.allclose(norms, 1.0, atol=1e-4):
        return x
    return x / np.maximum(norms, 1e-12)[:, None]


def knn_graph(features: np.ndarray, k: int, exact_below: int = 200_000, index: str = "hnsw",
              recall_sample: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Each point's k nearest other points by cosine similarity.

    Returns ``sims`` (float32, n x k, descending; -inf where a list is short), ``ids``
    (int64, n x k; -1 there) and ``info``: the method, the device, timings and, for an
    approximate index, its recall@k against exact search on ``recall_sample`` points.
    Equal similarities are ordered by ascending id, so lists do not depend on FAISS's order.
    """
    x = normalise(features)
    _check_graph_args(x, k, index)
    k = min(k, len(x) - 1)
    if len(x) < exact_below:
        started = time.perf_counter()
        sims, ids = exact_knn(x, k)
        return sims, ids, {"method": "exact", "device": _device(), "k": k, "recall": None,
                           "build_s": 0.0, "search_s": time.perf_counter() - started, "recall_s": 0.0}
    sims, ids, info = approximate_knn(x, k, index)
    started = time.perf_counter()
    info["recall"] = knn_recall(x, sims, ids, recall_sample, seed)
    info["recall_s"] = time.perf_counter() - started
    return sims, ids, info


def _check_graph_args(x: np.ndarray, k: int, index: str) -> None:
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"clustering needs a 2-D array of at least 2 feature vectors, got shape {x.shape}; "
                         "check that cluster.splits name non-empty splits whose features were extracted")
    if k < 1:
        raise ValueError(f"cluster.k must be at least 1 (neighbours per point), got {k}")
    if index not in ("hnsw", "ivf"):
        raise ValueError(f"cluster.index: unknown approximate index '{index}'; the known ones are hnsw and ivf")


def _device() -> str:
    return f"{faiss_gpus()} gpu(s)" if faiss_gpus() else "cpu"


def exact_knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN of every row among the others (FAISS flat inner product, on GPU when present)."""
    neigh = knn(x, x, k, exclude_self=True)
    return neigh.scores, neigh.ids


def approximate_knn(x: np.ndarray, k: int, kind: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """k-NN of every row from an HNSW or IVF index (self excluded), with build and search times."""
    started = time.perf_counter()
    index, params = build_index(x, kind, k)
    built = time.perf_counter()
    sims, ids = search_without_self(index, x, k)
    info = {"method": kind, "device": params.pop("device"), "k": k, "params": params,
            "build_s": built - started, "search_s": time.perf_counter() - built}
    return sims, ids, info


def build_index(x: np.ndarray, kind: str, k: int) -> tuple[Any, dict[str, Any]]:
    """A filled FAISS index over ``x`` and its settings: ``hnsw`` or ``ivf``."""
    return _hnsw_index(x, k) if kind == "hnsw" else _ivf_index(x, k)


def _hnsw_index(x: np.ndarray, k: int) -> tuple[Any, dict[str, Any]]:
    """HNSW on the CPU: FAISS has no GPU HNSW (on GPUs, choose ivf or raise exact_below)."""
    import faiss

    index = faiss.IndexHNSWFlat(x.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(x)
    index.hnsw.efSearch = max(HNSW_EF_SEARCH, 2 * (k + 1))
    return index, {"device": "cpu", "M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION,
                   "efSearch": index.hnsw.efSearch}


def _ivf_index(x: np.ndarray, k: int) -> tuple[Any, dict[str, Any]]:
    """IVF-Flat (exact similarities inside the probed lists), trained and searched on the GPUs when present."""
    import faiss

    n, d = x.shape
    nlist, on_gpu = ivf_lists(n), faiss_gpus() > 0
    if on_gpu and k + 1 > FAISS_GPU_MAX_K:
        raise ValueError(f"cluster.k = {k} is beyond what FAISS searches on a GPU ({FAISS_GPU_MAX_K - 1} at most "
                         "here); lower cluster.k or use cluster.index: hnsw")
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.max_points_per_centroid = IVF_TRAIN_PER_LIST  # FAISS subsamples the training set, seeded
    if on_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.train(x)
    index.add(x)
    nprobe = min(IVF_NPROBE, nlist)
    space = faiss.GpuParameterSpace() if on_gpu else faiss.ParameterSpace()
    space.set_index_parameter(index, "nprobe", nprobe)
    return index, {"device": _device(), "nlist": nlist, "nprobe": nprobe}


def ivf_lists(n: int) -> int:
    return max(1, min(int(IVF_LISTS_PER_SQRT_N * math.sqrt(n)), n // IVF_MIN_PER_LIST))


def search_without_self(index: Any, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Search every row of ``x`` (which the index holds) for k + 1 neighbours and drop the row itself."""
    n = len(x)
    sims = np.empty((n, k), np.float32)
    ids = np.empty((n, k), np.int64)
    for lo in range(0, n, SEARCH_BLOCK):
        hi = min(n, lo + SEARCH_BLOCK)
        s, i = index.search(x[lo:hi], k + 1)
        sims[lo:hi], ids[lo:hi] = drop_own(s, i, np.arange(lo, hi), k)
    return _sorted_lists(sims, ids)


def _sorted_lists(sims: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ordered = sort_lists(Neighbours(sims, ids))
    return ordered.scores, ordered.ids


def knn_recall(x: np.ndarray, sims: np.ndarray, ids: np.ndarray, sample: int, seed: int = 0) -> float | None:
    """Recall@k of k-NN lists against exact search, on a seeded sample of ``sample`` rows.

    An approximate neighbour counts as found when it is at least as similar as the k-th
    exact neighbour, so a tie at the k-th place is not a miss. None when ``sample`` is 0.
    """
    if sample <= 0:
        return None
    n, k = ids.shape
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(sample, n), replace=False))
    exact = knn(x[rows], x, k + 1)
    exact_sims, _ = drop_own(exact.scores, exact.ids, rows, k)
    kth = exact_sims[:, -1:]
    found = (ids[rows] >= 0) & (sims[rows] >= kth - RECALL_TIE_TOL)
    return float(found.sum() / (len(rows) * k))


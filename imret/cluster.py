"""The cluster stage: pseudo-labels for the cluster-finetune loop.

Iteration k of the loop fine-tunes on the labelled split(s) plus the confidently
pseudo-labelled samples of the unlabelled split(s). This stage makes those labels with
the non-learned counterpart of Hi-LANDER's density-peak decoding (the Smooth-AP seed's
"selectbydensity"):

1. the k-NN graph of the unlabelled features (FAISS: exact below ``exact_below``
   points, an approximate HNSW or IVF index above it, its recall measured on a sample);
2. each node's density: the mean similarity to its k neighbours;
3. each node links to its most similar neighbour that is denser and more similar than
   ``tau``; the trees these links form are the clusters, their roots the density peaks;
4. Hi-LANDER's levels: the clusters are clustered the same way, level after level,
   two clusters being as similar as their members are on average, until a level
   merges nothing;
5. a sample is selected when its density exceeds ``thresh`` and its cluster keeps at
   least ``min_size`` selected samples.

The stage writes ``runs/<exp>/cluster/labels.npz`` (the pseudo-label sidecar, rebuilt
from scratch every time, so an earlier iteration's selections never carry over),
``cluster/results.json`` and TensorBoard scalars. Nothing here holds an n x n matrix:
memory is O(n k). See docs/clustering.md.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imret.config import ClusterConfig, ExperimentConfig
from imret.data.labels import LABELLED, SELECTED, UNSELECTED, save_sidecar
from imret.distributed import DistInfo
from imret.rundir import RunDir, atomic_write_json

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


# ----------------------------------------------------------------------------- the k-NN graph


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
    from imret.search import faiss_gpus

    return f"{faiss_gpus()} gpu(s)" if faiss_gpus() else "cpu"


def exact_knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN of every row among the others (FAISS flat inner product, on GPU when present)."""
    from imret.search import knn

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

    from imret.search import FAISS_GPU_MAX_K, faiss_gpus

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
        sims[lo:hi], ids[lo:hi] = drop_self(s, i, np.arange(lo, hi), k)
    return _sorted_lists(sims, ids)


def drop_self(sims: np.ndarray, ids: np.ndarray, own: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """k columns of (k + 1)-wide lists: each row without its own id, else without its last item.

    The own id is found by value, not assumed first: duplicates tie with it at similarity 1.
    """
    assert ids.shape[1] == k + 1, "drop_self expects lists one wider than k"
    ids = ids.astype(np.int64)
    sims = np.where(ids >= 0, sims, -np.inf).astype(np.float32)
    drop = ids == own[:, None]
    drop[~drop.any(axis=1), -1] = True
    keep = ~drop
    return sims[keep].reshape(len(ids), k), ids[keep].reshape(len(ids), k)


def _sorted_lists(sims: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from imret.search import Neighbours, sort_lists

    ordered = sort_lists(Neighbours(sims, ids))
    return ordered.scores, ordered.ids


def knn_recall(x: np.ndarray, sims: np.ndarray, ids: np.ndarray, sample: int, seed: int = 0) -> float | None:
    """Recall@k of k-NN lists against exact search, on a seeded sample of ``sample`` rows.

    An approximate neighbour counts as found when it is at least as similar as the k-th
    exact neighbour, so a tie at the k-th place is not a miss. None when ``sample`` is 0.
    """
    from imret.search import knn

    if sample <= 0:
        return None
    n, k = ids.shape
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(sample, n), replace=False))
    exact = knn(x[rows], x, k + 1)
    exact_sims, _ = drop_self(exact.scores, exact.ids, rows, k)
    kth = exact_sims[:, -1:]
    found = (ids[rows] >= 0) & (sims[rows] >= kth - RECALL_TIE_TOL)
    return float(found.sum() / (len(rows) * k))


# ----------------------------------------------------------------------------- density peaks


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


# ----------------------------------------------------------------------------- clustering quality


def contingency(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, ...]:
    """The sparse contingency table: its non-zero cells (pred id, truth id, count) and both margins."""
    _, p = np.unique(pred, return_inverse=True)
    _, t = np.unique(truth, return_inverse=True)
    width = int(t.max(initial=0)) + 1
    cells, counts = np.unique(p.astype(np.int64) * width + t, return_counts=True)
    return cells // width, cells % width, counts.astype(np.int64), np.bincount(p), np.bincount(t)


def quality(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Pairwise and BCubed precision / recall / F-score and NMI of a clustering (Hi-LANDER's figures).

    All come from the sparse contingency table, so the cost is one sort of n labels.
    """
    pred, truth = np.asarray(pred).ravel(), np.asarray(truth).ravel()
    if len(pred) != len(truth) or len(pred) == 0:
        raise ValueError(f"quality needs two equally long, non-empty labellings, got {len(pred)} and {len(truth)}")
    pi, ti, nij, a, b = contingency(pred, truth)
    n = len(pred)
    out: dict[str, float] = {}
    for name, (prec, rec) in (("pairwise", _pairwise(nij, a, b)), ("bcubed", _bcubed(pi, ti, nij, a, b, n))):
        out[f"{name}_f"] = _f_score(prec, rec)
        out[f"{name}_precision"], out[f"{name}_recall"] = prec, rec
    out["nmi"] = _nmi(nij, a[pi], b[ti], a, b, n)
    return out


def _pairwise(nij: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    # Ordered pairs of distinct samples: together in both, in the prediction, in the truth.
    both, in_pred, in_truth = (float((v * (v - 1)).sum()) for v in (nij, a, b))
    # No pairs predicted means no wrong pairs: precision 1 (and recall 1 with no true pairs).
    return (both / in_pred if in_pred else 1.0), (both / in_truth if in_truth else 1.0)


def _bcubed(pi: np.ndarray, ti: np.ndarray, nij: np.ndarray, a: np.ndarray, b: np.ndarray,
            n: int) -> tuple[float, float]:
    # Each of a cell's n_ij samples has precision n_ij / |its cluster| and recall n_ij / |its class|.
    sq = nij.astype(np.float64) ** 2
    return float((sq / a[pi]).sum() / n), float((sq / b[ti]).sum() / n)


def _f_score(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def _nmi(nij: np.ndarray, ai: np.ndarray, bj: np.ndarray, a: np.ndarray, b: np.ndarray, n: int) -> float:
    """Mutual information over the arithmetic mean of the entropies (scikit-learn's default)."""
    if len(a) == len(b) == 1:
        return 1.0  # neither labelling splits the data: a perfect match, as scikit-learn says
    mi = float(max((nij / n * (np.log(nij) + math.log(n) - np.log(ai) - np.log(bj))).sum(), 0.0))
    if mi == 0.0:
        return 0.0
    h_pred, h_truth = (float(-(c / n * np.log(c / n)).sum()) for c in (a, b))
    return mi / max((h_pred + h_truth) / 2, np.finfo(np.float64).eps)


# ----------------------------------------------------------------------------- methods


@dataclass
class Clustering:
    labels: np.ndarray  # int64 per sample: its cluster, 0..clusters-1 (every sample has one)
    density: np.ndarray  # float32 per sample
    selected: np.ndarray  # bool per sample: confident enough to train on
    info: dict[str, Any] = field(default_factory=dict)  # how the graph was built, timings


def density_peaks(features: np.ndarray, params: ClusterConfig) -> Clustering:
    """The "density" method: k-NN graph, density, links toward denser neighbours, levels, selection."""
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


Method = Callable[[np.ndarray, ClusterConfig], Clustering]
METHODS: dict[str, Method] = {"density": density_peaks}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"cluster.method: unknown method '{name}'; the known methods are "
                         f"{', '.join(sorted(METHODS))} (imret.cluster.METHODS)")
    return METHODS[name]


def check_params(params: ClusterConfig) -> None:
    """User errors in the cluster section, each with what to change."""
    get_method(params.method)
    if not params.splits:
        raise ValueError("cluster.splits is empty: name the unlabelled split(s) whose features to pseudo-label")
    both = sorted(set(params.splits) & set(params.labelled))
    if both:
        raise ValueError(f"cluster.splits and cluster.labelled both name {', '.join(both)}: a split is either "
                         "kept with its true labels or pseudo-labelled, not both")
    if min(params.k, params.min_size, params.levels) < 1 or min(params.exact_below, params.recall_sample) < 0:
        raise ValueError(f"cluster: k ({params.k}), min_size ({params.min_size}) and levels ({params.levels}) "
                         f"must be at least 1, "
                         f"exact_below ({params.exact_below}) and recall_sample ({params.recall_sample}) "
                         "at least 0")
    for name in ("tau", "thresh"):
        value = getattr(params, name)
        if not -1.0 <= value <= 1.0:
            raise ValueError(f"cluster.{name} = {value} is not a cosine similarity: choose a value in [-1, 1] "
                             "(features are L2-normalised, so similarities and densities lie there)")


# ----------------------------------------------------------------------------- the sidecar


@dataclass
class Sidecar:
    keys: np.ndarray
    labels: np.ndarray  # 0..C-1 labelled, C..C+K-1 selected, -1 not selected
    mask: np.ndarray  # LABELLED, SELECTED or UNSELECTED
    classes: int  # C: labelled classes
    clusters: int  # K: pseudo-classes (selected clusters)


def build_sidecar(labelled_keys: np.ndarray, labelled_labels: np.ndarray, keys: np.ndarray,
                  clusters: np.ndarray, selected: np.ndarray) -> Sidecar:
    """The seed's pseudo-label semantics, built from scratch (earlier selections are not consulted).

    Labelled samples keep their true label renumbered 0..C-1 in sorted order of the
    original labels (mask 0); selected samples get their cluster renumbered 0..K-1 over
    the selected clusters, plus C (mask 1); every other clustered sample gets -1 (mask 2).
    """
    if len(labelled_labels) and int(labelled_labels.min()) < 0:
        raise ValueError("a cluster.labelled split has samples without a label (-1); list only labelled "
                         "splits there and unlabelled ones in cluster.splits")
    classes, true = np.unique(labelled_labels, return_inverse=True)
    picked, pseudo_sel = np.unique(clusters[selected], return_inverse=True)
    pseudo = np.full(len(keys), -1, np.int64)
    pseudo[selected] = pseudo_sel + len(classes)
    all_keys = np.concatenate([np.asarray(labelled_keys, dtype=str), np.asarray(keys, dtype=str)])
    _check_unique(all_keys)
    mask = np.concatenate([np.full(len(labelled_keys), LABELLED), np.where(selected, SELECTED, UNSELECTED)])
    return Sidecar(all_keys, np.concatenate([true.astype(np.int64), pseudo]), mask.astype(np.int8),
                   len(classes), len(picked))


def _check_unique(keys: np.ndarray) -> None:
    values, counts = np.unique(keys, return_counts=True)
    if (counts > 1).any():
        dup = values[counts > 1]
        raise ValueError(f"{len(dup)} sample key(s) occur more than once among cluster.labelled and cluster.splits "
                         f"(e.g. {', '.join(dup[:3].tolist())}); a sidecar maps each key to one label, so "
                         "list each split once and do not pseudo-label a split that is also labelled")


# ----------------------------------------------------------------------------- the stage


def run(cfg: ExperimentConfig, run: RunDir, info: DistInfo) -> dict[str, Any]:
    if not info.is_main:  # a single-process stage; extra ranks (if any) have nothing to do
        return {}
    params = cfg.cluster
    check_params(params)
    started = time.perf_counter()
    embeddings, keys, truth = load_unlabelled(run, params.splits)
    result = get_method(params.method)(embeddings, params)
    labelled_keys, labelled_labels = load_labelled(cfg.data.root, params.labelled)
    sidecar = build_sidecar(labelled_keys, labelled_labels, keys, result.labels, result.selected)
    save_sidecar(run.cluster / "labels.npz", sidecar.keys, sidecar.labels, sidecar.mask)
    results = summarise(result, sidecar, truth)
    results["seconds"] = round(time.perf_counter() - started, 3)
    results["meta"] = _meta(cfg, result.info)
    atomic_write_json(run.cluster / "results.json", results)
    _to_tensorboard(run, info, results)
    _print_report(cfg, run, results)
    return {k: v for k, v in results.items() if k != "meta"}


def load_unlabelled(run: RunDir, splits: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, keys and held-out labels (-1: unknown) of the splits to cluster, concatenated."""
    from imret.extract import load_features

    parts = [load_features(run, split) for split in splits]
    return (np.concatenate([p.embeddings for p in parts]), np.concatenate([p.keys for p in parts]),
            np.concatenate([p.labels for p in parts]).astype(np.int64))


def load_labelled(root: str, splits: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Keys and true labels of the labelled splits, read from their shards' indices."""
    from imret.data.shards import ShardSplit

    readers = [ShardSplit(root, split) for split in splits]
    if not readers:
        return np.array([], dtype=str), np.array([], dtype=np.int64)
    return np.concatenate([r.keys for r in readers]), np.concatenate([r.labels for r in readers])


def summarise(result: Clustering, sidecar: Sidecar, truth: np.ndarray) -> dict[str, Any]:
    """Counts, and quality against the held-out labels where the clustered samples have them.

    Plain names score the selected samples with their pseudo-labels (what training will
    see); names ending in ``_all`` score every clustered sample's cluster, before selection.
    """
    n, chosen = len(result.labels), result.selected
    out: dict[str, Any] = {
        "samples": n, "clusters": sidecar.clusters, "clusters_all": int(result.labels.max(initial=-1)) + 1,
        "selected": int(chosen.sum()), "selected_fraction": float(chosen.mean()) if n else 0.0,
        "unselected": int(n - chosen.sum()), "labelled": int((sidecar.mask == LABELLED).sum()),
        "labelled_classes": sidecar.classes,
    }
    if result.info.get("recall") is not None:
        out["knn_recall"] = result.info["recall"]
    known = truth >= 0
    if known.any():
        out["truth_classes"] = int(len(np.unique(truth[known])))
        out.update({f"{k}_all": v for k, v in quality(result.labels[known], truth[known]).items()})
        pseudo = sidecar.labels[len(sidecar.labels) - n:]
        if (chosen & known).any():
            out.update(quality(pseudo[chosen & known], truth[chosen & known]))
    return out


def _meta(cfg: ExperimentConfig, info: dict[str, Any]) -> dict[str, Any]:
    c = cfg.cluster
    return {"experiment": cfg.name, "config_digest": cfg.digest(), "method": c.method, "k": c.k, "tau": c.tau,
            "thresh": c.thresh, "min_size": c.min_size, "levels": c.levels, "splits": c.splits, "labelled": c.labelled,
            "index": info.get("method"), "device": info.get("device"), "index_params": info.get("params", {}),
            "timings_s": {k: round(v, 3) for k, v in info.items() if k.endswith("_s")},
            "sidecar": "rebuilt from scratch; earlier selections are not carried over"}


def _to_tensorboard(run: RunDir, info: DistInfo, results: dict[str, Any]) -> None:
    from imret.tb import make_board

    board = make_board(info, run.tb)
    numbers = {k: float(v) for k, v in results.items() if isinstance(v, (int, float))}
    board.scalars(numbers, _trained_steps(run), prefix="cluster/")
    board.close()


def _trained_steps(run: RunDir) -> int:
    """The step of the run's newest checkpoint (0 without one): the x of this iteration's point."""
    from imret.checkpoint import Checkpointer, read_meta

    latest = Checkpointer(run.ckpt).latest()
    return int(read_meta(latest)["step"]) if latest else 0


def _print_report(cfg: ExperimentConfig, run: RunDir, r: dict[str, Any]) -> None:
    m = r["meta"]
    recall = f", recall@{m['k']} {r['knn_recall']:.3f}" if "knn_recall" in r else ""
    print(f"cluster: {cfg.name}: {r['samples']} samples of {'+'.join(m['splits'])}, k={m['k']} "
          f"({m['index']} k-NN on {m['device']}{recall}), tau {m['tau']:.4g}, thresh {m['thresh']:.4g}")
    print(f"  selected {r['selected']} ({100 * r['selected_fraction']:.1f}%) in {r['clusters']} pseudo-classes "
          f"(of {r['clusters_all']} clusters); {r['unselected']} unselected")
    for suffix, what in (("", "selected"), ("_all", "all")):
        if f"pairwise_f{suffix}" in r:
            print(f"  {what:<9} pairwise F {r['pairwise_f' + suffix]:.4f}  BCubed F {r['bcubed_f' + suffix]:.4f}  "
                  f"NMI {r['nmi' + suffix]:.4f}")
    print(f"  sidecar   {run.cluster / 'labels.npz'} ({r['labelled']} labelled samples in "
          f"{r['labelled_classes']} classes, mask 0; selected mask 1; unselected mask 2) in {r['seconds']:.1f} s")

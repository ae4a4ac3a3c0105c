"""Retrieval metrics as pure functions of the ranks of each query's positives.

Every metric here is a function of one ``Ranks`` object: for each query, the
(1-based, ascending) positions of its positives in its ranking of the database, and
how many positives it has in all (R).

Ties are resolved as scikit-learn's ``average_precision_score`` resolves them, so
that no metric depends on the arbitrary order of equal scores: items with equal
scores share the worst (largest) rank of their group, and the number of hits
counted at a positive includes every positive tied with it. Without ties, a
query's j-th positive has j hits. How the ranks were obtained — FAISS top-k,
an exact full ranking, a sharded search merged — is the search's business
(``imret.search``); tests feed brute-force ranks and get the same numbers.

With ranks r_1 <= r_2 <= ... <= r_R of a query's R positives and h_j hits at the j-th
(h_j = j without ties):

- ``map``           mean over queries of AP = (1/R) * sum_j h_j / r_j (full ranking)
- ``map@k``         (1/min(k, R)) * sum_{j: r_j <= k} h_j / r_j
- ``map@R``         (1/R) * sum_{j: r_j <= R} h_j / r_j ("A Metric Learning Reality Check")
- ``r_precision``   #{j: r_j <= R} / R
- ``precision@1``   1 if r_1 = 1
- ``recall@k``      1 if r_1 <= k (some positive in the top k)
- ``top1``, ``top3``  the sketch seed's names for recall@1 and recall@3

The seeds' own definitions, under their own names next to the standard ones
(docs/seeds.md; each is checked against the seed's code in tests/test_seed_metrics.py):

- ``mips_map@k``    the CIFAR seed's "mAP": (1/k) * sum_{j: r_j <= k} h_j / r_j, divided by k
                    whatever R is (equal to map@k when every query has >= k positives)
- ``ap_hits@k``     the CBIR seed's AP@r: sum_{j: r_j <= k} h_j / r_j over the number of
                    positives in the top k (0 when there is none)

Pair metrics are functions of the similarities of (query, database item) pairs instead
(``pair_metrics``): ``roc_auc`` (area under the ROC curve of "same class" against
similarity, ties counted half, as scikit-learn's ``roc_auc_score``), ``roc21_auc`` (the
sketch seed's curve: 21 thresholds 0, 0.05, ..., 1, a pair called positive when its
similarity >= the threshold, the trapezoid over those 21 points only), and
``cos_sim_pos`` / ``cos_sim_neg``, the mean similarity of positive and of negative pairs.

Triplet metrics (``triplet_metrics``) are the sketch seed's validation figures, over
(query, positive, negative) triples cut into batches (``imret.evaluate.triplets`` draws
them): ``inbatch_topK`` (1 when one of the K batch positives most similar to the query has
its class: a class match among the batch's positives, not the query's own positive), and
``cos_sim_triplet_pos`` / ``cos_sim_triplet_neg``, the mean cosine of each query with its
own positive and negative.

Queries without any positive are left out of every mean and counted separately.
A ``Ranks`` object knows the depth to which it ranked the database; a metric that
needs deeper ranks than it has raises instead of returning a wrong number.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class Ranks:
    """Positive ranks of every query, in CSR form.

    ``ranks[offsets[q]:offsets[q+1]]`` are query q's known positive ranks, ascending,
    and ``hits`` (aligned with ``ranks``) the number of positives ranked at or before
    each; ``num_positives[q]`` is its R. Ranks beyond ``depth`` are not known (a top-k
    search); ``depth == database_size`` means the full ranking.
    """

    offsets: np.ndarray  # int64, num_queries + 1
    ranks: np.ndarray  # int64, 1-based
    num_positives: np.ndarray  # int64, per query
    depth: int
    database_size: int
    hits: np.ndarray | None = None  # int64 aligned with ranks; None: no ties (1, 2, 3, ... per query)

    @property
    def num_queries(self) -> int:
        return len(self.num_positives)

    @property
    def complete(self) -> bool:
        return self.depth >= self.database_size

    def subset(self, queries: np.ndarray) -> Ranks:
        counts = np.diff(self.offsets)[queries]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        index = np.arange(offsets[-1]) - np.repeat(offsets[:-1], counts) + np.repeat(self.offsets[queries], counts)
        hits = None if self.hits is None else self.hits[index]
        return Ranks(offsets, self.ranks[index], self.num_positives[queries], self.depth, self.database_size, hits)

    def positions(self) -> tuple[np.ndarray, np.ndarray]:
        """For every known rank: its query and its number of hits (positives at or before it)."""
        counts = np.diff(self.offsets)
        query = np.repeat(np.arange(self.num_queries), counts)
        if self.hits is not None:
            return query, self.hits
        return query, np.arange(len(self.ranks)) - self.offsets[query] + 1


def ranks_from_lists(rank_lists: Sequence[Sequence[int]], num_positives: Sequence[int], depth: int,
                     database_size: int) -> Ranks:
    """Build ``Ranks`` from per-query rank lists (tests, small cases)."""
    sorted_lists = [np.sort(np.asarray(r, dtype=np.int64)) for r in rank_lists]
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in sorted_lists])]).astype(np.int64)
    ranks = np.concatenate(sorted_lists) if sorted_lists else np.zeros(0, dtype=np.int64)
    return Ranks(offsets, ranks, np.asarray(num_positives, dtype=np.int64), depth, database_size)


def _require_depth(ranks: Ranks, needed: int, metric: str) -> None:
    if ranks.depth < min(needed, ranks.database_size):
        raise ValueError(f"{metric} needs the ranking to depth {needed} but the search returned only {ranks.depth}; "
                         "search deeper (a larger k) or use an exact full ranking")


def _per_query_sum(ranks: Ranks, values: np.ndarray, keep: np.ndarray) -> np.ndarray:
    query, _ = ranks.positions()
    # float64 even when nothing is kept: numpy's bincount of no items is int64, weights or not
    return np.bincount(query[keep], weights=values[keep], minlength=ranks.num_queries).astype(np.float64, copy=False)


def average_precision(ranks: Ranks) -> np.ndarray:
    _require_depth(ranks, ranks.database_size, "map")
    _, j = ranks.positions()
    return _per_query_sum(ranks, j / ranks.ranks, np.ones(len(j), bool)) / np.maximum(ranks.num_positives, 1)


def average_precision_at(ranks: Ranks, k: int) -> np.ndarray:
    _require_depth(ranks, k, f"map@{k}")
    _, j = ranks.positions()
    return _per_query_sum(ranks, j / ranks.ranks, ranks.ranks <= k) / np.maximum(np.minimum(k, ranks.num_positives), 1)


def map_at_r(ranks: Ranks) -> np.ndarray:
    _require_depth(ranks, int(ranks.num_positives.max(initial=0)), "map@R")
    query, j = ranks.positions()
    keep = ranks.ranks <= ranks.num_positives[query]
    return _per_query_sum(ranks, j / ranks.ranks, keep) / np.maximum(ranks.num_positives, 1)


def r_precision(ranks: Ranks) -> np.ndarray:
    _require_depth(ranks, int(ranks.num_positives.max(initial=0)), "r_precision")
    query, _ = ranks.positions()
    keep = ranks.ranks <= ranks.num_positives[query]
    return _per_query_sum(ranks, np.ones(len(keep)), keep) / np.maximum(ranks.num_positives, 1)


def first_rank(ranks: Ranks) -> np.ndarray:
    """Each query's best positive rank (a huge number when none is known)."""
    first = np.full(ranks.num_queries, np.iinfo(np.int64).max)
    has = np.diff(ranks.offsets) > 0
    first[has] = ranks.ranks[ranks.offsets[:-1][has]]
    return first


def recall_at(ranks: Ranks, k: int) -> np.ndarray:
    _require_depth(ranks, k, f"recall@{k}")
    return (first_rank(ranks) <= k).astype(np.float64)


def precision_at_1(ranks: Ranks) -> np.ndarray:
    return recall_at(ranks, 1)


def mips_average_precision(ranks: Ranks, k: int) -> np.ndarray:
    """The CIFAR seed's per-query AP (``process_data/mips_cifar.py``): the precisions at the hits
    of the top k, summed and divided by k itself, not by min(k, R)."""
    _require_depth(ranks, k, f"mips_map@{k}")
    _, j = ranks.positions()
    return _per_query_sum(ranks, j / ranks.ranks, ranks.ranks <= k) / k


def ap_over_hits(ranks: Ranks, k: int) -> np.ndarray:
    """The CBIR seed's AP@r (``utils/metrics.py: APatk``): the precisions at the hits of the top k
    over the number of hits there; 0 for a query with no hit in its top k."""
    _require_depth(ranks, k, f"ap_hits@{k}")
    _, j = ranks.positions()
    keep = ranks.ranks <= k
    total = _per_query_sum(ranks, j / ranks.ranks, keep)
    hits = _per_query_sum(ranks, np.ones(len(keep)), keep)
    return np.divide(total, hits, out=np.zeros_like(total), where=hits > 0)


METRIC_PATTERNS: list[tuple[re.Pattern[str], Callable[[Ranks, re.Match[str]], np.ndarray]]] = [
    (re.compile(r"map"), lambda r, m: average_precision(r)),
    (re.compile(r"map@R"), lambda r, m: map_at_r(r)),
    (re.compile(r"map@(\d+)"), lambda r, m: average_precision_at(r, int(m.group(1)))),
    (re.compile(r"r_precision"), lambda r, m: r_precision(r)),
    (re.compile(r"precision@1"), lambda r, m: precision_at_1(r)),
    (re.compile(r"recall@(\d+)"), lambda r, m: recall_at(r, int(m.group(1)))),
    (re.compile(r"top(\d+)"), lambda r, m: recall_at(r, int(m.group(1)))),
    (re.compile(r"mips_map@(\d+)"), lambda r, m: mips_average_precision(r, int(m.group(1)))),
    (re.compile(r"ap_hits@(\d+)"), lambda r, m: ap_over_hits(r, int(m.group(1)))),
]
PAIR_METRICS = ("roc_auc", "roc21_auc", "cos_sim_pos", "cos_sim_neg")  # need similarities, not ranks
TRIPLET_METRIC = re.compile(r"inbatch_top(\d+)|cos_sim_triplet_pos|cos_sim_triplet_neg")  # need triples


def _match(name: str) -> tuple[Callable[[Ranks, re.Match[str]], np.ndarray], re.Match[str]] | None:
    for pattern, fn in METRIC_PATTERNS:
        m = pattern.fullmatch(name)
        if m:
            return fn, m
    return None


def is_triplet_metric(name: str) -> bool:
    return TRIPLET_METRIC.fullmatch(name) is not None


def check_metric_name(name: str) -> None:
    if name in PAIR_METRICS or is_triplet_metric(name) or _match(name):
        return
    raise ValueError(f"unknown metric '{name}'; metrics are map, map@K, map@R, r_precision, precision@1, "
                     f"recall@K, topK, mips_map@K, ap_hits@K, {', '.join(PAIR_METRICS)}, inbatch_topK, "
                     "cos_sim_triplet_pos, cos_sim_triplet_neg")


def depth_needed(names: Sequence[str], max_positives: int, database_size: int) -> int:
    """How deep a top-k search must go for these metrics."""
    depth = 1
    for name in names:
        if name == "map":
            return database_size
        number = re.search(r"@(\d+)$|^top(\d+)$", name)
        if number:
            depth = max(depth, int(number.group(1) or number.group(2)))
        elif name in ("map@R", "r_precision"):
            depth = max(depth, max_positives)
    return min(depth, database_size)


def per_query(ranks: Ranks, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Each rank metric of ``names`` for every query of ``ranks``, queries without positives
    included (``compute`` leaves those out of the mean). A query's value depends on its own
    ranks only, so blocks of queries give the same values as all queries at once."""
    out = {}
    for name in names:
        found = _match(name)
        if found is not None:  # pair metrics are computed elsewhere
            out[name] = found[0](ranks, found[1])
    return out


def compute(ranks: Ranks, names: Sequence[str]) -> dict[str, float]:
    """Mean of each rank metric over the queries that have at least one positive."""
    valid = np.flatnonzero(ranks.num_positives > 0)
    subset = ranks.subset(valid)
    out = {}
    for name in names:
        found = _match(name)
        if found is None:
            continue  # pair metrics are computed elsewhere
        fn, m = found
        out[name] = float(fn(subset, m).mean()) if len(valid) else float("nan")
    return out


# ----------------------------------------------------------------------------- pair metrics


@dataclass
class RocCurve:
    """The ROC curve of pair similarities: one point per distinct similarity, from (0, 0) to (1, 1)."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray  # a pair is called positive when its similarity >= threshold

    @property
    def auc(self) -> float:
        """Trapezoid area: equal to the probability that a random positive pair scores
        above a random negative pair, ties counted half (Mann-Whitney)."""
        return float(np.sum(np.diff(self.fpr) * (self.tpr[1:] + self.tpr[:-1]) / 2))

    def thinned(self, max_points: int) -> RocCurve:
        """At most ``max_points`` points, keeping both ends (for storage and plotting)."""
        if len(self.fpr) <= max_points:
            return self
        keep = np.unique(np.linspace(0, len(self.fpr) - 1, max_points).round().astype(np.int64))
        return RocCurve(self.fpr[keep], self.tpr[keep], self.thresholds[keep])


def roc_curve(similarities: np.ndarray, is_positive: np.ndarray) -> RocCurve:
    """The exact ROC curve; needs at least one positive and one negative pair."""
    sims = np.asarray(similarities, np.float64)
    pos = np.asarray(is_positive, bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"a ROC curve needs positive and negative pairs; got {n_pos} positive and {n_neg} negative")
    order = np.argsort(-sims, kind="stable")
    sims, pos = sims[order], pos[order]
    last = np.r_[np.flatnonzero(sims[1:] != sims[:-1]), len(sims) - 1]  # end of each group of equal similarities
    tps = np.cumsum(pos)[last]
    fps = (last + 1) - tps
    return RocCurve(np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos], np.r_[np.inf, sims[last]])


ROC21_THRESHOLDS = np.array(range(0, 105, 5)) / 100  # the sketch seed's grid, computed as it computes it


def grid_roc(similarities: np.ndarray, is_positive: np.ndarray,
             thresholds: np.ndarray = ROC21_THRESHOLDS) -> tuple[np.ndarray, np.ndarray]:
    """(tpr, fpr) at each threshold, a pair called positive when its similarity >= the threshold
    (the sketch seed's ``utils/roc_curve_from_scratch.py``); needs positive and negative pairs."""
    sims = np.asarray(similarities, np.float64)
    pos = np.asarray(is_positive, bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"a ROC curve needs positive and negative pairs; got {n_pos} positive and {n_neg} negative "
                         "(the sketch seed's script divides 0 by 0 here)")
    tp = n_pos - np.searchsorted(np.sort(sims[pos]), thresholds, side="left")
    fp = n_neg - np.searchsorted(np.sort(sims[~pos]), thresholds, side="left")
    return tp / n_pos, fp / n_neg


def grid_roc_auc(similarities: np.ndarray, is_positive: np.ndarray) -> float:
    """``|trapezoid(tpr, fpr)|`` over the 21 grid points only, no (0, 0) or (1, 1) added; the seed
    prints it rounded to 4 places."""
    tpr, fpr = grid_roc(similarities, is_positive)
    return float(abs(np.add.reduce(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0)))


def pair_metrics(similarities: np.ndarray, is_positive: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """The requested ``PAIR_METRICS`` (nan where the pairs hold no positive or no negative)."""
    sims = np.asarray(similarities, np.float64)
    pos = np.asarray(is_positive, bool)
    out: dict[str, float] = {}
    both = pos.any() and (~pos).any()
    if "roc_auc" in names:
        out["roc_auc"] = roc_curve(sims, pos).auc if both else float("nan")
    if "roc21_auc" in names:
        out["roc21_auc"] = grid_roc_auc(sims, pos) if both else float("nan")
    if "cos_sim_pos" in names:
        out["cos_sim_pos"] = float(sims[pos].mean()) if pos.any() else float("nan")
    if "cos_sim_neg" in names:
        out["cos_sim_neg"] = float(sims[~pos].mean()) if (~pos).any() else float("nan")
    return out


# ----------------------------------------------------------------------------- triplet metrics


def triplet_metrics(cross: np.ndarray, negative: np.ndarray, query_labels: np.ndarray, positive_labels: np.ndarray,
                    names: Sequence[str]) -> dict[str, float]:
    """The requested triplet metrics over batches of triples (nan when there is no batch).

    ``cross[b, i, j]``: cosine of batch b's query i with its positive j; ``negative[b, i]``:
    of query i with its own negative; ``query_labels`` / ``positive_labels``: ``[b, i]``.
    A query's top k are its k most similar batch positives (equal cosines in batch order).
    """
    out: dict[str, float] = {}
    empty = cross.size == 0
    for name in names:
        m = TRIPLET_METRIC.fullmatch(name)
        if m is None:
            continue
        if empty:
            out[name] = float("nan")
        elif m.group(1):
            out[name] = float(inbatch_hits(cross, query_labels, positive_labels, int(m.group(1))).mean())
        elif name == "cos_sim_triplet_pos":
            out[name] = float(np.diagonal(cross, axis1=1, axis2=2).mean())
        else:
            out[name] = float(negative.mean())
    return out


def inbatch_hits(cross: np.ndarray, query_labels: np.ndarray, positive_labels: np.ndarray, k: int) -> np.ndarray:
    """1 where one of the query's k most similar batch positives has the query's class (the sketch seed's top-k)."""
    batch = cross.shape[-1]
    if not 1 <= k <= batch:
        raise ValueError(f"inbatch_top{k} needs batches of at least {k} triples, got {batch}; "
                         "raise evaluate.triplet_batch")
    top = np.argsort(-cross, axis=-1, kind="stable")[..., :k]  # [b, i, k] positions in the batch
    top_labels = np.take_along_axis(np.broadcast_to(positive_labels[:, None, :], cross.shape), top, axis=-1)
    return (top_labels == query_labels[..., None]).any(axis=-1).astype(np.float64)


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


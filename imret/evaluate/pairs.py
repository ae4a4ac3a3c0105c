"""(query, database item) pairs for the pair metrics: roc_auc and the mean similarities."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imret.search.ranks import LabelIndex


@dataclass
class Pairs:
    """(query, database item) pairs for the pair metrics, and whether they were sampled."""

    query: np.ndarray  # int64 query index
    item: np.ndarray  # int64 global database id
    positive: np.ndarray  # bool: same label
    sampled: bool
    similarity: np.ndarray = field(default_factory=lambda: np.zeros(0))  # float64, filled by the search


def sample_pairs(query_labels: np.ndarray, database_labels: np.ndarray, self_ids: np.ndarray | None,
                 max_pairs: int, seed: int) -> Pairs:
    """Every (query, item) pair when there are at most ``max_pairs``, else a seeded sample.

    The sample is stratified: half of it (or every positive pair, if fewer) drawn
    uniformly from the positive pairs, the rest uniformly from the negative pairs. The
    ROC curve and the two mean similarities are conditional on the class of a pair, so
    this estimates them without bias, and rare positives (many classes) still get half
    of the sample. A query is never paired with itself.
    """
    nq, nd = len(query_labels), len(database_labels)
    own = None if self_ids is None else np.asarray(self_ids, np.int64)
    total = nq * nd - (0 if own is None else nq)
    if total <= max_pairs:
        return _all_pairs(query_labels, database_labels, own)
    rng = np.random.default_rng(seed)
    index = LabelIndex.build(database_labels)
    start, count = index.slices(query_labels)
    own_pos = None if own is None else index.inverse[own]
    pos_per_query = count - (0 if own is None else 1)
    neg_per_query = nd - count
    n_pos = int(min(pos_per_query.sum(), max_pairs // 2))
    q_pos, x_pos = _draw(rng, pos_per_query, n_pos, lambda q, o: start[q] + _skip(o, start[q], own_pos, q))
    q_neg, x_neg = _draw(rng, neg_per_query, max_pairs - n_pos, lambda q, o: np.where(o < start[q], o, o + count[q]))
    query = np.concatenate([q_pos, q_neg])
    item = index.order[np.concatenate([x_pos, x_neg])]
    positive = np.r_[np.ones(len(q_pos), bool), np.zeros(len(q_neg), bool)]
    return Pairs(query, item, positive, True)


def _all_pairs(query_labels: np.ndarray, database_labels: np.ndarray, own: np.ndarray | None) -> Pairs:
    query = np.repeat(np.arange(len(query_labels)), len(database_labels))
    item = np.tile(np.arange(len(database_labels)), len(query_labels))
    if own is not None:
        keep = item != own[query]
        query, item = query[keep], item[keep]
    return Pairs(query, item, query_labels[query] == database_labels[item], False)


def _draw(rng: np.random.Generator, per_query: np.ndarray, n: int, position: Any) -> tuple[np.ndarray, np.ndarray]:
    """``n`` pairs uniform over all (query, j < per_query[query]); returns queries and label-order positions."""
    if n <= 0 or per_query.sum() <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    cum = np.cumsum(per_query)
    flat = np.sort(rng.integers(0, cum[-1], n))  # sorted: the pairs of one query stay together
    query = np.searchsorted(cum, flat, side="right")
    offset = flat - (cum[query] - per_query[query])
    return query.astype(np.int64), np.asarray(position(query, offset), np.int64)


def _skip(offset: np.ndarray, start: np.ndarray, own_pos: np.ndarray | None, query: np.ndarray) -> np.ndarray:
    """Offsets among a class's items with the query's own item left out."""
    if own_pos is None:
        return offset
    return offset + (start + offset >= own_pos[query])


def pair_similarities(queries: np.ndarray, database: np.ndarray, query: np.ndarray, item: np.ndarray,
                      id_offset: int = 0, chunk: int = 1 << 16) -> np.ndarray:
    """Inner products of the given pairs in float64 (``item`` global ids; ``database`` holds
    rows from ``id_offset``). Each pair's value depends only on its two vectors."""
    out = np.empty(len(query), np.float64)
    for lo in range(0, len(query), chunk):
        q = np.asarray(queries[query[lo:lo + chunk]], np.float64)
        x = np.asarray(database[item[lo:lo + chunk] - id_offset], np.float64)
        out[lo:lo + chunk] = np.einsum("ij,ij->i", q, x)
    return out

"""The ranks of each query's positives, from top-k lists or from the exact full ranking.

Ties follow scikit-learn's average precision (see ``imret.metrics``): a positive's rank
is the number of items scoring >= its score, its hits the number of positives scoring
>= its score.

- ``ranks_from_knn`` turns top-k lists into the ranks of each query's positives down
  to depth k.
- ``full_ranks``: the rank of *every* positive in the full ranking, which full mAP
  needs, without sorting any row (``imret.search.scan``, docs/evaluation.md), kept
  whole in memory; an evaluation reduces them block by block instead (``scan``).
"""

from __future__ import annotations

import numpy as np
import torch

from imret.metrics import Ranks
from imret.search.blocks import DEFAULT_BLOCK_MB
from imret.search.knn import Neighbours
from imret.search.labels import LabelIndex, positives_per_query
from imret.search.scan import scan

__all__ = ["LabelIndex", "full_ranks", "positives_per_query", "ranks_from_knn"]


def ranks_from_knn(neigh: Neighbours, query_labels: np.ndarray, database_labels: np.ndarray,
                   exclude_self: bool = False) -> Ranks:
    """Positive ranks from top-k lists, with ties grouped as in ``imret.metrics``.

    A run of equal scores that reaches the end of a list may continue beyond it, so the
    last column only tells where the group before it ends: lists of k + 1 neighbours
    give exact ranks to depth k (depth k when the lists hold the whole database).
    """
    num_pos = positives_per_query(query_labels, database_labels, exclude_self)
    db_size = len(database_labels) - int(exclude_self)
    valid = neigh.ids >= 0
    hit = valid & (database_labels[np.where(valid, neigh.ids, 0)] == query_labels[:, None])
    k = neigh.ids.shape[1]
    end = _tie_group_ends(neigh.scores)  # last column of each entry's tie group
    depth = k if k >= db_size else max(k - 1, 0)
    known = hit & (end < depth)
    cum_hits = np.cumsum(hit, axis=1)
    rows, cols = np.nonzero(known)
    ends = end[rows, cols]
    counts = np.bincount(rows, minlength=len(query_labels))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return Ranks(offsets, (ends + 1).astype(np.int64), num_pos, depth, db_size, cum_hits[rows, ends].astype(np.int64))


def _tie_group_ends(scores: np.ndarray) -> np.ndarray:
    """For each column of each (descending) row, the last column holding the same score."""
    q, k = scores.shape
    last = np.ones((q, k), dtype=bool)
    last[:, :-1] = scores[:, :-1] != scores[:, 1:]
    cols = np.where(last, np.arange(k)[None, :], k)
    return np.minimum.accumulate(cols[:, ::-1], axis=1)[:, ::-1]


def full_ranks(queries: np.ndarray, query_labels: np.ndarray, database: np.ndarray | None,
               database_labels: np.ndarray | None, block: int | None = None,
               device: str | torch.device | None = None, self_ids: np.ndarray | None = None,
               block_mb: float = DEFAULT_BLOCK_MB) -> Ranks:
    """Exact ranks of every positive in the full ranking, all in memory.

    ``database=None``: the queries against themselves. ``self_ids``: the queries are
    items of ``database`` (query i is item self_ids[i]), left out of their own ranking.
    ``block``: query rows per block (default: as many as ``block_mb`` MiB allow).
    """
    if database is None:
        database, database_labels, self_ids = queries, query_labels, np.arange(len(queries))
    assert database_labels is not None
    parts: list[tuple[int, Ranks]] = []
    scan(queries, query_labels, database, database_labels, 0, self_ids,
         lambda idx, ranks: parts.append((int(idx[0]) if len(idx) else 0, ranks)), block_mb, device, block)
    num_pos = positives_per_query(query_labels, database_labels, self_ids is not None)
    return concat_ranks([r for _, r in sorted(parts, key=lambda p: p[0])], num_pos,
                        len(database) - int(self_ids is not None))


def concat_ranks(parts: list[Ranks], num_positives: np.ndarray, database_size: int) -> Ranks:
    """One ``Ranks`` from the ``Ranks`` of consecutive blocks of queries."""
    counts = np.concatenate([np.diff(p.offsets) for p in parts]) if parts else np.zeros(0, np.int64)
    ranks, hits = (np.concatenate([getattr(p, f) for p in parts]) if parts else np.zeros(0, np.int64)
                   for f in ("ranks", "hits"))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return Ranks(offsets, ranks.astype(np.int64), num_positives, database_size, database_size, hits.astype(np.int64))

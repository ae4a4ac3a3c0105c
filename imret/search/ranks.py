"""The ranks of each query's positives, from top-k lists or from the exact full ranking.

Ties follow scikit-learn's average precision (see ``imret.metrics``): a positive's rank
is the number of items scoring >= its score, its hits the number of positives scoring
>= its score.

- ``ranks_from_knn`` turns top-k lists into the ranks of each query's positives down
  to depth k.
- ``full_ranks``: the rank of *every* positive in the full ranking, which full mAP
  needs, without sorting any row (``imret.search.counting``, docs/evaluation.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from imret.metrics import Ranks
from imret.search.blocks import Workspace, as_float32, block_rows, default_device, map_blocks
from imret.search.counting import count_at_least
from imret.search.knn import Neighbours


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


def positives_per_query(query_labels: np.ndarray, database_labels: np.ndarray, exclude_self: bool) -> np.ndarray:
    classes, counts = np.unique(database_labels, return_counts=True)
    pos = np.searchsorted(classes, query_labels)
    pos = np.clip(pos, 0, max(len(classes) - 1, 0))
    found = (classes[pos] == query_labels) if len(classes) else np.zeros(len(query_labels), bool)
    return np.where(found, counts[pos], 0).astype(np.int64) - int(exclude_self)


@dataclass
class LabelIndex:
    """A database ordered by label, so that each class's items are one slice."""

    order: np.ndarray  # label order -> database row
    inverse: np.ndarray  # database row -> position in label order
    classes: np.ndarray
    starts: np.ndarray
    counts: np.ndarray

    @classmethod
    def build(cls, labels: np.ndarray) -> LabelIndex:
        order = np.argsort(labels, kind="stable")
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        classes, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
        return cls(order, inverse, classes, starts, counts)

    def slices(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Start (in label order) and size of each label's slice; size 0 for labels not present."""
        if not len(self.classes):
            return np.zeros(len(labels), np.int64), np.zeros(len(labels), np.int64)
        ci = np.searchsorted(self.classes, labels).clip(0, len(self.classes) - 1)
        found = self.classes[ci] == labels
        return np.where(found, self.starts[ci], 0).astype(np.int64), np.where(found, self.counts[ci], 0).astype(np.int64)


def full_ranks(queries: np.ndarray, query_labels: np.ndarray, database: np.ndarray | None,
               database_labels: np.ndarray | None, block: int | None = None,
               device: str | torch.device | None = None, self_ids: np.ndarray | None = None) -> Ranks:
    """Exact ranks of every positive in the full ranking.

    ``database=None``: the queries against themselves. ``self_ids``: the queries are
    items of ``database`` (query i is item self_ids[i]), left out of their own ranking.
    """
    if database is None:
        database, database_labels, self_ids = queries, query_labels, np.arange(len(queries))
    assert database_labels is not None
    dev = default_device(device)
    index = LabelIndex.build(database_labels)
    db = torch.from_numpy(as_float32(database[index.order])).to(dev)
    start, count = index.slices(query_labels)
    own_pos = None if self_ids is None else index.inverse[np.asarray(self_ids, np.int64)]

    def one_block(lo: int, hi: int, work: Workspace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        q = torch.from_numpy(as_float32(queries[lo:hi])).to(dev)
        scores = torch.mm(q, db.T, out=work.get("scores", (hi - lo) * len(db), torch.float32, dev).view(hi - lo, -1))
        return _block_ranks(scores, start[lo:hi], count[lo:hi], None if own_pos is None else own_pos[lo:hi], work)

    parts = map_blocks(one_block, len(queries), block or block_rows(len(database), dev), dev)
    exclude = self_ids is not None
    num_pos = positives_per_query(query_labels, database_labels, exclude)
    return _concat_ranks(parts, num_pos, len(database) - int(exclude))


def _block_ranks(scores: torch.Tensor, start: np.ndarray, count: np.ndarray, own: np.ndarray | None,
                 work: Workspace | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ranks and hits of the positives of a block of rows; the database is in label order."""
    dev = scores.device
    b = scores.shape[0]
    width = max(int(count.max(initial=0)), 1)
    col = torch.from_numpy(start[:, None] + np.arange(width)[None, :]).to(dev)
    is_pos = torch.from_numpy(np.arange(width)[None, :] < count[:, None]).to(dev)
    if own is not None:  # the query itself is neither a positive nor ranked
        own_t = torch.from_numpy(own).to(dev)
        scores[torch.arange(b, device=dev), own_t] = -torch.inf
        is_pos &= col != own_t[:, None]
    pos = torch.gather(scores, 1, col.clamp(max=scores.shape[1] - 1))
    pos = torch.where(is_pos, pos, torch.inf).sort(dim=1).values  # ascending, padding (+inf) last
    n_pos = is_pos.sum(dim=1)
    at_least = count_at_least(scores, pos, n_pos, workspace=work)  # items (positives included) >= each positive
    return _ranks_hits(at_least, pos, n_pos)


def _ranks_hits(at_least: torch.Tensor, pos: torch.Tensor,
                n_pos: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: its number of positives, and their ranks and hits in ascending rank order."""
    hits = n_pos[:, None] - torch.searchsorted(pos, pos, right=False)  # positives scoring >= each
    real = torch.arange(pos.shape[1], device=pos.device)[None, :] < n_pos[:, None]
    rank = at_least.where(real, 0).flip(1)  # ascending scores -> ascending ranks, padding first
    hits = hits.where(real, 0).flip(1)
    valid = rank > 0
    return valid.sum(1).cpu().numpy(), rank[valid].cpu().numpy(), hits[valid].cpu().numpy()


def _concat_ranks(parts: list[tuple[np.ndarray, ...]], num_pos: np.ndarray, database_size: int) -> Ranks:
    counts, ranks, hits = (np.concatenate([p[i] for p in parts]).astype(np.int64) if parts else np.zeros(0, np.int64)
                           for i in range(3))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return Ranks(offsets, ranks, num_pos, database_size, database_size, hits)

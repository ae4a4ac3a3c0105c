"""Nearest-neighbour search over embeddings, and the positive ranks metrics are computed from.

Two ways to rank a database for a set of queries, both exact:

- ``knn``: FAISS exact inner-product search (``IndexFlatIP``; on GPU when FAISS sees
  GPUs), returning the top k ids and scores of each query. ``ranks_from_knn`` turns
  them into the ranks of each query's positives down to depth k.
- ``full_ranks``: the rank of *every* positive in the full ranking, which full mAP
  needs. Sorting each row of the query x database score matrix would cost
  O(n log n) per query; instead the database is ordered by label once, so a query's
  positives are one slice of its score row. Each score of the row is then placed
  among the query's R sorted positive scores by binary search (O(n log R)), and a
  histogram of those places counts, for every positive, the items scoring at least
  as high. Ties follow scikit-learn's average precision (see ``imret.metrics``): a
  positive's rank is the number of items scoring >= its score, its hits the number
  of positives scoring >= its score.

Embeddings are expected L2-normalised, so inner product is cosine similarity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from imret.metrics import Ranks

FAISS_GPU_MAX_K = 2048  # FAISS GPU brute-force search returns at most this many neighbours


@dataclass
class Neighbours:
    scores: np.ndarray  # float32, num_queries x k, descending
    ids: np.ndarray  # int64, num_queries x k, database row ids (-1: none)


def faiss_gpus() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def knn(queries: np.ndarray, database: np.ndarray, k: int, exclude_self: bool = False) -> Neighbours:
    """Exact top-k by inner product. ``exclude_self``: queries are the database; drop each query's own row."""
    import faiss

    queries = np.ascontiguousarray(queries, dtype=np.float32)
    database = np.ascontiguousarray(database, dtype=np.float32)
    k_search = min(k + int(exclude_self), len(database))
    if faiss_gpus() and k_search <= FAISS_GPU_MAX_K:
        scores, ids = _gpu_knn(queries, database, k_search)
    else:  # CPU (also for k beyond FAISS's GPU limit: exact either way)
        index = faiss.IndexFlatIP(database.shape[1])
        index.add(database)
        scores, ids = index.search(queries, k_search)
    if exclude_self:
        scores, ids = _drop_self(scores, ids, k)
    return Neighbours(scores, ids)


def _gpu_knn(queries: np.ndarray, database: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.IndexFlatIP(database.shape[1])
    gpu_index = faiss.index_cpu_to_all_gpus(index, co=_sharded_options())
    gpu_index.add(database)
    return gpu_index.search(queries, k)


def _sharded_options() -> object:
    import faiss

    co = faiss.GpuMultipleClonerOptions()
    co.shard = True  # split the database over the GPUs (IndexShards) rather than replicating it
    return co


def _drop_self(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own id from its row (wherever it is) and keep k columns."""
    own = ids == np.arange(len(ids))[:, None]
    missing = ~own.any(axis=1)
    own[missing, -1] = True  # self not in the list: drop the last column instead
    keep = ~own
    return scores[keep].reshape(len(ids), -1)[:, :k], ids[keep].reshape(len(ids), -1)[:, :k]


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
    depth = k if k >= db_size else k - 1
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


def full_ranks(queries: np.ndarray, query_labels: np.ndarray, database: np.ndarray | None,
               database_labels: np.ndarray | None, block: int = 1024, device: str | None = None) -> Ranks:
    """Exact ranks of every positive in the full ranking. ``database=None``: queries against themselves."""
    exclude_self = database is None
    if exclude_self:
        database, database_labels = queries, query_labels
    assert database is not None and database_labels is not None
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    order = np.argsort(database_labels, kind="stable")
    sorted_labels = database_labels[order]
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))  # database row -> position in label order
    db = torch.from_numpy(np.ascontiguousarray(database[order], dtype=np.float32)).to(dev)
    classes, starts, counts = np.unique(sorted_labels, return_index=True, return_counts=True)
    parts = []
    for lo in range(0, len(queries), block):
        hi = min(lo + block, len(queries))
        self_pos = inverse[lo:hi] if exclude_self else None
        parts.append(_block_ranks(queries[lo:hi], query_labels[lo:hi], db, classes, starts, counts, self_pos, dev))
    num_pos = positives_per_query(query_labels, database_labels, exclude_self)
    return _concat_ranks(parts, num_pos, len(database) - int(exclude_self))


def _block_ranks(queries: np.ndarray, labels: np.ndarray, db: torch.Tensor, classes: np.ndarray,
                 starts: np.ndarray, counts: np.ndarray, self_pos: np.ndarray | None,
                 dev: torch.device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(dev)
    scores = q @ db.T  # b x n, database in label order
    b = len(queries)
    ci = np.searchsorted(classes, labels).clip(0, max(len(classes) - 1, 0))
    found = classes[ci] == labels if len(classes) else np.zeros(b, bool)
    start = np.where(found, starts[ci], 0)
    count = np.where(found, counts[ci], 0)
    if self_pos is not None:
        scores[torch.arange(b, device=dev), torch.from_numpy(self_pos).to(dev)] = -torch.inf
    r_max = int(count.max(initial=0))
    # positives of each row, padded with +inf (beyond every score), sorted ascending
    col = torch.from_numpy(start[:, None] + np.arange(max(r_max, 1))[None, :]).to(dev)
    is_pos = torch.from_numpy(np.arange(max(r_max, 1))[None, :] < count[:, None]).to(dev)
    pos = torch.gather(scores, 1, col.clamp(max=scores.shape[1] - 1))
    if self_pos is not None:  # the query itself is not its own positive
        is_pos &= col != torch.from_numpy(self_pos).to(dev)[:, None]
    pos = torch.where(is_pos, pos, torch.inf).sort(dim=1).values
    n_pos = is_pos.sum(dim=1)
    width = pos.shape[1] + 1
    # place of an item: how many of the row's positives score <= it. An item scores >= the
    # positive at ascending position t exactly when its place is >= t + 1.
    place_all = torch.searchsorted(pos, scores.contiguous(), right=True)
    place_pos = torch.searchsorted(pos, pos, right=True)
    hist = torch.zeros(b, width, dtype=torch.int64, device=dev)
    hist.scatter_add_(1, place_all, torch.ones_like(place_all))
    hist.scatter_add_(1, place_pos, torch.where(torch.isinf(pos), 0, -1).to(torch.int64))  # keep negatives only
    neg_at_least = hist.flip(1).cumsum(1).flip(1)[:, 1:]  # [:, t] = sum over places >= t + 1
    pos_at_least = n_pos[:, None] - torch.searchsorted(pos, pos, right=False)  # positives scoring >= p_t
    t = torch.arange(pos.shape[1], device=dev)[None, :]
    real = t < n_pos[:, None]
    rank = (pos_at_least + neg_at_least).where(real, 0).flip(1)  # per row: padding first, then ascending
    hits = pos_at_least.where(real, 0).flip(1)
    valid = rank > 0
    return valid.sum(1).cpu().numpy(), rank[valid].cpu().numpy(), hits[valid].cpu().numpy()


def _concat_ranks(parts: list[tuple[np.ndarray, ...]], num_pos: np.ndarray, database_size: int) -> Ranks:
    counts, ranks, hits = (np.concatenate([p[i] for p in parts]).astype(np.int64) if parts else np.zeros(0, np.int64)
                           for i in range(3))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return Ranks(offsets, ranks, num_pos, database_size, database_size, hits)

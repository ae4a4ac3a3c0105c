"""Exact top-k search by inner product, on CPU or GPU, over a whole database or one shard of it.

``knn`` / ``search_shard``: FAISS exact inner-product search (``IndexFlatIP``; on the
GPUs when FAISS sees any, the database split over them with ``IndexShards``), giving
each query's top k ids and scores. A database too large for one job is searched in
shards (array tasks), each returning global ids; ``merge_topk`` combines them into
exactly the global top k. Inside a list, equal scores are ordered by ascending
global id, so a list never depends on the order in which FAISS or a merge happened
to meet them. Embeddings are expected L2-normalised, so inner product is cosine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from imret.search.blocks import as_float32, block_rows

FAISS_GPU_MAX_K = 2048  # FAISS GPU brute-force search returns at most this many neighbours


@dataclass
class Neighbours:
    scores: np.ndarray  # float32, num_queries x k, descending (-inf: no item)
    ids: np.ndarray  # int64, num_queries x k, global database row ids (-1: no item)


def faiss_gpus() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def knn(queries: np.ndarray, database: np.ndarray, k: int, exclude_self: bool = False) -> Neighbours:
    """Exact top-k by inner product. ``exclude_self``: queries are the database; drop each query's own row."""
    return search_shard(queries, database, 0, k, np.arange(len(queries)) if exclude_self else None)


def search_shard(queries: np.ndarray, db_part: np.ndarray, id_offset: int, k: int,
                 self_ids: np.ndarray | None = None) -> Neighbours:
    """Exact top-k of ``queries`` among the database rows [id_offset, id_offset + len(db_part)).

    Ids are global (row numbers of the whole database). ``self_ids``: the queries are
    database items (query i is item self_ids[i]), and a query's own item is never
    returned. Returns min(k, rows available) columns; shorter rows are padded (-inf, -1).
    """
    db_part = as_float32(db_part)
    own = None if self_ids is None else np.asarray(self_ids, np.int64)
    own_here = own is not None and bool(((own >= id_offset) & (own < id_offset + len(db_part))).any())
    k_search = min(k + int(own_here), len(db_part))
    scores, ids = _complete_topk(as_float32(queries), db_part, k_search)
    ids = np.where(ids >= 0, ids + id_offset, -1)
    if own_here:
        assert own is not None
        scores, ids = drop_own(scores, ids, own, k)
    return sort_lists(Neighbours(scores[:, :k], ids[:, :k]))


def _complete_topk(queries: np.ndarray, database: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top k, where a group of equal scores straddling the k-th place is filled by ascending id.

    FAISS keeps an arbitrary subset of such a group, so neither the ids of an unsharded
    search nor a merge of shards would be reproducible. One neighbour more than k shows
    whether the group goes on past the list; only for those rows the search is deepened
    until the list holds the whole group, then each row is ordered by (score, id).
    """
    width = min(k + 1, len(database))
    scores, ids = _topk(queries, database, width)
    if width > k > 0:
        open_rows = np.flatnonzero(scores[:, k] == scores[:, k - 1])
        while len(open_rows):
            width = min(2 * width, len(database))
            deeper_s, deeper_i = _topk(queries[open_rows], database, width)
            done = (width == len(database)) | (deeper_s[:, -1] < deeper_s[:, k - 1])
            for row, s_row, i_row in zip(open_rows[done], deeper_s[done], deeper_i[done]):
                best = sort_lists(Neighbours(s_row[None], i_row[None]))
                scores[row, :k], ids[row, :k] = best.scores[0, :k], best.ids[0, :k]
            open_rows = open_rows[~done]
    return scores[:, :k], ids[:, :k]


def _topk(queries: np.ndarray, database: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if k == 0 or len(queries) == 0:
        return np.zeros((len(queries), k), np.float32), np.full((len(queries), k), -1, np.int64)
    if faiss_gpus():
        if k <= FAISS_GPU_MAX_K:
            scores, ids = _faiss_gpu_knn(queries, database, k)
        else:  # beyond FAISS's GPU limit: the same exact search as blocked torch products on the GPU
            scores, ids = torch_knn(queries, database, k, torch.device("cuda"))
    else:
        import faiss

        index = faiss.IndexFlatIP(database.shape[1])
        index.add(database)
        scores, ids = index.search(queries, k)
    return np.where(ids >= 0, scores, -np.inf).astype(np.float32), ids.astype(np.int64)


def _faiss_gpu_knn(queries: np.ndarray, database: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    co = faiss.GpuMultipleClonerOptions()
    co.shard = True  # split the database over the job's GPUs (IndexShards) rather than replicating it
    gpu_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(database.shape[1]), co=co)
    gpu_index.add(database)
    return gpu_index.search(queries, k)


def torch_knn(queries: np.ndarray, database: np.ndarray, k: int,
              device: torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k as blocked matrix products + ``torch.topk`` (any k, any device)."""
    dev = device or torch.device("cpu")
    db = torch.from_numpy(as_float32(database)).to(dev)
    rows = block_rows(len(database), dev)
    out_s, out_i = [], []
    for lo in range(0, len(queries), rows):
        q = torch.from_numpy(as_float32(queries[lo:lo + rows])).to(dev)
        top = torch.topk(q @ db.T, k, dim=1)
        out_s.append(top.values.cpu().numpy())
        out_i.append(top.indices.cpu().numpy())
    return np.concatenate(out_s), np.concatenate(out_i).astype(np.int64)


def drop_own(scores: np.ndarray, ids: np.ndarray, own: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own id from its row; rows without it lose their last column.

    The lists were searched one deeper than k, so a row without its own id drops its
    (k+1)-th item. The own id is found by value, not assumed first: a duplicate ties
    with it. When the lists held fewer than k + 1 items, a padding column is added
    first so that such a row keeps every real item.
    """
    n, width = ids.shape
    ids = ids.astype(np.int64, copy=False)
    scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32, copy=False)
    if width <= k:
        scores = np.concatenate([scores, np.full((n, 1), -np.inf, np.float32)], axis=1)
        ids = np.concatenate([ids, np.full((n, 1), -1, np.int64)], axis=1)
    is_own = ids == own[:, None]
    missing = ~is_own.any(axis=1)
    is_own[missing, -1] = True
    keep = ~is_own
    return scores[keep].reshape(n, -1), ids[keep].reshape(n, -1)


def sort_lists(neigh: Neighbours) -> Neighbours:
    """Order each row by descending score, equal scores by ascending id, padding last.

    Lists straight from FAISS are already in score order, so only the rows that are
    out of order (a tie group with ids not ascending, or a concatenation of shards'
    lists) are sorted: by id, then stably by descending score, row by row.
    """
    n, k = neigh.ids.shape
    if k < 2:
        return neigh
    scores, ids = neigh.scores, neigh.ids
    ids_key = np.where(ids >= 0, ids, np.iinfo(np.int64).max)
    later_higher = scores[:, 1:] > scores[:, :-1]
    tie_out_of_order = (scores[:, 1:] == scores[:, :-1]) & (ids_key[:, 1:] < ids_key[:, :-1])
    rows = np.flatnonzero((later_higher | tie_out_of_order).any(axis=1))
    if not len(rows):
        return neigh
    by_id = np.argsort(ids_key[rows], axis=1, kind="stable")
    neg = -np.take_along_axis(scores[rows], by_id, 1).astype(np.float64)  # -inf padding sorts last
    order = np.take_along_axis(by_id, np.argsort(neg, axis=1, kind="stable"), 1)
    out_s, out_i = scores.copy(), ids.copy()
    out_s[rows] = np.take_along_axis(scores[rows], order, 1)
    out_i[rows] = np.take_along_axis(ids[rows], order, 1)
    return Neighbours(out_s, out_i)


def merge_topk(parts: Sequence[Neighbours], k: int) -> Neighbours:
    """The global top k from the top-k lists of disjoint database shards (global ids).

    Each shard's list holds its own k best, so the k best of their union are exactly
    the k best of the whole database. Equal scores are ordered by ascending id, as in
    every list ``search_shard`` returns, so the result does not depend on the shards.
    """
    if not parts:
        raise ValueError("merge_topk needs the results of at least one database shard")
    scores = np.concatenate([p.scores for p in parts], axis=1)
    ids = np.concatenate([p.ids for p in parts], axis=1)
    merged = sort_lists(Neighbours(scores, ids))
    width = min(k, max(int((merged.ids >= 0).sum(axis=1).max(initial=0)), 0))
    return Neighbours(merged.scores[:, :width], merged.ids[:, :width])

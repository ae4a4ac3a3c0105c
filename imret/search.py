"""Nearest-neighbour search over embeddings, and the positive ranks metrics are computed from.

Two ways to rank a database for a set of queries, both exact:

- ``knn`` / ``search_shard``: FAISS exact inner-product search (``IndexFlatIP``; on the
  GPUs when FAISS sees any, the database split over them with ``IndexShards``), giving
  each query's top k ids and scores. A database too large for one job is searched in
  shards (array tasks), each returning global ids; ``merge_topk`` combines them into
  exactly the global top k. ``ranks_from_knn`` turns top-k lists into the ranks of each
  query's positives down to depth k.
- ``full_ranks``: the rank of *every* positive in the full ranking, which full mAP
  needs, without sorting any row (see ``count_at_least`` and docs/evaluation.md).

Ties follow scikit-learn's average precision (see ``imret.metrics``): a positive's rank
is the number of items scoring >= its score, its hits the number of positives scoring
>= its score. Inside a top-k list, equal scores are ordered by ascending global id, so
a list never depends on the order in which FAISS or a merge happened to meet them.

Embeddings are expected L2-normalised, so inner product is cosine similarity.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from imret.metrics import Ranks

T = TypeVar("T")

FAISS_GPU_MAX_K = 2048  # FAISS GPU brute-force search returns at most this many neighbours
CPU_BLOCK_ELEMENTS = 1 << 21  # scores per block on CPU: the block's temporaries stay in cache
GPU_BLOCK_ELEMENTS = 1 << 26


@dataclass
class Neighbours:
    scores: np.ndarray  # float32, num_queries x k, descending (-inf: no item)
    ids: np.ndarray  # int64, num_queries x k, global database row ids (-1: no item)


def faiss_gpus() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def as_float32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


# ----------------------------------------------------------------------------- top-k search


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
        scores, ids = _drop_own(scores, ids, own, k)
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
    rows = _block_rows(len(database), dev)
    out_s, out_i = [], []
    for lo in range(0, len(queries), rows):
        q = torch.from_numpy(as_float32(queries[lo:lo + rows])).to(dev)
        top = torch.topk(q @ db.T, k, dim=1)
        out_s.append(top.values.cpu().numpy())
        out_i.append(top.indices.cpu().numpy())
    return np.concatenate(out_s), np.concatenate(out_i).astype(np.int64)


def _drop_own(scores: np.ndarray, ids: np.ndarray, own: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own id from its row; rows without it lose their last column.

    The lists were searched one deeper than k, so a row without its own id drops its
    (k+1)-th item. When the shard held fewer than k + 1 items, a padding column is
    added first so that such a row keeps every real item.
    """
    n, width = ids.shape
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


# ----------------------------------------------------------------------------- ranks from top-k lists


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


# ----------------------------------------------------------------------------- exact full ranking


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


def default_device(device: str | torch.device | None = None) -> torch.device:
    return torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _block_rows(n: int, dev: torch.device) -> int:
    budget = GPU_BLOCK_ELEMENTS if dev.type == "cuda" else CPU_BLOCK_ELEMENTS
    return max(1, budget // max(n, 1))


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

    parts = map_blocks(one_block, len(queries), block or _block_rows(len(database), dev), dev)
    exclude = self_ids is not None
    num_pos = positives_per_query(query_labels, database_labels, exclude)
    return _concat_ranks(parts, num_pos, len(database) - int(exclude))


def map_blocks(fn: Callable[[int, int, Workspace], T], num_rows: int, rows: int, dev: torch.device) -> list[T]:
    """``fn(lo, hi, workspace)`` over blocks of rows, results in block order.

    On CPU the blocks run in a pool of threads, one per core, each running torch
    single-threaded with its own workspace: coarse-grained parallelism keeps every core
    busy through the serial steps (bincount, table lookups), and unlike OpenMP teams on
    each small operation it does not stall when another process takes a core.
    """
    spans = [(lo, min(lo + rows, num_rows)) for lo in range(0, num_rows, rows)]
    if dev.type != "cpu" or len(spans) < 2:
        work = Workspace()
        return [fn(lo, hi, work) for lo, hi in spans]
    local = threading.local()

    def run(span: tuple[int, int]) -> T:
        if not hasattr(local, "work"):
            local.work = Workspace()
        return fn(span[0], span[1], local.work)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return list(pool.map(run, spans))
    finally:
        torch.set_num_threads(threads)


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


# ----------------------------------------------------------------------------- counting without sorting


def count_at_least(scores: torch.Tensor, thresholds: torch.Tensor, n_thr: torch.Tensor,
                   bins: int | None = None, workspace: Workspace | None = None) -> torch.Tensor:
    """For each row r and each j < n_thr[r]: how many of ``scores[r]`` are >= ``thresholds[r, j]``.

    ``thresholds`` is sorted ascending per row (entries from n_thr[r] on are ignored).
    Exact, in O(n) per row rather than a sort or a binary search per score:

    1. every score gets a cell: ``floor(s * inv + off)`` clamped to the row's B cells,
       with [smallest threshold, largest threshold] spread over cells 1 .. B-2. The same
       elementwise operations, each correctly rounded, give the thresholds their cells,
       so the map is monotone: a threshold in a lower cell than a score is below it, one
       in a higher cell is above it.
    2. a score's *place* (how many thresholds are <= it) is then the number of
       thresholds in lower cells, plus one if its cell holds exactly one threshold and
       the score is >= it. Two table lookups per score give the place.
    3. the rare scores in a cell holding several thresholds are placed by a binary
       search among that cell's thresholds.
    4. one bincount counts the places; an item is >= threshold j exactly when its place
       is > j, so suffix sums over the place counts give the answer.
    """
    b, m = thresholds.shape
    if b == 0 or m == 0:
        return torch.zeros(b, m, dtype=torch.int64, device=scores.device)
    size = bins or _cell_count(int(n_thr.max()))
    # rows per pass: flat cell numbers stay below 2**21, where float32 resolves an eighth of a cell
    step = max(1, (1 << 21) // size)
    work = workspace if workspace is not None else Workspace()
    return torch.cat([_count_rows(scores[r:r + step], thresholds[r:r + step], n_thr[r:r + step], size, work)
                      for r in range(0, b, step)])


class Workspace:
    """Reusable buffers for the per-score temporaries of ``count_at_least``.

    Fresh multi-megabyte tensors for every block cost page faults that take longer
    than the arithmetic on them; one set of buffers, grown when needed, avoids that.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf[:numel]


def _count_rows(scores: torch.Tensor, thresholds: torch.Tensor, n_thr: torch.Tensor, size: int,
                work: Workspace) -> torch.Tensor:
    b, m = thresholds.shape
    dev = scores.device
    grid = _Grid.fit(thresholds, n_thr, size)
    tables = _Tables.build(grid, thresholds, n_thr, work)
    cells = grid.cells(scores, work).view(-1)
    numel = cells.numel()
    flat = torch.index_select(tables.place, 0, cells, out=work.get("flat", numel, torch.int32, dev))
    diff = torch.index_select(tables.single, 0, cells, out=work.get("diff", numel, torch.float32, dev))
    # place - 1 where the score is below its cell's single threshold: the sign bit of
    # (score - threshold), shifted down to 0 / -1, is cheaper than a comparison + cast
    torch.sub(scores.reshape(-1), diff, out=diff)
    sign = diff.view(torch.int32)
    flat += torch.bitwise_right_shift(sign, 31, out=sign)
    crowded = b * (m + 1)  # scores in cells with several thresholds land in crowded or crowded + 1
    counts = torch.bincount(flat, minlength=crowded + 2)
    places = counts[:crowded].view(b, m + 1)
    if int(counts[crowded:].sum()):
        where = _nonzero(torch.ge(flat, crowded, out=work.get("crowded", numel, torch.bool, dev)))
        _add_exact_places(places, where, cells[where].long(), scores, tables, thresholds)
    return places.flip(1).cumsum(1).flip(1)[:, 1:]  # [:, j] = items whose place is > j


def _nonzero(mask: torch.Tensor) -> torch.Tensor:
    if mask.device.type == "cpu":  # numpy's scan is several times faster for a sparse mask
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return mask.nonzero().squeeze(1)


def _cell_count(max_thresholds: int) -> int:
    # ~32 cells per threshold: cells with several thresholds stay rare, and the per-row
    # tables stay small next to a row of scores
    return int(min(1 << 13, max(1 << 8, 1 << (32 * max(max_thresholds, 1) - 1).bit_length())))


@dataclass
class _Grid:
    """Row-wise monotone map from scores to cells; row r owns flat cells [r*B, (r+1)*B)."""

    inv: torch.Tensor  # b x 1
    off: torch.Tensor  # b x 1
    lo: torch.Tensor  # b x 1, first flat cell of the row
    hi: torch.Tensor  # b x 1, last flat cell of the row
    size: int

    @classmethod
    def fit(cls, thresholds: torch.Tensor, n_thr: torch.Tensor, size: int) -> _Grid:
        b = thresholds.shape[0]
        dev = thresholds.device
        rows = torch.arange(b, device=dev)
        has = n_thr > 0
        t_min = torch.where(has, thresholds[:, 0], 0.0)
        t_max = torch.where(has, thresholds[rows, (n_thr - 1).clamp(min=0)], 0.0)
        # a zero width (one threshold, or all equal) still needs a finite, positive scale
        width = torch.maximum(t_max - t_min, (t_max.abs() * 1e-6).clamp(min=1e-30))
        inv = torch.where(has, (size - 4) / width, 1.0)[:, None]
        first = (rows * size).to(torch.float32)[:, None]
        off = first + 1.5 - t_min[:, None] * inv  # the smallest threshold lands mid-cell 1
        return cls(inv, off, first, first + (size - 1), size)

    def cells(self, x: torch.Tensor, work: Workspace | None = None) -> torch.Tensor:
        # separate, correctly rounded operations (no fused multiply-add): monotone in x
        if work is None:
            y, out = torch.mul(x, self.inv), torch.empty(x.shape, dtype=torch.int32, device=x.device)
        else:
            y = torch.mul(x, self.inv, out=work.get("y", x.numel(), torch.float32, x.device).view(x.shape))
            out = work.get("cells", x.numel(), torch.int32, x.device).view(x.shape)
        y.add_(self.off)
        torch.maximum(y, self.lo, out=y)
        torch.minimum(y, self.hi, out=y)
        return out.copy_(y)  # int32 indices: half the memory traffic of int64


@dataclass
class _Tables:
    """Per flat cell: the place of a score at or above the cell's single threshold, and that threshold."""

    place: torch.Tensor  # int32: row base + thresholds in lower cells + 1, or the crowded bin + 1
    single: torch.Tensor  # float32: the cell's one threshold; +inf without one, -FLT_MAX with several
    per_cell: torch.Tensor  # int32: thresholds in each cell
    lower: torch.Tensor  # int32: thresholds in lower cells of the same row

    @classmethod
    def build(cls, grid: _Grid, thresholds: torch.Tensor, n_thr: torch.Tensor, work: Workspace) -> _Tables:
        b, m = thresholds.shape
        dev = thresholds.device
        cells = b * grid.size
        real = torch.arange(m, device=dev)[None, :] < n_thr[:, None]
        # padding entries go to one spare cell past the end, so no boolean indexing is needed
        thr_cells = torch.where(real, grid.cells(torch.where(real, thresholds, 0.0)), cells).view(-1).long()
        per_cell = work.get("per_cell", cells + 1, torch.int32, dev).zero_()
        per_cell.index_put_((thr_cells,), torch.ones_like(thr_cells, dtype=torch.int32), accumulate=True)
        lower = torch.cumsum(per_cell[:cells].view(b, -1), 1, out=work.get("lower", cells, torch.int32, dev).view(b, -1))
        lower = lower.sub_(per_cell[:cells].view(b, -1)).view(-1)
        row_base = (torch.arange(b, device=dev, dtype=torch.int32) * (m + 1) + 1)[:, None]
        place = work.get("place", cells + 1, torch.int32, dev)
        torch.add(lower.view(b, -1), row_base, out=place[:cells].view(b, -1))
        single = work.get("single", cells + 1, torch.float32, dev).fill_(torch.inf)
        count = per_cell[thr_cells]
        # An empty cell: score - inf < 0, so place - 1 = thresholds below. A zero threshold
        # is stored as -0.0, so that score - threshold is never -0.0 for a score equal to it.
        # A crowded cell: score + FLT_MAX >= 0 except for a -inf score, so its scores land
        # in the bins b*(m+1) and b*(m+1) + 1, counted apart and then placed exactly.
        value = torch.where(thresholds.reshape(-1) == 0, -0.0, thresholds.reshape(-1))
        single[thr_cells] = torch.where(count > 1, -torch.finfo(torch.float32).max, value)
        place[thr_cells] = torch.where(count > 1, b * (m + 1) + 1, place[thr_cells])
        return cls(place[:cells], single[:cells], per_cell, lower)


def _add_exact_places(places: torch.Tensor, where: torch.Tensor, cell: torch.Tensor, scores: torch.Tensor,
                      tables: _Tables, thresholds: torch.Tensor) -> None:
    """Count scores of crowded cells at their exact places (binary search among the cell's thresholds)."""
    n = scores.shape[1]
    m = thresholds.shape[1]
    value = scores.reshape(-1)[where]
    row = where // n
    lo = tables.lower[cell].long()  # index of the cell's first threshold among the row's thresholds
    hi = lo + tables.per_cell[cell]
    flat_thr = thresholds.reshape(-1)
    for _ in range(int(tables.per_cell.max()).bit_length()):
        mid = (lo + hi) // 2
        go = (mid < hi) & (flat_thr[row * m + mid.clamp(max=m - 1)] <= value)
        lo = torch.where(go, mid + 1, lo)
        hi = torch.where(go, hi, mid)
    places.view(-1).index_add_(0, row * (m + 1) + lo, torch.ones_like(lo))


# ----------------------------------------------------------------------------- full ranking across database shards
#
# With the database split over array tasks, no task sees a whole score row, yet full mAP
# needs, for every positive, the number of items of *every* shard scoring at least as
# high. Recomputing a positive's score in another shard's matrix product could differ
# from its owner's value in the last bit (other GEMM shapes), so that an item would be
# counted with two different scores. Two passes keep every score computed once:
#
#   1. each task scores the queries against its own positives (``positive_scores``);
#   2. after all of pass 1, each task counts, for every positive threshold of every
#      query, its own *negatives* scoring >= it (``negative_counts``).
#
# A positive's rank is then (positives >= it, from the pass-1 scores) + (the sum over
# shards of negatives >= it), exactly as ``full_ranks`` counts within one matrix.


@dataclass
class Csr:
    """One variable-length list of floats per query: ``values[offsets[q]:offsets[q+1]]``."""

    offsets: np.ndarray  # int64, num_queries + 1
    values: np.ndarray  # float32

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def rows(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.offsets) - 1), self.sizes)

    @staticmethod
    def from_sizes(sizes: np.ndarray, values: np.ndarray) -> Csr:
        return Csr(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64), values.astype(np.float32))

    @staticmethod
    def merge_sorted(parts: Sequence[Csr]) -> Csr:
        """Per query, the union of every part's list, sorted ascending."""
        sizes = np.sum([p.sizes for p in parts], axis=0)
        rows = np.concatenate([p.rows() for p in parts])
        values = np.concatenate([p.values for p in parts])
        order = np.lexsort((values, rows))
        return Csr.from_sizes(sizes, values[order])

    def padded(self, lo: int, hi: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [lo, hi) as a (hi - lo) x width tensor padded with +inf, and the row sizes."""
        sizes = self.sizes[lo:hi]
        width = max(int(sizes.max(initial=0)), 1)
        out = np.full((hi - lo, width), np.inf, np.float32)
        rows = np.repeat(np.arange(hi - lo), sizes)
        cols = np.arange(int(sizes.sum())) - np.repeat(self.offsets[lo:hi] - self.offsets[lo], sizes)
        out[rows, cols] = self.values[self.offsets[lo]:self.offsets[hi]]
        return torch.from_numpy(out).to(dev), torch.from_numpy(sizes).to(dev)


def positive_scores(queries: np.ndarray, query_labels: np.ndarray, db_part: np.ndarray, db_part_labels: np.ndarray,
                    id_offset: int, self_ids: np.ndarray | None = None,
                    device: str | torch.device | None = None) -> Csr:
    """Pass 1 for one shard: each query's scores against its positives among rows [id_offset, ...).

    The scores come from the very blocked products pass 2 computes (same query blocks,
    same shard in label order), so an item and a positive with identical embeddings
    keep identical scores. ``self_ids``: the queries are database items (query i is item
    self_ids[i], global id), which are not their own positives.
    """
    if len(db_part) == 0:
        return Csr.from_sizes(np.zeros(len(queries), np.int64), np.zeros(0, np.float32))
    dev = default_device(device)
    index = LabelIndex.build(db_part_labels)
    start, count = index.slices(query_labels)
    part = torch.from_numpy(as_float32(db_part[index.order])).to(dev)
    own = np.asarray(self_ids) - id_offset if self_ids is not None else np.full(len(queries), -1)
    own_pos = np.where((own >= 0) & (own < len(db_part)), index.inverse[own.clip(0, max(len(db_part) - 1, 0))], -1)

    def one_block(lo: int, hi: int, work: Workspace) -> tuple[np.ndarray, np.ndarray]:
        scores = _shard_scores(queries[lo:hi], part, work)
        width = max(int(count[lo:hi].max(initial=0)), 1)
        col = start[lo:hi, None] + np.arange(width)[None, :]
        keep = (np.arange(width)[None, :] < count[lo:hi, None]) & (col != own_pos[lo:hi, None])
        picked = torch.gather(scores, 1, torch.from_numpy(col.clip(max=max(len(db_part) - 1, 0))).to(dev))
        return keep.sum(1), picked[torch.from_numpy(keep).to(dev)].cpu().numpy()

    blocks = map_blocks(one_block, len(queries), _block_rows(max(len(db_part), 1), dev), dev)
    if not blocks:
        return Csr.from_sizes(np.zeros(0, np.int64), np.zeros(0, np.float32))
    return Csr.from_sizes(np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks]))


def _shard_scores(queries: np.ndarray, part: torch.Tensor, work: Workspace) -> torch.Tensor:
    """One block of a shard's score matrix; both passes call exactly this."""
    q = torch.from_numpy(as_float32(queries)).to(part.device)
    out = work.get("scores", len(queries) * len(part), torch.float32, part.device).view(len(queries), -1)
    return torch.mm(q, part.T, out=out)


def negative_counts(queries: np.ndarray, query_labels: np.ndarray, db_part: np.ndarray, db_part_labels: np.ndarray,
                    thresholds: Csr, device: str | torch.device | None = None) -> np.ndarray:
    """Pass 2 for one shard: per threshold (aligned with ``thresholds.values``), this shard's
    negatives (items of another label) scoring >= it. Thresholds sorted ascending per query."""
    if len(db_part) == 0:
        return np.zeros(len(thresholds.values), np.int64)
    dev = default_device(device)
    index = LabelIndex.build(db_part_labels)
    part = torch.from_numpy(as_float32(db_part[index.order])).to(dev)
    part_labels = torch.from_numpy(np.asarray(db_part_labels, np.int64)[index.order]).to(dev)

    def one_block(lo: int, hi: int, work: Workspace) -> np.ndarray:
        scores = _shard_scores(queries[lo:hi], part, work)
        labels = torch.from_numpy(np.asarray(query_labels[lo:hi], np.int64)).to(dev)
        scores.masked_fill_(labels[:, None] == part_labels[None, :], -torch.inf)  # positives (and self) out
        thr, sizes = thresholds.padded(lo, hi, dev)
        counts = count_at_least(scores, thr, sizes, workspace=work)
        real = torch.arange(thr.shape[1], device=dev)[None, :] < sizes[:, None]
        return counts[real].cpu().numpy()

    parts = map_blocks(one_block, len(queries), _block_rows(max(len(db_part), 1), dev), dev)
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def ranks_from_counts(thresholds: Csr, negatives_at_least: np.ndarray, num_positives: np.ndarray,
                      database_size: int) -> Ranks:
    """Full-ranking ``Ranks`` from every positive's score (ascending per query) and the
    number of negatives, over all shards, scoring >= it."""
    rows = thresholds.rows()
    v = thresholds.values
    # positives scoring >= the j-th (ascending): R minus the index of the first equal value
    new_run = np.ones(len(v), bool)
    new_run[1:] = (v[1:] != v[:-1]) | (rows[1:] != rows[:-1])
    run_start = np.maximum.accumulate(np.where(new_run, np.arange(len(v)), 0))
    hits = thresholds.sizes[rows] - (run_start - thresholds.offsets[rows])
    ranks = hits + negatives_at_least
    order = np.lexsort((ranks, rows))  # ascending ranks within each query
    return Ranks(thresholds.offsets.copy(), ranks[order].astype(np.int64), np.asarray(num_positives, np.int64),
                 database_size, database_size, hits[order].astype(np.int64))

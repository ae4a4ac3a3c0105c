"""One pass over the database: the exact full-ranking ranks and the top-k lists from the same scores.

Each block of query rows is scored against the whole database with one matrix product
(``map_spans``: one block per core on CPU), and that block of scores gives both

- the exact rank of every positive in the full ranking: the positives' scores, sorted,
  are the thresholds of ``imret.search.counting``, which counts the items at or above
  each (docs/evaluation.md); and
- each query's exact top k (``imret.search.topk``), in ``imret.search.knn``'s order,

so no score is computed twice and no second search runs. A block's ranks go to
``consume`` as soon as they exist (the evaluation reduces them to one value per query
and metric), so memory holds one block per worker, sized by ``block_mb``, whatever the
size of the database: nothing here copies the database or keeps all positives' ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from imret.metrics import Ranks
from imret.search.blocks import (
    DEFAULT_BLOCK_MB, Workspace, as_float32, default_device, map_spans, on_gpu, rows_within, score_block, spans_of,
)
from imret.search.counting import Counter, cell_count, group_rows
from imret.search.knn import Neighbours
from imret.search.labels import LabelIndex, positives_per_query
from imret.search.topk import CHUNK, block_topk, positive_floor

Consume = Callable[[np.ndarray, Ranks], None]  # (the block's query indices, their Ranks)
TEMP_BYTES = 8  # per score of a counting call: cells (then the thresholds they cross), flat places
THRESHOLD_BYTES = 128  # per positive of a block row: its index, score, tables, counts and ranks
FIXED_BYTES = 16 << 20  # per worker: the product's own buffers, a block's small tensors


def plan_rows(n: int, max_positives: int, block_mb: float, dev: torch.device) -> int:
    """Query rows per block so that all workers' blocks fit ``block_mb`` (at least one row)."""
    cells = cell_count(max_positives)
    # per row: its scores, its cell table (and the buffer it is summed from), its positives, chunk maxima
    per_row = 4 * n + 8 * cells + THRESHOLD_BYTES * max(max_positives, 1) + 4 * (n // CHUNK + 1)
    if on_gpu(dev):  # one counting call per block: temporaries for every row
        return rows_within(block_mb, dev, per_row + TEMP_BYTES * n, FIXED_BYTES)
    return rows_within(block_mb, dev, per_row, TEMP_BYTES * group_rows(cells, dev) * n + FIXED_BYTES)


@dataclass
class _Setup:
    """What every block reads: the database on the device and where each query's positives are."""

    queries: np.ndarray
    database: torch.Tensor
    order: np.ndarray  # label order -> database row
    start: np.ndarray  # per query: its class's first position in label order
    count: np.ndarray  # per query: its class's size in the database
    own: np.ndarray | None  # per query: its own database row (self-search; -1: not here), left out
    num_pos: np.ndarray
    db_size: int
    id_offset: int  # the database is rows [id_offset, id_offset + n) of a sharded one

    @classmethod
    def make(cls, queries: np.ndarray, query_labels: np.ndarray, database: np.ndarray,
             database_labels: np.ndarray, self_ids: np.ndarray | None, dev: torch.device,
             id_offset: int = 0) -> _Setup:
        index = LabelIndex.build(np.asarray(database_labels))
        start, count = index.slices(np.asarray(query_labels))
        own = None
        if self_ids is not None:
            own = np.asarray(self_ids, np.int64) - id_offset
            own = np.where((own >= 0) & (own < len(database)), own, -1)
        num_pos = positives_per_query(query_labels, database_labels, self_ids is not None)
        db = torch.from_numpy(as_float32(database)).to(dev)  # no copy on CPU when already float32
        return cls(queries, db, index.order, start, count, own, num_pos,
                   len(database) - int(self_ids is not None), id_offset)


def scan(queries: np.ndarray, query_labels: np.ndarray, database: np.ndarray, database_labels: np.ndarray,
         k: int = 0, self_ids: np.ndarray | None = None, consume: Consume | None = None,
         block_mb: float = DEFAULT_BLOCK_MB, device: str | torch.device | None = None,
         rows: int | None = None, id_offset: int = 0) -> Neighbours | None:
    """Score every query against the database once; ranks to ``consume``, top-k lists returned.

    ``consume(query_indices, ranks)`` receives each block's full-ranking ``Ranks`` (it may
    be called from several threads at once, for disjoint queries). ``k``: neighbours per
    query (0: none, and None is returned). ``self_ids``: the queries are database items
    (query i is item self_ids[i]), each left out of its own ranking and list.
    ``rows``: query rows per block (default: as many as ``block_mb`` allows). ``id_offset``:
    the database is one shard, rows [id_offset, ...) of the whole (ids and self_ids global).
    """
    dev = default_device(device)
    setup = _Setup.make(queries, query_labels, database, database_labels, self_ids, dev, id_offset)
    rows = rows or plan_rows(len(database), int(setup.count.max(initial=0)), block_mb, dev)
    parts = map_spans(partial(_block, setup, k, consume), spans_of(len(queries), rows), dev)
    if not k:
        return None
    if not parts:
        return Neighbours(np.zeros((0, k), np.float32), np.zeros((0, k), np.int64))
    return Neighbours(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def _block(s: _Setup, k: int, consume: Consume | None, lo: int, hi: int,
           work: Workspace) -> tuple[np.ndarray, np.ndarray] | None:
    dev = s.database.device
    scores = score_block(s.queries[lo:hi], s.database, work)
    own = None if s.own is None else s.own[lo:hi]
    if own is not None:  # the query itself is neither a positive nor ranked nor listed
        here = np.flatnonzero(own >= 0)
        scores[torch.from_numpy(here).to(dev), torch.from_numpy(own[here]).to(dev)] = -torch.inf
    thresholds, n_pos = _thresholds(scores, s.order, s.start[lo:hi], s.count[lo:hi], own)
    if consume is not None:
        counter = Counter(thresholds, n_pos, work=work)
        counter.add(scores, work)
        consume(np.arange(lo, hi), block_ranks(counter.result(), thresholds, n_pos, s.num_pos[lo:hi], s.db_size))
    if not k:
        return None
    top_scores, top_ids = block_topk(scores, k, positive_floor(thresholds, n_pos, k))
    return top_scores, np.where(top_ids >= 0, top_ids + s.id_offset, -1)


def _thresholds(scores: torch.Tensor, order: np.ndarray, start: np.ndarray, count: np.ndarray,
                own: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's positives' scores, sorted ascending (+inf padded), and how many there are."""
    dev = scores.device
    width = max(int(count.max(initial=0)), 1)
    step = np.arange(width)
    is_pos = step[None, :] < count[:, None]
    cols = order[np.minimum(start[:, None] + step[None, :], max(len(order) - 1, 0))]
    if own is not None:
        is_pos &= cols != own[:, None]
    mask = torch.from_numpy(is_pos).to(dev)
    values = torch.where(mask, torch.gather(scores, 1, torch.from_numpy(cols).to(dev)), torch.inf)
    if on_gpu(dev):
        return values.sort(dim=1).values, mask.sum(1)
    # numpy's vectorised sort is tens of times faster than torch's on CPU
    return torch.from_numpy(np.sort(values.numpy(), axis=1)), mask.sum(1)


def block_ranks(at_least: torch.Tensor, thresholds: torch.Tensor, n_pos: torch.Tensor, num_positives: np.ndarray,
                database_size: int) -> Ranks:
    """A block's ``Ranks`` from each positive's count of items >= it (thresholds sorted ascending).

    A positive's hits are the positives >= it: all of them but those before the first
    positive of equal score (scikit-learn's tie convention, ``imret.metrics``).
    """
    thr, count, n = thresholds.cpu().numpy(), at_least.cpu().numpy(), n_pos.cpu().numpy()
    b, m = thr.shape
    step = np.arange(m)
    new_run = np.ones((b, m), bool)
    new_run[:, 1:] = thr[:, 1:] != thr[:, :-1]
    run_start = np.maximum.accumulate(np.where(new_run, step[None, :], 0), axis=1)
    real = step[None, :] < n[:, None]
    # flipped: each row's real entries in descending score order, i.e. ascending rank
    ranks, hits = count[:, ::-1], (n[:, None] - run_start)[:, ::-1]
    real = real[:, ::-1]
    offsets = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
    return Ranks(offsets, ranks[real].astype(np.int64), np.asarray(num_positives, np.int64), database_size,
                 database_size, hits[real].astype(np.int64))

"""Full ranking across database shards: the two-pass protocol of a sharded evaluation.

With the database split over array tasks, no task sees a whole score row, yet full mAP
needs, for every positive, the number of items of *every* shard scoring at least as
high. Recomputing a positive's score in another shard's matrix product could differ
from its owner's value in the last bit (other GEMM shapes), so that an item would be
counted with two different scores. Two passes keep every score computed once:

  1. each task scores the queries against its own positives (``positive_scores``);
  2. after all of pass 1, each task counts, for every positive threshold of every
     query, its own *negatives* scoring >= it (``negative_counts``).

A positive's rank is then (positives >= it, from the pass-1 scores) + (the sum over
shards of negatives >= it), exactly as ``full_ranks`` counts within one matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from imret.metrics import Ranks
from imret.search.blocks import Workspace, as_float32, block_rows, default_device, map_blocks, score_block
from imret.search.counting import count_at_least
from imret.search.labels import LabelIndex


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

    blocks = map_blocks(one_block, len(queries), block_rows(max(len(db_part), 1), dev), dev)
    if not blocks:
        return Csr.from_sizes(np.zeros(0, np.int64), np.zeros(0, np.float32))
    return Csr.from_sizes(np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks]))


def _shard_scores(queries: np.ndarray, part: torch.Tensor, work: Workspace) -> torch.Tensor:
    """One block of a shard's score matrix; both passes call exactly this."""
    return score_block(queries, part, work)


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

    parts = map_blocks(one_block, len(queries), block_rows(max(len(db_part), 1), dev), dev)
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

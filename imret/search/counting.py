"""Counting, for every threshold of a row, the scores at or above it, without sorting the row.

This is the kernel of the exact full-ranking mAP (docs/evaluation.md): a positive's
rank is the number of items scoring at least as high, counted here in O(n) per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from imret.search.blocks import Workspace


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

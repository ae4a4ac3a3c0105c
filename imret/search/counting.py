"""Counting, for every threshold of a row, the scores at or above it, without sorting the row.

This is the kernel of the exact full-ranking mAP (docs/evaluation.md): a positive's rank
is the number of items scoring at least as high, counted here in O(n) per row.

``Counter`` holds one block of rows' thresholds (sorted ascending per row) and counts
the scores of any number of score tiles against them; ``count_at_least`` is one tile.
How a score finds its *place* (how many of its row's thresholds are <= it):

1. every score gets a cell: ``floor(s * inv + off)`` clamped to the row's B cells,
   with [smallest threshold, largest threshold] spread over cells 1 .. B-2. The same
   elementwise operations, each correctly rounded, give the thresholds their cells,
   so the map is monotone: a threshold in a lower cell than a score is below it, one
   in a higher cell is above it.
2. one lookup in a per-cell table gives the number of thresholds in lower cells, g;
   a second, in the row's (small) sorted thresholds, gives the g-th threshold, the
   only one the score can still reach if its cell holds one threshold or none: the
   place is g, or g + 1 when the score is >= it.
3. the rare scores in a cell holding several distinct thresholds ("crowded") go to a
   spare bin, and are then placed by a binary search among their cell's thresholds.
4. one bincount counts the places; an item is >= threshold j exactly when its place
   is > j, so suffix sums over the place counts give the answer.

Equal thresholds are counted once (they have the same answer). The tables are built for
the whole block at once (a few dozen small operations, whatever the number of rows),
and the scores are counted in groups of rows whose cell tables stay in a core's cache
(``TABLE_BYTES``): the lookups are the kernel's cost, fast only while the table is cached.
Place numbers are flat within a group: its row i's places are i*W .. i*W + m (W = m + 2),
and bins g*W and g*W + 1 collect the scores of crowded cells.
"""

from __future__ import annotations

import numpy as np
import torch

from imret.search.blocks import Workspace, on_gpu

CELLS_PER_THRESHOLD = 16  # cells holding two distinct thresholds stay rare (~0.3% of scores)
MIN_CELLS, MAX_CELLS = 1 << 8, 1 << 17  # per row; 2**17 int32 cells: a 512 KiB table
TABLE_BYTES = 1 << 18  # a counting call's cell table: well within a core's L2 cache (measured best)
FLAT_CELLS = 1 << 21  # cell numbers of a call stay below 2**21, where float32 resolves an eighth of a cell
FLT_MAX = float(torch.finfo(torch.float32).max)


def cell_count(max_thresholds: int) -> int:
    """Cells per row for rows of at most ``max_thresholds`` distinct thresholds."""
    want = CELLS_PER_THRESHOLD * max(max_thresholds, 1)
    return int(min(MAX_CELLS, max(MIN_CELLS, 1 << (want - 1).bit_length())))


def group_rows(cells: int, dev: torch.device) -> int:
    """Rows per counting call: the call's cell table fits in cache on CPU (one call per block on GPU)."""
    most = FLAT_CELLS // cells
    return max(1, most) if on_gpu(dev) else max(1, min(most, TABLE_BYTES // (4 * cells)))


def count_at_least(scores: torch.Tensor, thresholds: torch.Tensor, n_thr: torch.Tensor,
                   bins: int | None = None, workspace: Workspace | None = None) -> torch.Tensor:
    """For each row r and each j < n_thr[r]: how many of ``scores[r]`` are >= ``thresholds[r, j]``.

    ``thresholds`` is sorted ascending per row (entries from n_thr[r] on are ignored);
    ``bins``: cells per row (default: ``cell_count``). Returns int64 counts, 0 where j >= n_thr[r].
    """
    work = workspace or Workspace()
    counter = Counter(thresholds, n_thr, bins, work)
    counter.add(scores, work)
    return counter.result()


class Counter:
    """Counts of scores >= each threshold of a block of rows, accumulated over score tiles."""

    def __init__(self, thresholds: torch.Tensor, n_thr: torch.Tensor, bins: int | None = None,
                 work: Workspace | None = None) -> None:
        """``work``: where the (large) cell table lives; it must stay untouched until ``result``."""
        b, m = thresholds.shape
        dev = thresholds.device
        self.shape, self.device = (b, m), dev
        real = torch.arange(m, device=dev)[None, :] < n_thr.to(dev, torch.int64)[:, None]
        unique, distinct = self._distinct(torch.where(real, thresholds, torch.inf), real)
        self.real = real
        # at least 8 cells: a positive scale, so that -inf scores stay -inf (never 0 * inf = nan)
        self.cells = max(bins, 8) if bins else cell_count(int(distinct.max()) if b and m else 1)
        self.rows = max(1, min(b, group_rows(self.cells, dev)))  # rows per counting call
        self.width = m + 2
        self.spare = self.rows * self.width  # a group's crowded bins: spare and spare + 1
        self.groups = -(-b // self.rows)
        if b and m:
            padded = torch.cat([unique, torch.full((b, 1), torch.inf, device=dev)], 1)  # +inf after every row
            self._fit(padded, distinct)
            self._above(padded)
            self._tables(unique, distinct, work or Workspace())
            self.hist = torch.zeros(self.groups, self.spare + 2, dtype=torch.int64, device=dev)

    def _distinct(self, values: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's distinct values, moved to its front (+inf after them); ``which``: where each
        threshold's value went (equal thresholds have the same answer)."""
        b, m = values.shape
        first = torch.ones_like(real)
        first[:, 1:] = values[:, 1:] != values[:, :-1]
        first &= real
        self.which = (first.cumsum(1) - 1).clamp(min=0)
        unique = torch.full((b, m + 1), torch.inf, device=values.device)
        unique.scatter_(1, torch.where(real, self.which, m), values)
        return unique[:, :m], first.sum(1)

    def _fit(self, padded: torch.Tensor, distinct: torch.Tensor) -> None:
        """Row-wise monotone map from scores to cells; a group's row i owns cells [i*B, (i+1)*B)."""
        size, dev = self.cells, padded.device
        has = distinct > 0
        t_min, t_max = padded[:, 0], padded.gather(1, (distinct - 1).clamp(min=0)[:, None])[:, 0]
        # a zero width (one threshold, or all equal) still needs a finite, positive scale
        width = torch.maximum(t_max - t_min, (t_max.abs() * 1e-6).clamp(min=1e-30))
        self.inv = torch.where(has, (size - 4) / width, 1.0)[:, None]
        first = (torch.arange(len(padded), device=dev) % self.rows * size).to(torch.float32)[:, None]
        self.off = first + 1.5 - torch.where(has, t_min, 0.0)[:, None] * self.inv  # smallest threshold: mid-cell 1
        self.lo, self.hi = first, first + (size - 1)

    def _cells(self, x: torch.Tensor, rows: slice, y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        # separate, correctly rounded operations (no fused multiply-add): monotone in x
        torch.mul(x, self.inv[rows], out=y)
        y.add_(self.off[rows])
        torch.maximum(y, self.lo[rows], out=y)
        torch.minimum(y, self.hi[rows], out=y)
        return out.copy_(y)  # int32 indices: half the memory traffic of int64

    def _cells_of(self, value: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        """The cells of scores of any rows: the same operations, elementwise, so the same cells."""
        y = value * self.inv[row, 0]
        y += self.off[row, 0]
        y = torch.minimum(torch.maximum(y, self.lo[row, 0]), self.hi[row, 0])
        return y.to(torch.int64)

    def _above(self, padded: torch.Tensor) -> None:
        """above[G, i*W + j + 1]: group G's row i's j-th threshold, the one that place j -> j + 1
        crosses; -FLT_MAX at the crowded bins. A zero threshold is stored as -0.0, so that
        score - threshold is never -0.0 for a score equal to it."""
        b, dev = len(padded), padded.device
        rows = torch.full((self.groups * self.rows, self.width), torch.inf, device=dev)
        rows[:b, 1:] = torch.where(padded == 0, -0.0, padded)
        self.above = torch.full((self.groups, self.spare + 2), -FLT_MAX, device=dev)
        self.above[:, :self.spare] = rows.view(self.groups, self.spare)

    def _tables(self, unique: torch.Tensor, distinct: torch.Tensor, work: Workspace) -> None:
        """``place``, per cell: i*W + (thresholds of row i in lower cells) + 1, or the crowded bin;
        per crowded cell (sorted): where its thresholds start in ``above`` (flat), and how many."""
        b, m = unique.shape
        dev, size, g = unique.device, self.cells, self.rows
        real = torch.arange(m, device=dev)[None, :] < distinct[:, None]
        clean = torch.where(real, unique, 0.0)
        local = self._cells(clean, slice(None), torch.empty_like(clean), torch.empty(b, m, dtype=torch.int32, device=dev))
        row = torch.arange(b, device=dev)
        spare = b * size  # where padding thresholds are counted: past every row's cells
        cells = torch.where(real, local.long() + (row - row % g)[:, None] * size, spare)  # block-wide cell numbers
        # one cumulative sum over the block: each threshold counts from the cell after its own, and
        # each row's first cell receives what takes the sum to its base (row in group) * W + 1.
        # The buffer is reused: fresh multi-megabyte tables cost more in page faults than to fill.
        steps = work.get("steps", b * size + 2, torch.int32, dev).zero_()
        steps.index_add_(0, cells.view(-1) + 1, torch.ones(1, dtype=torch.int32, device=dev).expand(b * m))
        count = steps[cells + 1]  # thresholds in each threshold's cell
        base = (row % g * self.width + 1).to(torch.int32)
        rise = base.clone()
        rise[1:] -= base[:-1] + distinct[:-1].to(torch.int32)
        steps[row * size] += rise
        self.place = torch.cumsum(steps[:b * size], 0, dtype=torch.int32,
                                  out=work.get("place", b * size, torch.int32, dev))
        # a crowded cell's first threshold: more than one in its cell, and not the cell of the one before
        first = real & (count > 1)
        first[:, 1:] &= cells[:, 1:] != cells[:, :-1]
        at = first.view(-1).nonzero().squeeze(1)  # sorted, like the cells
        self.crowded, self.crowded_count = cells.view(-1)[at], count.view(-1)[at].long()
        self.crowded_start = self.place[self.crowded].long() + self.crowded // (g * size) * (self.spare + 2)
        self.place[self.crowded] = self.spare + 1

    def add(self, scores: torch.Tensor, work: Workspace) -> None:
        """Count a tile of scores (one row per threshold row, any number of columns)."""
        b, m = self.shape
        assert scores.shape[0] == b, "a tile has one row per row of thresholds"
        if not b or not m or not scores.shape[1]:
            return
        crowded = [self._add_group(scores, group, work) for group in range(self.groups)]
        found = [c for c in crowded if c is not None]
        if found:
            self._place_crowded(torch.cat([c[0] for c in found]), torch.cat([c[1] for c in found]))

    def _add_group(self, scores: torch.Tensor, group: int,
                   work: Workspace) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Count one group's rows; returns its crowded scores and their block-wide cells, if any."""
        lo = group * self.rows
        rows = slice(lo, min(lo + self.rows, self.shape[0]))
        part = scores[rows]
        g, n = part.shape
        dev, numel = part.device, g * n
        y = work.get("y", numel, torch.float32, dev).view(g, n)
        # the cells overwrite their own float coordinates (an elementwise cast in place): one
        # buffer fewer for the cache to hold
        cells = self._cells(part, rows, y, y.view(torch.int32)).view(-1)
        place = self.place[lo * self.cells:(lo + g) * self.cells]
        flat = torch.index_select(place, 0, cells, out=work.get("flat", numel, torch.int32, dev))
        above = torch.index_select(self.above[group], 0, flat, out=y.view(-1))
        # place - 1 where the score is below the threshold it could cross: the sign bit of
        # (score - threshold), shifted down to 0 / -1, is cheaper than a comparison + cast
        sign = torch.sub(part.reshape(-1), above, out=above).view(torch.int32)
        flat += sign.bitwise_right_shift_(31)
        counts = torch.bincount(flat, minlength=self.spare + 2)
        self.hist[group] += counts
        if not int(counts[self.spare:].sum()):
            return None
        where = _at_least(flat, self.spare)
        value = part.reshape(-1)[where]
        return value, self._cells_of(value, lo + where // n) + lo * self.cells

    def _place_crowded(self, value: torch.Tensor, cell: torch.Tensor) -> None:
        """Count scores of crowded cells at their exact places: a binary search among the cell's thresholds."""
        which = torch.searchsorted(self.crowded, cell)
        lo = self.crowded_start[which]  # flat index in ``above`` of the cell's first threshold
        hi = lo + self.crowded_count[which]
        above = self.above.view(-1)
        for _ in range(int(self.crowded_count.max()).bit_length()):
            mid = (lo + hi) // 2
            go = (mid < hi) & (above[mid] <= value)
            lo = torch.where(go, mid + 1, lo)
            hi = torch.where(go, hi, mid)
        self.hist.view(-1).index_add_(0, lo - 1, torch.ones_like(lo))  # lo - 1: the score's place

    def result(self) -> torch.Tensor:
        """int64 (b x m): scores >= each threshold over every tile added (0 past a row's thresholds)."""
        b, m = self.shape
        if not b or not m:
            return torch.zeros(b, m, dtype=torch.int64, device=self.device)
        places = self.hist[:, :self.spare].reshape(-1, self.width)[:b]
        distinct = places.flip(1).cumsum(1).flip(1)[:, 1:m + 1]  # [:, j] = items whose place is > j
        return torch.gather(distinct, 1, self.which).where(self.real, 0)


def _at_least(flat: torch.Tensor, bound: int) -> torch.Tensor:
    """Positions of the (rare) entries >= bound."""
    if not on_gpu(flat.device):  # numpy's comparison and scan are several times faster here
        return torch.from_numpy(np.flatnonzero(flat.numpy() >= bound))
    return (flat >= bound).nonzero().squeeze(1)

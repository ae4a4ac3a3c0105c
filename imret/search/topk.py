"""Exact top-k lists from a block of full score rows, without sorting or selecting over whole rows.

The lists follow ``imret.search.knn``'s order: descending score, equal scores by
ascending id; ``-inf`` marks an item left out (a query's own row) and never appears.

A lower bound ``tau`` on each row's k-th best score narrows the work to a few
candidates: the k largest maxima of 64-score chunks are k items, so the k-th of them is
such a bound (and so is the k-th best of any subset of the row, e.g. its positives).
Only chunks whose maximum reaches ``tau`` are read again, and only their scores >= tau
are candidates; every item of the true top k, ties at the k-th place included, is one.
"""

from __future__ import annotations

import numpy as np
import torch

CHUNK = 64  # scores per chunk maximum: one cheap reduction, and few chunks reach tau


def block_topk(scores: torch.Tensor, k: int, floor: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's top k: float32 scores and int64 column ids, both rows x k (padding -inf, -1).

    ``floor``: a lower bound on each row's k-th best score (-inf: none known).
    """
    r, n = scores.shape
    dev = scores.device
    if k < 1:
        return np.zeros((r, 0), np.float32), np.zeros((r, 0), np.int64)
    tau = torch.full((r,), -torch.inf, device=dev) if floor is None else floor.to(dev, torch.float32)
    size = min(CHUNK, max(1, n // (2 * max(k, 1))))  # at least 2k chunks per row
    main = n // size * size
    parts = []
    if main:
        chunks = scores[:, :main].view(r, main // size, size)
        maxima = chunks.amax(2)
        if maxima.shape[1] >= k:
            tau = torch.maximum(tau, torch.topk(maxima, k, dim=1, sorted=False).values.amin(1))
        hot_row, hot_chunk = (maxima >= tau[:, None]).nonzero(as_tuple=True)
        values = chunks[hot_row, hot_chunk]
        keep, within = (values >= tau[hot_row, None]).nonzero(as_tuple=True)
        parts.append((hot_row[keep], hot_chunk[keep] * size + within, values[keep, within]))
    if main < n:
        row, col = (scores[:, main:] >= tau[:, None]).nonzero(as_tuple=True)
        parts.append((row, col + main, scores[:, main:][row, col]))
    rows, cols, vals = (torch.cat([p[i] for p in parts]).cpu().numpy() for i in range(3))
    return _first_k(rows, cols, vals, r, k)


def _first_k(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, r: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best candidates by (descending score, ascending id)."""
    real = vals > -np.inf
    rows, cols, vals = rows[real], cols[real].astype(np.int64), vals[real].astype(np.float32)
    order = np.lexsort((cols, -vals, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    pos = np.arange(len(rows)) - np.searchsorted(rows, rows)  # place within the row
    take = pos < k
    out_s = np.full((r, k), -np.inf, np.float32)
    out_i = np.full((r, k), -1, np.int64)
    out_s[rows[take], pos[take]] = vals[take]
    out_i[rows[take], pos[take]] = cols[take]
    return out_s, out_i


def positive_floor(thresholds: torch.Tensor, n_pos: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th best positive score of each row (sorted ascending, +inf padded); -inf with fewer than k."""
    r = thresholds.shape[0]
    if k < 1 or thresholds.shape[1] == 0:
        return torch.full((r,), -torch.inf, device=thresholds.device)
    at = (n_pos - k).clamp(min=0)[:, None]
    kth = torch.gather(thresholds, 1, at.clamp(max=thresholds.shape[1] - 1))[:, 0]
    return torch.where(n_pos >= k, kth, -torch.inf)

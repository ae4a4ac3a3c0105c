"""Blocked work over rows of queries: workspaces, block sizes, and a thread pool on CPU.

Every exact search of this package computes query-by-database score matrices a block
of query rows at a time, so that memory stays bounded whatever the database size.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")

CPU_BLOCK_ELEMENTS = 1 << 21  # scores per block on CPU: the block's temporaries stay in cache
GPU_BLOCK_ELEMENTS = 1 << 26


def as_float32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def default_device(device: str | torch.device | None = None) -> torch.device:
    return torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def block_rows(n: int, dev: torch.device) -> int:
    """Query rows per block for a database of ``n`` items."""
    budget = GPU_BLOCK_ELEMENTS if dev.type == "cuda" else CPU_BLOCK_ELEMENTS
    return max(1, budget // max(n, 1))


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

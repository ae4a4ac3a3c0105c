"""Blocked work over rows of queries: workspaces, block sizes, a memory budget, and a thread pool on CPU.

Every exact search of this package computes query-by-database score matrices a block
of query rows at a time, so that memory stays bounded whatever the database size.
``rows_within`` sizes those blocks from a budget in MiB (``evaluate.block_mb``), which
bounds the working set of all threads together: score blocks, counting tables and
temporaries; the features themselves are the caller's.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")

CPU_BLOCK_ELEMENTS = 1 << 21  # scores per block on CPU: the block's temporaries stay in cache
GPU_BLOCK_ELEMENTS = 1 << 26
DEFAULT_BLOCK_MB = 512.0  # evaluate.block_mb's default (imret.config.schema)
MAX_ROWS = {"cpu": 256, "cuda": 4096}  # more rows buy no faster matrix product (measured)


GEMM_ROWS = 32  # CPU products run on a multiple of this many query rows (see ``score_block``)


_GPU_PATH = contextvars.ContextVar("imret_gpu_path", default=False)


def on_gpu(dev: torch.device) -> bool:
    """Whether work on ``dev`` takes the GPU's code path: on a GPU, or inside ``gpu_path()``."""
    return dev.type == "cuda" or _GPU_PATH.get()


@contextmanager
def gpu_path() -> Iterator[None]:
    """Run the GPU's code path (one block at a time, one counting call per block, torch's sort
    and scan) on whatever device the tensors are on: tests check it on the CPU."""
    token = _GPU_PATH.set(True)
    try:
        yield
    finally:
        _GPU_PATH.reset(token)


def as_float32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def default_device(device: str | torch.device | None = None) -> torch.device:
    return torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def block_rows(n: int, dev: torch.device) -> int:
    """Query rows per block for a database of ``n`` items (fixed element count; no budget);
    on CPU a multiple of ``GEMM_ROWS``, so that blocks start where ``score_block``'s groups do."""
    if on_gpu(dev):
        return max(1, GPU_BLOCK_ELEMENTS // max(n, 1))
    return max(1, CPU_BLOCK_ELEMENTS // max(n, 1) // GEMM_ROWS) * GEMM_ROWS


def workers(dev: torch.device) -> int:
    """Blocks computed at once: one per core on CPU (``map_spans``), one on a GPU."""
    return 1 if on_gpu(dev) else max(1, torch.get_num_threads())


def rows_within(budget_mb: float, dev: torch.device, per_row: int, per_worker: int = 0) -> int:
    """Rows per block such that every worker's block fits the budget (MiB, all workers together).

    ``per_row``: bytes a block needs per query row; ``per_worker``: bytes a worker needs
    whatever its rows. A multiple of ``GEMM_ROWS``, and at least that many: a smaller
    budget is exceeded (by about 128 bytes per database item and worker).
    """
    share = budget_mb * (1 << 20) / workers(dev) - per_worker
    rows = min(MAX_ROWS["cuda" if on_gpu(dev) else "cpu"], share // max(per_row, 1))
    return int(max(GEMM_ROWS, rows // GEMM_ROWS * GEMM_ROWS))


def padded_rows(rows: int, dev: torch.device) -> int:
    return rows if on_gpu(dev) else -(-rows // GEMM_ROWS) * GEMM_ROWS


def score_block(queries: np.ndarray, database: torch.Tensor, work: Workspace) -> torch.Tensor:
    """``queries @ database.T`` for a block of query rows, in a reusable buffer.

    On CPU the product runs on a multiple of ``GEMM_ROWS`` query rows (zeros pad the
    last ones): MKL gives a product of fewer rows (1, 2 ...) other kernels with other
    rounding, but gives every score the same bits for any multiple of 32 rows (checked
    by tests/test_evaluate_blocks.py), so that scores, ranks and lists do not depend on
    the block size (the memory budget), nor on how a database was sharded (given
    shards of at least 16 items).
    """
    dev = database.device
    r, n = len(queries), len(database)
    rows = padded_rows(r, dev)
    q = work.get("queries", rows * database.shape[1], torch.float32, dev).view(rows, -1)
    q[:r] = torch.from_numpy(as_float32(queries)).to(dev)
    q[r:] = 0
    out = work.get("scores", rows * n, torch.float32, dev).view(rows, n)
    return torch.mm(q, database.T, out=out)[:r]


class Workspace:
    """Reusable buffers for the per-score temporaries of the counting kernel.

    Fresh multi-megabyte tensors for every block cost page faults that take longer
    than the arithmetic on them; one set of buffers, grown when needed, avoids that.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            self._buffers.pop(name, None)  # free the old buffer before the new one is allocated
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf[:numel]


def spans_of(num_rows: int, rows: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + rows, num_rows)) for lo in range(0, num_rows, rows)]


def map_blocks(fn: Callable[[int, int, Workspace], T], num_rows: int, rows: int, dev: torch.device) -> list[T]:
    """``fn(lo, hi, workspace)`` over blocks of ``rows`` rows, results in block order."""
    return map_spans(fn, spans_of(num_rows, rows), dev)


def map_spans(fn: Callable[[int, int, Workspace], T], spans: Sequence[tuple[int, int]], dev: torch.device) -> list[T]:
    """``fn(lo, hi, workspace)`` over spans of rows, results in span order.

    On CPU the spans run in a pool of threads, one per core, each running torch
    single-threaded with its own workspace: coarse-grained parallelism keeps every core
    busy through the serial steps (bincount, table lookups), and unlike OpenMP teams on
    each small operation it does not stall when another process takes a core.
    """
    if on_gpu(dev):
        work = Workspace()
        return [fn(lo, hi, work) for lo, hi in spans]
    local = threading.local()

    def run(span: tuple[int, int]) -> T:
        if not hasattr(local, "work"):
            local.work = Workspace()
        return fn(span[0], span[1], local.work)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # also for a single span: products then run as in any other block
    try:
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(spans)))) as pool:
            return list(pool.map(run, spans))
    finally:
        torch.set_num_threads(threads)

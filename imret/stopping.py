"""Cooperative stopping: stop at the next safe point instead of wherever a signal lands.

A preemption or time-out signal can arrive in the middle of a backward pass or an
optimizer step; saving there would store a half-updated model. So whoever receives
the signal only calls ``request()``. The trainer, which declares itself
``cooperating()`` while its loop runs, asks ``agreed(info)`` after every step: the
ranks agree (an all-reduce, so they stop at the same step even if only one was
signalled), rank 0 saves a checkpoint, and the trainer raises ``StopRequested``. The
launcher (``slurm/jobs.py``) then requeues the job, which resumes from that checkpoint.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

from imret.distributed import DistInfo, all_reduce_sum

_requested = threading.Event()
_cooperating = threading.Event()


class StopRequested(Exception):
    """Raised by a stage that stopped at a safe point after saving its state."""


def request() -> None:
    _requested.set()


def requested() -> bool:
    return _requested.is_set()


def clear() -> None:
    _requested.clear()


def is_cooperating() -> bool:
    return _cooperating.is_set()


@contextlib.contextmanager
def cooperating() -> Iterator[None]:
    """Mark the current stage as able to stop at safe points."""
    _cooperating.set()
    try:
        yield
    finally:
        _cooperating.clear()


def agreed(info: DistInfo) -> bool:
    """Whether any rank has been asked to stop (a collective: every rank must call it)."""
    flag = torch.tensor([1.0 if requested() else 0.0], device=info.device)
    return bool(all_reduce_sum(flag, info).item() > 0)

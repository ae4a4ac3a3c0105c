"""Cooperative stopping: stop at the next safe point instead of wherever a signal lands.

A preemption or time-out signal can arrive in the middle of a backward pass or an
optimizer step; saving there would store a half-updated model. So whoever receives
the signal only calls ``request()``. The trainer, which declares itself
``cooperating()`` while its loop runs, asks ``agreed(info)`` after every step: the
ranks agree (an all-reduce, so they stop at the same step even if only one was
signalled), rank 0 saves a checkpoint, and the trainer raises ``StopRequested``.

A stop has one of two purposes. ``REQUEUE`` (preemption, time-out: USR2) means the
launcher (``slurm/jobs.py``) requeues the job, which resumes from that checkpoint.
``END`` (SIGTERM from ``scancel``, ``scontrol requeue`` or a node going away; Ctrl-C
on a local submission) means the job ends after saving: the scheduler, or the user,
decides what runs next. When ranks were asked for both, ``REQUEUE`` wins: that is how
a preemption arrives where SIGTERM comes first and USR2 after it (submitit's model of
a preemption, and sites with ``PreemptParameters=send_user_signal``); a SIGTERM alone
never makes a job requeue itself, so a job the user cancelled stays cancelled.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

from imret.distributed import DistInfo, all_reduce_sum

REQUEUE = "requeue"
END = "end"
_PURPOSES = (REQUEUE, END)

_requested: dict[str, threading.Event] = {p: threading.Event() for p in _PURPOSES}
_cooperating = threading.Event()
_agreed: list[str] = []  # the purpose the ranks agreed on, once they have


class StopRequested(Exception):
    """Raised by a stage that stopped at a safe point after saving its state."""


def request(purpose: str = REQUEUE) -> None:
    """Ask this rank to stop at the next safe point (safe to call from a signal handler)."""
    assert purpose in _PURPOSES, purpose
    _requested[purpose].set()


def requested() -> bool:
    return any(e.is_set() for e in _requested.values())


def clear() -> None:
    for event in _requested.values():
        event.clear()
    _agreed.clear()


def purpose() -> str:
    """What the agreed stop is for: ``REQUEUE`` if any rank was asked for a requeue, else ``END``."""
    if _agreed:
        return _agreed[-1]
    return REQUEUE if _requested[REQUEUE].is_set() else END


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
    """Whether any rank has been asked to stop (a collective: every rank must call it).

    The ranks also agree on the stop's purpose, so that all of them leave the same way;
    calling it again after a stop renews that agreement (a USR2 may follow a SIGTERM).
    """
    flags = torch.tensor([float(_requested[p].is_set()) for p in _PURPOSES], device=info.device)
    votes = all_reduce_sum(flags, info).tolist()
    if not any(votes):
        return False
    _agreed.append(REQUEUE if votes[_PURPOSES.index(REQUEUE)] else END)
    return True

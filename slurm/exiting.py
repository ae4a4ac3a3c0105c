"""How a job's rank leaves the interpreter once its work has finished.

A finished rank could still fail its job. PyTorch's DistributedDataParallel keeps its
gloo process group alive after ``destroy_process_group()``: once a DDP wrapper has been
built, the group's threads (``gloo_tcp_loop``, ``pt_gloo_runloop``) are still running
when the rank's stage has returned, and no Python-level reference is left to drop (a
leak inside torch, measured with torch 2.14 on the CPU). The process then exits with
those threads alive, and C++ teardown at exit now and then hits one of them:
``terminate called without an active exception``, SIGABRT. Under ``srun
--kill-on-bad-exit`` that one abort fails the whole step, so the job whose ``.done``
marker is already written is recorded as FAILED and its dependants never start.

So once the job callable has returned its result, the rank leaves with ``os._exit``:
submitit has written the result file and logged the end of the job by the time the
interpreter shuts down, and Python's own atexit step runs this module's handler first
(it was registered last). It flushes what the rank printed and exits with the status the
interpreter was about to use, so a failure after the stage (an exception that reached the
top) still ends the rank with 1, and skips the C++ teardown of threads nobody can join.
Only a process started as submitit's job entry point is ended this way: under the debug
executor, or a test calling a job object, the job runs inside the submitting process,
whose own exit must stay untouched. A ``sys.exit(n)`` after the guard (submitit's USR2
handler requeuing a job that has in fact finished) ends with 0: the work is done, and the
requeued job skips it.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from types import TracebackType

_failed = False  # an exception reached the top level after the guard was set
JOB_ENTRY = "submitit.core._submit"  # the module submitit runs as a job's main program


def leave_without_teardown() -> None:
    """After a successful job call: end this process without C++ teardown (see the module docstring)."""
    main = getattr(sys.modules.get("__main__"), "__spec__", None)
    if main is None or main.name != JOB_ENTRY:
        return
    previous = sys.excepthook

    def note_failure(kind: type[BaseException], error: BaseException, trace: TracebackType | None) -> None:
        global _failed
        _failed = True
        previous(kind, error, trace)

    sys.excepthook = note_failure
    atexit.register(_exit_now)


def _exit_now() -> None:
    logging.shutdown()  # flushes submitit's log handlers, which the skipped teardown would have done
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream has nothing left to flush
            pass
    os._exit(1 if _failed else 0)

"""What a job's ranks do with the signals that end or interrupt them.

submitit handles USR2 (preemption, time-out: checkpoint and requeue) and *ignores*
SIGTERM ("Bypassing signal SIGTERM"). But SIGTERM is what ``scancel``, ``scontrol
requeue`` and a node going away send, KillWait seconds before SIGKILL; a rank that
ignores it trains on and loses everything after its last checkpoint. So here:

* USR2, while a stage cooperates (``imret.stopping``): a stop request for a requeue;
  otherwise submitit's handler at once.
* SIGTERM, and SIGINT (Ctrl-C on a local submission reaches the ranks too): a stop
  request to end, while a stage cooperates; otherwise the rank exits at once (the
  stage's finished parts are on disk and skipped when it runs again).

After the ranks have stopped at a safe point and saved, ``requeue`` or ``end`` takes
them out of the job. A stop to end waits a few seconds first, on SLURM, in case a USR2
follows the SIGTERM (a preemption that asks for a requeue; see ``imret.stopping``). A
requeue that submitit refuses (the time-out count reached ``resources.max_requeues``),
or that the scheduler refuses (the job is being cancelled), is explained in one
paragraph instead of a traceback.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import submitit
from submitit.core.utils import UncompletedJobError

from imret import stopping

EXIT_STOPPED = 75  # stopped at a safe point on request, state saved: submitting again continues (EX_TEMPFAIL)
EXIT_NOT_REQUEUED = 76  # timed out once too often: state saved, but no more requeues
USR2_AFTER_SIGTERM_S = 5.0  # how long a stop to end waits for a USR2 that turns it into a requeue (SLURM only)
ENDING = (signal.SIGTERM, signal.SIGINT)

Handler = Callable[[int, FrameType | None], Any]


def route(explain: Callable[[str], str]) -> Handler | None:
    """Install this module's handlers; return submitit's USR2 handler (None when submitit installed none).

    ``explain(reason)`` turns submitit's refusal to requeue into the message to print.
    """
    usr = submitit.JobEnvironment._usr_sig()
    submitit_handler = signal.getsignal(usr)
    submitit_handler = submitit_handler if callable(submitit_handler) else None
    rank_pid = os.getpid()  # forked data-loader workers inherit these handlers; they leave stopping to their rank

    def on_preemption(sig: int, frame: FrameType | None) -> None:
        if os.getpid() != rank_pid:
            return
        if stopping.is_cooperating():
            _say(f"received {signal.Signals(sig).name}; stopping at the next safe point for a requeue")
            stopping.request(stopping.REQUEUE)
        elif submitit_handler is not None:
            call_submitit(submitit_handler, explain)

    def on_ending(sig: int, frame: FrameType | None) -> None:
        if os.getpid() != rank_pid:
            return
        if stopping.is_cooperating():
            _say(f"received {signal.Signals(sig).name}; saving at the next safe point, then ending")
            stopping.request(stopping.END)
        else:
            _say(f"received {signal.Signals(sig).name}; ending now (finished parts are kept)")
            sys.exit(128 + sig)

    signal.signal(usr, on_preemption)
    for sig in ENDING:
        signal.signal(sig, on_ending)
    return submitit_handler


def call_submitit(handler: Handler, explain: Callable[[str], str]) -> None:
    """submitit's handler: checkpoint and requeue (and exit); a refused requeue becomes a message and an exit."""
    try:
        handler(submitit.JobEnvironment._usr_sig(), None)
    except UncompletedJobError as err:
        reason = str(err).removeprefix("Job not requeued because: ").rstrip(".")
        print(f"imret: {explain(reason)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_NOT_REQUEUED)
    except subprocess.CalledProcessError:  # `scontrol requeue` refused: the job is being cancelled
        print(f"imret: {explain('the scheduler refused to requeue it: it is ending')}", file=sys.stderr, flush=True)
        sys.exit(EXIT_STOPPED)


def requeue(submitit_handler: Handler | None, explain: Callable[[str], str]) -> None:
    """After a stop for a requeue: rank 0 lets submitit checkpoint and requeue; the others wait for it.

    The other ranks must not exit first: with ``srun --kill-on-bad-exit`` their exit
    could end rank 0 before it has requeued the job. So they block in a collective
    that rank 0 never joins; it fails as soon as rank 0 exits after requeuing (or the
    scheduler ends them with the job), and only then do they leave. The SIGTERM that
    ``scontrol requeue`` sends meanwhile is only logged.
    """
    import torch.distributed as dist

    stopped()
    if submitit.JobEnvironment().global_rank == 0 and submitit_handler is not None:
        call_submitit(submitit_handler, explain)  # calls checkpoint(), requeues, exits
    if dist.is_initialized():
        try:
            dist.barrier()
        except Exception:  # rank 0 is gone: the requeue is under way
            pass
    time.sleep(0.5)
    sys.exit(-1)


def await_requeue_request() -> None:
    """On SLURM, give a USR2 that may follow the SIGTERM time to arrive, then let the ranks agree again."""
    stopped()
    if submitit.JobEnvironment().cluster != "slurm":
        return
    from imret.distributed import from_env

    time.sleep(USR2_AFTER_SIGTERM_S)
    try:
        stopping.agreed(from_env())  # a collective: every rank that stopped to end calls it
    except Exception:  # a peer is gone already: the job is ending, as agreed
        pass


def end(stage: str) -> None:
    """After a stop to end: leave the process group together and exit with ``EXIT_STOPPED``."""
    import torch.distributed as dist

    stopped()
    if submitit.JobEnvironment().global_rank == 0:
        _say(f"{stage} stopped on request after saving its state; submitting the experiment again continues it")
    if dist.is_initialized():
        try:  # all ranks saved and passed the stop's barrier; a peer already gone is no error here
            dist.barrier()
            dist.destroy_process_group()
        except Exception:
            pass
    sys.exit(EXIT_STOPPED)


def stopped() -> None:
    """Once the ranks have stopped and saved: signals only add to the request (the ranks leave together).

    A USR2 still asks for a requeue (``await_requeue_request`` looks for it); SIGTERM,
    such as the one ``scontrol requeue`` sends, is only logged.
    """
    def note(sig: int, frame: FrameType | None) -> None:
        if sig == submitit.JobEnvironment._usr_sig():
            stopping.request(stopping.REQUEUE)
        _say(f"received {signal.Signals(sig).name} while leaving; already stopping")

    for sig in (*ENDING, submitit.JobEnvironment._usr_sig()):
        signal.signal(sig, note)


def _say(message: str) -> None:
    print(f"imret: {message}", flush=True)

"""Waiting for a submitted job: following its log, reporting how it ended, and stopping it on Ctrl-C.

A local job is submitit's controller process and one process per rank. The controller
is started with SIGINT ignored (``local_start``), so a Ctrl-C in the terminal cannot
kill it and, with it, the ranks in the middle of a step. Instead this process, on
Ctrl-C or SIGTERM, sends SIGTERM to the controller, which passes it on to the ranks:
they stop at the next safe point, save and end (``slurm.signals``), and the controller
exits after them. A second Ctrl-C kills them at once. ``--cluster debug`` runs the job
in this process; submitit's debugger on failure is opt-in (``pdb``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import submitit

from slurm.diagnose import report
from slurm.state import slurm_state

if TYPE_CHECKING:
    from slurm.chain import Submitted


class StageFailed(RuntimeError):
    """A stage's job failed; the message names the stage, the cause and its log."""


class Interrupted(RuntimeError):
    """The user stopped the submission (Ctrl-C, SIGTERM); the message says what was kept."""


class StoppedWaiting(Interrupted):
    """The user stopped waiting for SLURM jobs, which stay queued."""


@contextlib.contextmanager
def local_start(active: bool) -> Iterator[None]:
    """Start a local job's controller with SIGINT ignored (inherited across exec, and kept by Python)."""
    if not active or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def wait_for(job: submitit.Job[Any], entry: Submitted, poll_s: float = 1.0, pdb: bool = False) -> None:
    """Block until the job ends, echoing its rank-0 output; raise StageFailed or Interrupted."""
    if entry.mode == "debug":
        _run_here(job, entry, pdb)
        return
    follower = _LogFollower(Path(entry.stdout))
    try:
        while not job.done():
            follower.echo()
            if entry.mode == "slurm" and _ended_without_result(job):
                break
            time.sleep(poll_s)
    except KeyboardInterrupt:
        if entry.mode != "local":
            raise StoppedWaiting(f"stopped waiting; job {entry.job_id} ({entry.stage}) and the jobs after it "
                                 f"stay queued on SLURM") from None
        _stop_local(job, follower)
        raise Interrupted(f"{entry.stage} (job {entry.job_id}) was stopped") from None
    follower.echo()
    _check_outcome(job, entry)


def _check_outcome(job: submitit.Job[Any], entry: Submitted) -> None:
    if job.paths.result_pickle.exists():
        try:
            job.results()
            return
        except Exception:  # submitit's FailedJobError: the report below reads the logs instead
            pass
    state = slurm_state(str(job.job_id)) if entry.mode == "slurm" else None
    rep = report(vars(entry), state)
    if rep.not_requeued:
        message = next(c for c in rep.causes if "was not requeued" in c).removeprefix("imret: ")
        raise StageFailed(f"stage '{entry.stage}' ended: {message}")
    if rep.stopped:  # someone else stopped it (scancel, kill -TERM): its ranks saved first
        raise StageFailed(f"stage '{entry.stage}' was stopped on request (job {entry.job_id}"
                          f"{f': {state.state}' if state else ''}) after saving its state; submitting the experiment "
                          f"again continues it")
    lines = "\n".join(rep.lines())
    raise StageFailed(f"stage '{entry.stage}' failed (job {entry.job_id}); its logs are in "
                      f"{Path(entry.stderr).parent}\n{lines}")


def _ended_without_result(job: submitit.Job[Any]) -> bool:
    """A SLURM job that ended (failed, cancelled) without writing submitit's result file.

    submitit reads job states from sacct, which a cluster without slurmdbd lacks; ask
    scontrol instead, so that a cancelled dependent is not waited on for ever.
    """
    state = slurm_state(str(job.job_id))
    return state is not None and state.failed and not job.paths.result_pickle.exists()


def _stop_local(job: submitit.Job[Any], follower: _LogFollower) -> None:
    """Stop a local job's ranks at their next safe point (they save first); a second Ctrl-C kills them."""
    controller = int(job.job_id)  # the local executor's job id is its controller's pid
    print("\nsubmit: stopping: the ranks save at the end of their current step (Ctrl-C again to kill them "
          "at once)", file=sys.stderr, flush=True)
    try:
        while not job.done():
            # Again every few seconds: a rank still starting up ignores it until its handler is set.
            _signal(controller, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while not job.done() and time.monotonic() < deadline:
                follower.echo()
                time.sleep(0.2)
    except KeyboardInterrupt:
        print("submit: killing the ranks now; the work since their last checkpoint is lost", file=sys.stderr)
        for pid in _children(controller) + [controller]:
            _signal(pid, signal.SIGKILL)
        while not job.done():
            time.sleep(0.1)
    follower.echo()


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _run_here(job: Any, entry: Submitted, pdb: bool) -> None:
    """Run a ``--cluster debug`` job in this process; a failure opens the debugger only with ``pdb``."""
    if pdb:
        job.results()  # submitit's own: post-mortem debugging at the failure
        return
    from imret import stopping

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)}
    environ = dict(os.environ)
    os.environ.update(job.environ)  # what submitit sets for a debug job (its job id)
    try:
        job.submission().result()
    except SystemExit:  # the stage stopped on request (Ctrl-C), after saving
        raise Interrupted(f"{entry.stage} was stopped") from None
    except Exception as err:
        raise StageFailed(_debug_failure(entry, err)) from None
    finally:
        os.environ.clear()
        os.environ.update(environ)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        stopping.clear()


def _debug_failure(entry: Submitted, err: Exception) -> str:
    frames = traceback.extract_tb(err.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    log = Path(entry.stderr)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write("".join(traceback.format_exception(err)))
    first = str(err).splitlines()[0] if str(err) else ""
    return (f"stage '{entry.stage}' failed in this process (--cluster debug): {type(err).__name__}: {first}{where}. "
            f"The whole traceback is in {log}; add --pdb to stop in the debugger at the failure.")


class _LogFollower:
    """Prints new lines of a growing log file, skipping submitit's own bookkeeping lines."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def echo(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, errors="replace") as f:
            f.seek(self.offset)
            chunk = f.read()
            self.offset = f.tell()
        for line in chunk.splitlines():
            if line.startswith("submitit ") or not line.strip():
                continue
            print("    " + line, flush=True)
        sys.stdout.flush()

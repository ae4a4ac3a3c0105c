"""One live submission per run directory.

Two submissions of one experiment into one run directory train twice into it: two
TensorBoard curves, interleaved checkpoints, ``train.done`` written twice. So a
submission owns its run directories, in two ways:

* While ``launch/submit.py`` runs, it holds an ``flock`` on ``<run>/submit.lock``. The
  kernel drops the lock when the process ends, however it ends, so a crashed submit
  leaves nothing stuck; the file names the owner (pid, host, command) for the message
  that a second submission prints. (On a shared file system this needs working
  ``flock``: NFSv4 and Lustre mounted with ``flock`` have it.)
* Its jobs outlive it: on SLURM the chain stays queued after submit returns, and a
  local submit that crashed leaves its controller and ranks running. The jobs recorded
  in ``jobs/submissions.json`` are therefore asked about too: SLURM jobs through one
  squeue call, local ones through their controller's pid (on the host that started it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from imret.rundir import RunDir
from slurm.state import SchedulerUnreachable, live_jobs

LOCK_NAME = "submit.lock"


class RunBusy(ValueError):
    """Another submission owns the run directory; the message names it and what to do."""


@contextlib.contextmanager
def owned(run_dirs: list[Path], force: bool, status_hint: str) -> Iterator[None]:
    """Hold the run directories for the life of this block, once no earlier submission's jobs live in them.

    ``force`` submits alongside live jobs (with a warning); a submission that is running
    right now is never overridden.
    """
    roots = sorted({Path(d).resolve() for d in run_dirs})
    with contextlib.ExitStack() as stack:
        for root in roots:
            stack.enter_context(_locked(root))
        for root in roots:
            _check_live(root, force, status_hint)
        yield


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = path.read_text(errors="replace").strip() or "starting up"
            raise RunBusy(
                f"{root} is being submitted right now by another launch/submit.py ({owner}). Two submissions "
                f"would train twice into one run directory. Wait for that one to end, or stop it first (Ctrl-C in "
                f"its terminal, or `kill -INT <its pid>`: its ranks save a checkpoint), then submit again."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, (f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                      f"{' '.join(sys.argv)}\n").encode())
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays, so that no second lock file can appear beside it


def _entries(root: Path) -> list[dict[str, Any]]:
    path = root / "jobs" / "submissions.json"
    return json.loads(path.read_text()) if path.exists() else []


def _check_live(root: Path, force: bool, status_hint: str) -> None:
    # Jobs of a stage that is done are only finishing: the next submission skips that stage.
    entries = [e for e in _entries(root) if not RunDir(root).is_done(e["stage"].split("-")[0])]
    slurm_ids = list(dict.fromkeys(e["job_id"] for e in entries if e["mode"] == "slurm"))
    try:
        live = live_jobs(slurm_ids)
    except SchedulerUnreachable as err:
        if not force:
            raise RunBusy(f"cannot tell whether the SLURM jobs of an earlier submission into {root} still live: "
                          f"squeue: {err}. Check with `squeue -j {','.join(slurm_ids)}`; if none is, submit again "
                          f"with --force.") from None
        live = {}
    local = [e for e in entries if e["mode"] == "local" and controller_alive(e, root)]
    if not live and not local:
        return
    message = _busy_message(root, entries, live, local, status_hint)
    if not force:
        raise RunBusy(message + " Or pass --force to submit alongside them.")
    print(f"submit: --force: submitting alongside live jobs. {message}", file=sys.stderr)


def _busy_message(root: Path, entries: list[dict[str, Any]], live: dict[str, str], local: list[dict[str, Any]],
                  status_hint: str) -> str:
    stage = {e["job_id"]: e["stage"] for e in entries}
    parts = [f"{root} still has live jobs of an earlier submission, and a second one would train twice into it."]
    if live:
        ids = [job for job in stage if job in live]  # in the order they were submitted
        shown = ", ".join(f"{job} ({stage[job]}, {live[job]})" for job in ids)
        parts.append(f"On SLURM: {shown}. Follow them with `{status_hint}`, or cancel them with "
                     f"`scancel {' '.join(ids)}` (a training job saves a checkpoint as it ends) and submit again.")
    if local:
        pids = " ".join(e["job_id"] for e in local)
        parts.append(f"Local: the ranks of stage {', '.join(e['stage'] for e in local)} (controller pid {pids}) run "
                     f"on, though the launch/submit.py that started them has ended. Stop them with `kill -TERM {pids}` "
                     f"(they save a checkpoint at the next safe point) and submit again: training resumes from it.")
    return " ".join(parts)


def controller_alive(entry: dict[str, Any], root: Path) -> bool:
    """Whether a local job's controller (its job id is the controller's pid) still runs, for this run."""
    if entry.get("host", socket.gethostname()) != socket.gethostname():
        return False  # started on another machine: its processes cannot be seen from here
    pid = entry["job_id"]
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    if state in ("Z", "X") or "submitit.local._local" not in argv:
        return False  # gone, or the pid was recycled by another program
    folder = Path(argv[-2] if argv[-1] == "" else argv[-1])
    return folder.parent.resolve() == (root / "jobs").resolve()

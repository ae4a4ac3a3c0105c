"""What the SLURM scheduler says about jobs: one job's state (scontrol, then sacct), and which are still live."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

FAILED_STATES = ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
ENDED_STATES = FAILED_STATES + ("COMPLETED", "PREEMPTED", "REVOKED")


@dataclass
class JobState:
    state: str
    elapsed: str = ""
    reason: str = ""
    restarts: int | None = None  # times the job was requeued (scontrol only)
    exit_code: str = ""  # "code:signal", as SLURM shows it

    @property
    def failed(self) -> bool:
        return self.state.split()[0] in FAILED_STATES

    @property
    def live(self) -> bool:
        """Queued, running, or still ending (its processes may be running)."""
        return self.state.split()[0] not in ENDED_STATES

    def exit_summary(self) -> str:
        """'exit code 1', 'signal 9 (SIGKILL)' or both; empty for a clean 0:0."""
        code, _, sig = self.exit_code.partition(":")
        parts = [f"exit code {code}"] if code not in ("", "0") else []
        if sig not in ("", "0"):
            parts.append(f"signal {sig}{_signal_name(sig)}")
        return ", ".join(parts)


def _signal_name(number: str) -> str:
    import signal

    try:
        return f" ({signal.Signals(int(number)).name})"
    except ValueError:
        return ""


class SchedulerUnreachable(RuntimeError):
    """squeue did not answer."""


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str] | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _stdout(cmd: list[str]) -> str:
    out = _run(cmd)
    return out.stdout if out is not None and out.returncode == 0 else ""


def slurm_state(job_id: str) -> JobState | None:
    """The scheduler's view of a job, or None when it no longer knows the job."""
    shown = _stdout(["scontrol", "show", "job", "-o", job_id]).strip().splitlines()
    if shown:
        fields = dict(item.split("=", 1) for item in shown[0].split() if "=" in item)
        restarts = fields.get("Restarts", "")
        return JobState(fields.get("JobState", "?"), fields.get("RunTime", ""),
                        "" if fields.get("Reason") == "None" else fields.get("Reason", ""),
                        int(restarts) if restarts.isdigit() else None, fields.get("ExitCode", ""))
    acct = _stdout(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State,Elapsed,ExitCode"]).strip().splitlines()
    if acct:
        state, elapsed, code = (acct[0].split("|") + ["", ""])[:3]
        return JobState(state.split()[0], elapsed, exit_code=code)
    return None


def live_jobs(job_ids: list[str]) -> dict[str, str]:
    """The jobs among ``job_ids`` that are still live, with their state (one squeue call).

    A job that squeue no longer lists has ended (live jobs are always listed). Raises
    SchedulerUnreachable when squeue cannot answer, so that a caller never mistakes an
    unreachable scheduler for an empty queue.
    """
    if not job_ids:
        return {}
    out = _run(["squeue", "-h", "-r", "-j", ",".join(job_ids), "-o", "%i|%T"])
    if out is None or (out.returncode != 0 and "Invalid job id" not in out.stderr):
        why = "not on PATH, or no answer in 15 s" if out is None else (out.stderr.strip() or f"exit {out.returncode}")
        raise SchedulerUnreachable(why)
    rows = (line.split("|") for line in out.stdout.splitlines() if "|" in line)
    wanted = set(job_ids)
    return {job: state for job, state in rows if job in wanted and JobState(state).live}

"""What the SLURM scheduler says about a job (squeue while queued or running, then scontrol, then sacct)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

FAILED_STATES = ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


@dataclass
class JobState:
    state: str
    elapsed: str = ""
    reason: str = ""

    @property
    def failed(self) -> bool:
        return self.state.split()[0] in FAILED_STATES


def _run(cmd: list[str]) -> str:
    if shutil.which(cmd[0]) is None:
        return ""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout if out.returncode == 0 else ""


def slurm_state(job_id: str) -> JobState | None:
    """The scheduler's view of a job, or None when it no longer knows the job."""
    line = _run(["squeue", "-h", "-j", job_id, "-o", "%T|%M|%r"]).strip().splitlines()
    if line:
        state, elapsed, reason = (line[0].split("|") + ["", ""])[:3]
        return JobState(state, elapsed, "" if reason == "None" else reason)
    shown = _run(["scontrol", "show", "job", job_id])
    if shown:
        fields = dict(item.split("=", 1) for item in shown.split() if "=" in item)
        return JobState(fields.get("JobState", "?"), fields.get("RunTime", ""),
                        "" if fields.get("Reason") == "None" else fields.get("Reason", ""))
    acct = _run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State,Elapsed"]).strip().splitlines()
    if acct:
        state, elapsed = (acct[0].split("|") + [""])[:2]
        return JobState(state.split()[0], elapsed)
    return None

"""Why a job ended the way it did, in a few lines: the scheduler's verdict and the root-cause lines of its logs.

A failed multi-rank job leaves its cause in one place and noise everywhere else: when
rank 1 is killed, rank 0's log ends in a long gloo traceback ("Connection closed by
peer"), while the line that matters, srun's ``task 1: Killed``, sits in the middle of
the batch log. So instead of the tail of rank 0's log alone, a report shows:

* the scheduler's state with the exit code and signal (SLURM), and the requeue count;
* srun's and slurmstepd's own error lines (a killed task, a time limit, a cancel, an
  OOM kill) and imret's messages (a refused requeue, a stop on request);
* the exception each rank ended with, the earliest first (the first to fail is
  usually the cause: the others fail in a collective after it);
* then the tail of rank 0's error log.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slurm.state import JobState

_SCHEDULER_LINE = re.compile(r"(srun: error: .*task \d+: .*|slurmstepd(-\S+)?: error: .*|.*oom[-_]kill.*)")
_IMRET_LINE = re.compile(r"imret: (?!job \S+ rank \d+/)")  # imret's messages, not the start-up line of each rank
_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Requested)|Killed)\b.*")
_RANK_PREFIX = re.compile(r"^\[rank\d+\]:\s?")
_LOG = re.compile(r"_(\d+)_log\.(err|out)$")


@dataclass
class Report:
    """What went wrong with one job, as lines to print."""

    verdict: str = ""
    causes: list[str] = field(default_factory=list)
    tail: list[str] = field(default_factory=list)
    tail_task: int = 0
    requeues: int | None = None
    stopped: bool = False  # the ranks stopped on request after saving (not a failure)
    not_requeued: bool = False  # submitit refused a requeue (max_requeues)

    def lines(self, indent: str = "    ", tail: bool = True) -> list[str]:
        out = [f"{indent}{self.verdict}"] if self.verdict else []
        out += [f"{indent}cause: {line}" for line in self.causes]
        if tail and self.tail:
            out += [f"{indent}log tail (task {self.tail_task}):"] + [f"{indent}  {line}" for line in self.tail]
        return out


def task_logs(entry: dict[str, Any]) -> dict[int, dict[str, Path]]:
    """Task index -> {"err": path, "out": path} of every task of the job that wrote a log."""
    folder = Path(entry["stderr"]).parent
    found: dict[int, dict[str, Path]] = {}
    if not folder.is_dir():
        return found
    for path in folder.glob(f"{entry['job_id']}_*_log.*"):
        m = _LOG.search(path.name)
        if m and path.name == f"{entry['job_id']}_{m.group(1)}_log.{m.group(2)}":
            found.setdefault(int(m.group(1)), {})[m.group(2)] = path
    return found


def report(entry: dict[str, Any], state: JobState | None = None, tail_lines: int = 10) -> Report:
    """The report of one submitted job (a ``jobs/submissions.json`` entry), from its logs and ``state``."""
    logs = task_logs(entry)
    rep = Report()
    if state is not None:
        summary = state.exit_summary()
        rep.verdict = f"job {entry['job_id']}: {state.state}" + (f", {summary}" if summary else "")
        rep.requeues = state.restarts
    seen: set[str] = set()
    for task in sorted(logs):
        for kind in ("err", "out"):
            for line in _scan(logs[task].get(kind)):
                if line not in seen:
                    seen.add(line)
                    rep.causes.append(line)
    exceptions = _rank_exceptions(logs)
    rep.causes += [line for _, line in exceptions]
    rep.stopped = any("stopped on request" in c for c in rep.causes)
    rep.not_requeued = any("was not requeued" in c for c in rep.causes)
    if rep.requeues is None:
        rep.requeues = _text(logs.get(0, {}).get("out")).count("Requeued job")
    rep.tail_task = exceptions[0][0] if exceptions else 0  # the first to fail shows its own traceback
    rep.tail = _text(logs.get(rep.tail_task, {}).get("err")).splitlines()[-tail_lines:]
    return rep


def _text(path: Path | None) -> str:
    return path.read_text(errors="replace") if path is not None and path.exists() else ""


def _scan(path: Path | None) -> list[str]:
    out = []
    for raw in _text(path).splitlines():
        line = _RANK_PREFIX.sub("", raw).strip()
        if _SCHEDULER_LINE.fullmatch(line) or _IMRET_LINE.match(line):
            out.append(line)
    return out


def _rank_exceptions(logs: dict[int, dict[str, Path]]) -> list[tuple[int, str]]:
    """(task, its last exception line) of each task that ended in one, the first to fail (oldest log) first."""
    found = []
    for task, paths in logs.items():
        err = paths.get("err")
        last = _last_exception(_text(err))
        if err is not None and last:
            found.append((err.stat().st_mtime, task, last))
    found.sort()
    return [(task, f"task {task}: {line}" + (" (the first to fail)" if i == 0 and len(found) > 1 else ""))
            for i, (_, task, line) in enumerate(found)]


def _last_exception(text: str) -> str:
    """The exception line that ends the last traceback of a log ('' when there is none)."""
    lines = [_RANK_PREFIX.sub("", line) for line in text.splitlines()]
    start = max((i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")),
                default=None)
    if start is None:
        return ""
    for line in lines[start + 1:]:
        if _EXCEPTION.match(line):
            return line.strip()[:240]
    return ""

"""Helpers for the fault tests: a tiny experiments file, submit.py as a real subprocess, process checks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SLOW_LOSS = "tests.test_preemption:SlowContrastive"  # a quarter of a second per step


def tiny_experiments(tmp_path: Path, shards: Path, name: str = "tiny", **sections: dict[str, Any]) -> Path:
    """An experiments.yaml with one tiny experiment (train only unless ``stages`` says otherwise)."""
    entry: dict[str, Any] = {
        "description": "a tiny experiment for the fault tests",
        "stages": ["train"],
        "data": {"root": str(shards), "image_size": 32, "batch_size": 8, "samples_per_class": 2, "num_workers": 0},
        "model": {"backbone": "test_vit", "embed_dim": 16},
        "loss": {"terms": [{"name": SLOW_LOSS}]},
        "train": {"epochs": 4, "seed": 3, "log_every": 1, "checkpoint_every": 1000},
        "evaluate": {"query": "query", "database": "database", "metrics": ["map"]},
        "resources": {"tasks_per_node": 2, "local_ranks": 2, "time_min": 10},
        "run": {"root": str(tmp_path / "runs")},
    }
    for section, values in sections.items():
        entry[section] = {**entry.get(section, {}), **values} if isinstance(values, dict) else values
    path = tmp_path / "experiments.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({name: entry}))
    return path


def start_submit(experiments: Path, *argv: str, log_dir: Path) -> subprocess.Popen[str]:
    """``launch/submit.py`` in its own session (so a test can Ctrl-C it, and clean up all it started)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "launch" / "submit.py"), "--experiments", str(experiments), *argv]
    return subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=open(log_dir / "out", "w"),
                            stderr=open(log_dir / "err", "w"), text=True, start_new_session=True,
                            env=child_env(), preexec_fn=_interruptible)


def _interruptible() -> None:
    """Ctrl-C as in a terminal's foreground job: a shell that starts a job in the background (``cmd &``,
    as CI runners may) sets SIGINT to ignored, and an ignored signal stays ignored across exec."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def child_env() -> dict[str, str]:
    """A launcher's environment: unbuffered, and the repository on the path, so a loss named
    ``tests.module:Class`` imports in it as it does in pytest (``python launch/submit.py`` puts
    only ``launch/`` there, and the editable install exposes the packages, not ``tests``)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}


def text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def submissions(run: Path) -> list[dict[str, Any]]:
    path = run / "jobs" / "submissions.json"
    return json.loads(path.read_text()) if path.exists() else []


def alive(pid: int) -> bool:
    """Running and not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return False


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def kill_session(proc: subprocess.Popen[str]) -> None:
    """Whatever the test left running in the submit's session (the submit, its controller, the ranks)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)

"""The run directory: the contract between stages (see DESIGN.md).

Paths never depend on a SLURM job id, so a requeued or resubmitted job finds the
work of the one before it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Call ``write`` on a temporary file in the same directory, then rename it into place.

    A reader (or a job killed mid-write and requeued) never sees half a file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write leaves the old file and nothing beside it
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def atomic_write_npz(path: Path, **arrays: Any) -> None:
    """``np.savez`` of ``arrays`` (uncompressed)."""
    atomic_write(path, lambda f: np.savez(f, **arrays))


def atomic_write_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` of one array: a plain .npy, which a reader can memory-map."""
    atomic_write(path, lambda f: np.save(f, array))


class RunDir:
    """Named paths inside ``runs/<experiment>/``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def ckpt(self) -> Path:
        return self.root / "train" / "ckpt"

    def features(self, split: str) -> Path:
        return self.root / "features" / split

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def results(self) -> Path:
        return self.eval / "results.json"

    @property
    def cluster(self) -> Path:
        return self.root / "cluster"

    @property
    def tb(self) -> Path:
        return self.root / "tb"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    def marker(self, stage: str) -> Path:
        return self.root / f"{stage}.done"

    def is_done(self, stage: str) -> bool:
        return self.marker(stage).exists()

    def mark_done(self, stage: str, info: dict[str, Any]) -> None:
        atomic_write_json(self.marker(stage), {"stage": stage, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **info})

    def done_info(self, stage: str) -> dict[str, Any]:
        return json.loads(self.marker(stage).read_text())

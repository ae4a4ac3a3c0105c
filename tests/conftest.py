from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    """A shard directory with train (4 classes), query and database splits (3 other classes)."""
    from tests.helpers import tiny_images, write_tiny_split

    root = tmp_path / "shards"
    write_tiny_split(root, "train", tiny_images(4, 10, seed=1, prefix="t"), 8)
    test = tiny_images(8, 9, seed=2, prefix="e")
    test = [it for it in test if it[1] >= 4]
    write_tiny_split(root, "query", [it for it in test if int(it[0][-4:]) % 3 == 0], 8)
    write_tiny_split(root, "database", [it for it in test if int(it[0][-4:]) % 3 != 0], 8)
    return root


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """A real SLURM controller with 2 nodes x 8 fake GPUs: one that answers already, or the local one.

    The local cluster (slurm/local_cluster.sh) needs root and apt. Where it cannot start,
    the SLURM tests are skipped with the reason shown, except under CI, where they must run.
    """
    import shutil
    import subprocess

    from slurm.executors import slurm_available

    if slurm_available():
        yield "existing"
        return
    script = ROOT / "slurm" / "local_cluster.sh"
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        reason = "no SLURM controller answers, and starting the local one needs root and apt-get"
        if os.environ.get("CI"):
            pytest.fail(f"SLURM tests must run in CI: {reason}")
        pytest.skip(reason)
    up = subprocess.run([str(script), "up", "--nodes", "2", "--gpus-per-node", "8"], capture_output=True,
                        text=True, timeout=900)
    if up.returncode != 0:
        pytest.fail(f"slurm/local_cluster.sh up failed:\n{up.stdout}\n{up.stderr}")
    try:
        yield "local"
    finally:
        subprocess.run([str(script), "down"], capture_output=True, text=True, timeout=300)

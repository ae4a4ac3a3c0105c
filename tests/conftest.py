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

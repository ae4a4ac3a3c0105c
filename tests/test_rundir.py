"""imret.rundir: atomic writes (exact content, nothing left beside, the old file kept when a write dies)
and the run directory's named paths and stage markers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from imret.rundir import RunDir, atomic_write, atomic_write_bytes, atomic_write_json, atomic_write_npy, atomic_write_npz

ROOT = Path(__file__).resolve().parents[1]


def test_json_is_written_exactly_and_alone(tmp_path):
    target = tmp_path / "deep" / "er" / "result.json"  # parents are made
    atomic_write_json(target, {"b": 2, "a": [1.5, None], "path": tmp_path})
    assert target.read_text() == json.dumps({"a": [1.5, None], "b": 2, "path": str(tmp_path)}, indent=2,
                                            sort_keys=True) + "\n"
    assert os.listdir(target.parent) == ["result.json"]


def test_bytes_replace_the_old_content(tmp_path):
    target = tmp_path / "blob"
    atomic_write_bytes(target, b"first, and longer")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert os.listdir(tmp_path) == ["blob"]


def test_npz_round_trip(tmp_path):
    keys = np.array(["a", "bb", "ccc"])
    labels = np.array([3, 1, 2], np.int64)
    atomic_write_npz(tmp_path / "part.npz", keys=keys, labels=labels)
    with np.load(tmp_path / "part.npz") as z:
        assert sorted(z.files) == ["keys", "labels"]
        assert np.array_equal(z["keys"], keys) and np.array_equal(z["labels"], labels)
        assert z["labels"].dtype == np.int64
    assert os.listdir(tmp_path) == ["part.npz"]


def test_npy_round_trip_can_be_memory_mapped(tmp_path):
    array = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float16)
    atomic_write_npy(tmp_path / "emb.npy", array)
    mapped = np.load(tmp_path / "emb.npy", mmap_mode="r")
    assert isinstance(mapped, np.memmap) and mapped.dtype == np.float16
    assert np.array_equal(np.asarray(mapped), array)
    assert os.listdir(tmp_path) == ["emb.npy"]


def test_a_write_that_fails_leaves_the_old_file(tmp_path):
    target = tmp_path / "meta.json"
    atomic_write_json(target, {"step": 1})

    def half_then_fail(f) -> None:
        f.write(b'{"step": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert json.loads(target.read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]  # no temporary file left beside it


KILLED_WRITER = """
import sys, time
from pathlib import Path
from imret.rundir import atomic_write
def slow(f):
    f.write(b"x" * 4096)
    f.flush()
    Path(sys.argv[2]).touch()  # tell the test that the write has begun
    time.sleep(60)
atomic_write(Path(sys.argv[1]), slow)
"""


def test_a_process_killed_mid_write_leaves_the_old_file(tmp_path):
    target, started = tmp_path / "state.pt", tmp_path / "started"
    atomic_write_bytes(target, b"old checkpoint")
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target), str(started)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while not started.exists():
            assert writer.poll() is None, "the writer ended before it began writing"
            assert time.monotonic() < deadline, "the writer never began writing"
            time.sleep(0.02)
        temporary = [p for p in tmp_path.iterdir() if p.name.startswith(".state.pt.tmp-")]
        assert len(temporary) == 1 and temporary[0].stat().st_size == 4096  # the write went elsewhere
        assert target.read_bytes() == b"old checkpoint"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert target.read_bytes() == b"old checkpoint"


def test_the_named_paths_of_a_run(tmp_path):
    run = RunDir(str(tmp_path / "runs" / "exp"))  # a string root works too
    root = tmp_path / "runs" / "exp"
    assert run.root == root
    assert run.config == root / "config.yaml"
    assert run.ckpt == root / "train" / "ckpt"
    assert run.features("query") == root / "features" / "query"
    assert run.results == root / "eval" / "results.json" and run.eval == root / "eval"
    assert (run.cluster, run.tb, run.jobs) == (root / "cluster", root / "tb", root / "jobs")
    assert run.marker("extract") == root / "extract.done"
    for path in (run.config, run.ckpt, run.features("db"), run.results, run.cluster, run.tb, run.jobs,
                 run.marker("train")):
        assert path.resolve().is_relative_to(root.resolve()), path


def test_stage_markers(tmp_path):
    run = RunDir(tmp_path)
    assert not run.is_done("train")
    run.mark_done("train", {"seconds": 1.5, "summary": {"global_step": 40}})
    assert run.is_done("train") and not run.is_done("extract")
    info = run.done_info("train")
    assert info["stage"] == "train" and info["seconds"] == 1.5 and info["summary"] == {"global_step": 40}
    assert time.strptime(info["finished"], "%Y-%m-%d %H:%M:%S")
    assert sorted(os.listdir(tmp_path)) == ["train.done"]

"""Shared test helpers: tiny generated shard datasets and real multi-rank gloo runs."""

from __future__ import annotations

import io
import pickle
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp

from shards.writer import Sample, SplitSource, write_split


def wait_until(predicate: Callable[[], bool], seconds: float, poll: float = 0.3) -> bool:
    """Poll ``predicate`` until it holds or ``seconds`` pass; its last value."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return predicate()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, out_dir: str) -> None:
    from imret import distributed

    info = distributed.DistInfo(rank=rank, world_size=world, local_rank=rank, local_world_size=world,
                                master_addr="127.0.0.1", master_port=port, backend="gloo")
    try:
        distributed.init(info, timeout_s=60)
        result = fn(info, *args)
        Path(out_dir, f"{rank}.pkl").write_bytes(pickle.dumps(("ok", result)))
        if torch.distributed.is_initialized():  # (a test's function may have left the group itself)
            distributed.barrier(info)  # no rank tears its group down while another still talks to it
    except BaseException as err:  # report, then re-raise so spawn fails too
        Path(out_dir, f"{rank}.pkl").write_bytes(pickle.dumps(("error", traceback.format_exc())))
        raise err
    finally:
        distributed.shutdown()


def run_ranks(fn: Callable[..., Any], world: int, *args: Any) -> list[Any]:
    """Run ``fn(dist_info, *args)`` on ``world`` real gloo ranks; return each rank's result in rank order."""
    with tempfile.TemporaryDirectory() as out:
        try:
            mp.spawn(_rank_main, args=(world, free_port(), fn, args, out), nprocs=world, join=True)
        except Exception as err:
            errors = [pickle.loads(p.read_bytes())[1] for p in sorted(Path(out).glob("*.pkl"))
                      if pickle.loads(p.read_bytes())[0] == "error"]
            raise AssertionError(f"a rank failed ({type(err).__name__}: {err}):\n" + "\n".join(errors)) from None
        return [pickle.loads(Path(out, f"{r}.pkl").read_bytes())[1] for r in range(world)]


def encode_png(item: tuple[str, int, np.ndarray]) -> Sample:
    from PIL import Image

    key, label, pixels = item
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return Sample(key=key, label=label, image=buf.getvalue(), ext="png", meta={"n": key})


def tiny_images(num_classes: int, per_class: int, size: int = 16, seed: int = 0, prefix: str = "s") -> list[tuple]:
    """Images whose class shows in their pixels (a bright band at a class-specific row), plus noise."""
    rng = np.random.default_rng(seed)
    items = []
    for c in range(num_classes):
        for i in range(per_class):
            img = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
            row = (c * size) // max(num_classes, 1)
            img[row:row + 2, :, :] = 200 + rng.integers(0, 40, dtype=np.uint8)
            items.append((f"{prefix}{c:03d}_{i:04d}", c, img))
    return items


def write_tiny_split(root: Path, split: str, items: list[tuple], num_classes: int,
                     shard_bytes: int = 1 << 30) -> dict[str, Any]:
    source = SplitSource(split, [str(c) for c in range(num_classes)], items, encode_png, {"source": "test"})
    return write_split(source, root, dataset="tiny", converter_version=1, shard_bytes=shard_bytes, progress=False)


def gather_table(runs_root: Path, pattern: str, capsys: Any) -> dict[str, dict[str, str]]:
    """``tools/gather.py --exp PATTERN`` as {run: {column: cell}}, read from what it prints."""
    from tools.gather import main as gather

    capsys.readouterr()
    assert gather(["--exp", pattern, "--runs-root", str(runs_root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    return {cells[0]: dict(zip(header, cells)) for cells in (line.split() for line in lines[1:])}


def check_gathered(runs_root: Path, table: dict[str, dict[str, str]], keys: tuple[str, ...]) -> None:
    """Every gathered cell equals the run's own results.json (to the 4 printed decimals)."""
    import json

    import pytest

    for name, row in table.items():
        results = json.loads((runs_root / name / "eval" / "results.json").read_text())
        for key in keys:
            assert float(row[key]) == pytest.approx(results[key], abs=6e-5), (name, key)

"""tools/evaluate.py --out never overwrites an input file, whatever path or link names it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tools.evaluate import main


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "q.npz", embeddings=rng.normal(size=(6, 4)), labels=np.arange(6) % 2)
    np.savez(tmp_path / "db.npz", embeddings=rng.normal(size=(9, 4)), labels=np.arange(9) % 2)
    return tmp_path / "q.npz", tmp_path / "db.npz"


def out_paths(tmp_path: Path, q: Path, db: Path) -> dict[str, tuple[Path, Path]]:
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.json").symlink_to(db)
    os.link(q, tmp_path / "hard.npz")
    return {"same": (q, q), "dotted": (tmp_path / "sub" / ".." / "q.npz", q), "symlink": (tmp_path / "link.json", db),
            "hardlink": (tmp_path / "hard.npz", q)}


@pytest.mark.parametrize("case", ["same", "dotted", "symlink", "hardlink"])
def test_out_equal_to_an_input_is_refused(inputs, tmp_path, capsys, case):
    q, db = inputs
    out, victim = out_paths(tmp_path, q, db)[case]
    before = victim.read_bytes()
    code = main(["--query", str(q), "--db", str(db), "--out", str(out)])
    _, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err
    assert f"--out {out} is the input file" in err and "overwrite" in err
    assert victim.read_bytes() == before
    assert np.load(victim)["embeddings"].shape[1] == 4  # still the embeddings


def test_out_beside_the_inputs_is_written(inputs, tmp_path):
    q, db = inputs
    assert main(["--query", str(q), "--db", str(db), "--out", str(tmp_path / "results.json")]) == 0
    assert (tmp_path / "results.json").read_text().startswith("{")

"""python -m tools.cluster: any cluster method on any pair of npz files, and its refusals of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tools.cluster import main

# A short, fast recipe for tiny data: PSS's 1000 epochs at lr 0.01 would take minutes here.
TINY = ["--set", "cluster.hilander.epochs=60", "--set", "cluster.hilander.lr=0.1", "--set",
        "cluster.hilander.hidden=32", "--set", "cluster.hilander.device=cpu"]


def planted(rng: np.random.Generator, sizes: list[int], first_label: int,
            dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Classes of the given sizes, each a centre plus spread in its own 3-d subspace (cosines stay positive)."""
    shared = np.ones(dim) / np.sqrt(dim)
    xs = []
    for size in sizes:
        centre = 0.8 * shared + rng.normal(size=dim) / np.sqrt(dim)
        basis = np.linalg.qr(rng.normal(size=(dim, 3)))[0]
        xs.append(centre / np.linalg.norm(centre) + (rng.normal(size=(size, 3)) * 0.25) @ basis.T
                  + 0.15 * rng.normal(size=(size, dim)) / np.sqrt(dim))
    return np.concatenate(xs).astype(np.float32), first_label + np.repeat(np.arange(len(sizes)), sizes)


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    """L.npz (8 classes) and U.npz (6 other classes: the open world), long-tailed."""
    rng = np.random.default_rng(0)
    lx, ly = planted(rng, [40, 30, 25, 20, 15, 12, 10, 8], 0)
    ux, uy = planted(rng, [35, 25, 18, 12, 9, 6], 100)
    np.savez(tmp_path / "L.npz", embeddings=lx, labels=ly)
    np.savez(tmp_path / "U.npz", embeddings=ux, labels=uy)
    return tmp_path / "L.npz", tmp_path / "U.npz"


def test_hilander_trains_on_labelled_and_pseudo_labels_unlabelled(files, tmp_path, capsys):
    out = tmp_path / "res" / "r.json"
    code = main(["--method", "hilander", "--labelled", str(files[0]), "--unlabelled", str(files[1]),
                 "--out", str(out), *TINY])
    assert code == 0, capsys.readouterr().err
    summary = json.loads(out.read_text())
    with np.load(out.with_suffix(".npz")) as z:
        labels, selected, density = z["labels"], z["selected"], z["density"]
    truth = np.load(files[1])["labels"]
    assert summary["method"] == "hilander" and summary["settings"]["hilander"]["epochs"] == 60
    assert len(labels) == len(selected) == len(density) == len(truth)
    assert summary["counts"]["selected"] == int(selected.sum()) > 0
    assert summary["selected_fraction"] == pytest.approx(selected.mean())
    assert summary["counts"]["clusters"] == len(np.unique(labels))
    assert np.array_equal(selected, density > 0.8)  # PSS's selectbydensity with thresh 0.8
    # The trained model finds pure clusters among classes it never saw.
    assert summary["metrics"]["selected"]["pairwise_precision"] > 0.9
    assert set(summary["metrics"]["all"]) >= {"pairwise_f", "bcubed_f", "nmi"}
    work = out.parent / "r.hilander"
    state = torch.load(work / "model.pt", weights_only=True)
    assert state["src_mlp.weight"].shape == (16, 32)  # hidden 32: src_mlp maps 32 -> 16
    epochs = [json.loads(line) for line in (work / "train.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == list(range(1, 61)) and epochs[-1]["loss"] < epochs[0]["loss"]


def test_density_needs_no_labelled_file_and_scores_only_with_labels(files, tmp_path):
    x = np.load(files[1])["embeddings"]
    np.savez(tmp_path / "bare.npz", embeddings=x)
    out = tmp_path / "d.json"
    assert main(["--method", "density", "--unlabelled", str(tmp_path / "bare.npz"), "--out", str(out),
                 "--set", "cluster.tau=0.5", "--labels-out", str(tmp_path / "d_labels.npz")]) == 0
    summary = json.loads(out.read_text())
    assert summary["settings"]["tau"] == 0.5 and "metrics" not in summary and summary["labelled"] is None
    assert len(np.load(tmp_path / "d_labels.npz")["labels"]) == len(x)


def _bad_inputs(tmp: Path, files: tuple[Path, Path]) -> dict[str, tuple[list[str], str]]:
    lab, unl = str(files[0]), str(files[1])
    x = np.load(files[1])["embeddings"]
    np.savez(tmp / "nokey.npz", features=x)
    np.savez(tmp / "short.npz", embeddings=x, labels=np.zeros(3, np.int64))
    np.savez(tmp / "narrow.npz", embeddings=x[:, :8], labels=np.arange(len(x)))
    np.savez(tmp / "one_class.npz", embeddings=x, labels=np.zeros(len(x), np.int64))
    (tmp / "junk.npz").write_text("not a zip")
    learn = ["--method", "hilander", "--unlabelled", unl]
    return {
        "missing file": (["--unlabelled", str(tmp / "nope.npz")], "does not exist"),
        "corrupt file": (["--unlabelled", str(tmp / "junk.npz")], "not a readable .npz"),
        "missing key": (["--unlabelled", str(tmp / "nokey.npz")], "'embeddings'"),
        "labels of the wrong length": (["--unlabelled", str(tmp / "short.npz")], "one per embedding row"),
        "dimensions differ": ([*learn, "--labelled", str(tmp / "narrow.npz")], "same model"),
        "one class": ([*learn, "--labelled", str(tmp / "one_class.npz")], "at least 2 classes"),
        "no labelled file": (learn, "--labelled"),
        "unknown method": (["--method", "hilandr", "--unlabelled", unl], "known methods are density, hilander"),
        "unknown key": ([*learn, "--labelled", lab, "--set", "cluster.hilander.epoch=3"], "did you mean 'epochs'"),
        "not a cluster key": (["--unlabelled", unl, "--set", "optim.lr=1"], "only cluster settings"),
        "tau not a probability": ([*learn, "--labelled", lab, "--set", "cluster.tau=-0.5"], "probability"),
        "no --out": (["--unlabelled", unl], "--out"),
    }


@pytest.mark.parametrize("case", ["missing file", "corrupt file", "missing key", "labels of the wrong length",
                                  "dimensions differ", "one class", "no labelled file", "unknown method",
                                  "unknown key", "not a cluster key", "tau not a probability", "no --out"])
def test_bad_input_is_one_paragraph_and_status_2(case, files, tmp_path, capsys):
    argv, expected = _bad_inputs(tmp_path, files)[case]
    out = tmp_path / "r.json"
    code = main(argv + (["--out", str(out)] if case != "no --out" else []) + TINY)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("cluster: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert expected in err
    assert not out.exists() and not (tmp_path / "r.hilander").exists()

"""tools/evaluate.py on query/database and self-search .npz files, and its refusals of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from tools.evaluate import main


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def sets(tmp_path: Path) -> dict:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 12))
    ql, dl = rng.integers(0, 5, 30), rng.integers(0, 5, 200)
    q = centers[ql] + rng.normal(size=(30, 12)) * 1.5
    db = centers[dl] + rng.normal(size=(200, 12)) * 1.5
    np.savez(tmp_path / "q.npz", embeddings=q * 3.0, labels=ql)  # not normalised: the tool normalises
    np.savez(tmp_path / "db.npz", embeddings=db.astype(np.float32), labels=dl)
    return {"dir": tmp_path, "q": unit(q), "ql": ql, "db": unit(db), "dl": dl}


def test_query_and_database_files(sets, capsys):
    out = sets["dir"] / "r.json"
    code = main(["--query", str(sets["dir"] / "q.npz"), "--db", str(sets["dir"] / "db.npz"), "--metrics", "map",
                 "map@10", "map@R", "r_precision", "precision@1", "roc_auc", "--k", "1", "5", "--out", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    assert list(results) == ["map", "map@10", "map@R", "r_precision", "precision@1", "recall@1", "recall@5",
                             "roc_auc", "meta"]
    q, ql, db, dl = sets["q"], sets["ql"], sets["db"], sets["dl"]
    expected = np.mean([average_precision_score(dl == ql[i], db @ q[i]) for i in range(len(q))])
    assert results["map"] == pytest.approx(expected, abs=1e-6)
    sims = q @ db.T
    assert results["roc_auc"] == pytest.approx(roc_auc_score((ql[:, None] == dl[None]).ravel(), sims.ravel()), abs=1e-6)
    top1 = np.argmax(sims, axis=1)
    assert results["recall@1"] == pytest.approx(np.mean(dl[top1] == ql)) == results["precision@1"]
    assert results["meta"]["num_queries"] == 30 and results["meta"]["roc_pairs_sampled"] is False
    shown = capsys.readouterr().out
    assert "map@10" in shown and "recall@5" in shown


def test_self_search_excludes_each_query_and_accepts_string_labels(sets):
    names = np.array(["cat", "dog", "emu", "fox", "gnu"])[sets["dl"]]
    np.savez(sets["dir"] / "self.npz", embeddings=sets["db"], labels=names)
    out = sets["dir"] / "self.json"
    assert main(["--query", str(sets["dir"] / "self.npz"), "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert list(results) == ["map", "map@R", "r_precision", "precision@1", "recall@1", "recall@2", "recall@4",
                             "recall@8", "meta"]
    db, dl = sets["db"], sets["dl"]
    aps = []
    for i in range(len(db)):
        others = np.arange(len(db)) != i
        aps.append(average_precision_score(dl[others] == dl[i], db[others] @ db[i]))
    assert results["map"] == pytest.approx(np.mean(aps), abs=1e-6)
    assert results["meta"]["num_database"] == 199 and results["meta"]["database_file"] is None
    # the query itself (score 1) would always be its own top-1: excluded, recall@1 is below 1
    assert results["recall@1"] < 1.0


def bad(tmp: Path, name: str, **arrays: np.ndarray) -> str:
    np.savez(tmp / name, **arrays)
    return str(tmp / name)


@pytest.mark.parametrize("case, message", [
    ("dims", "dimension 12 but database embeddings 7"),
    ("labels", "30 embeddings but labels of shape (29,)"),
    ("nan", "1 embeddings contain NaN"),
    ("empty", "is empty"),
    ("keys", "has no labels array (it holds: embeddings)"),
    ("zeros", "all zeros"),
    ("not npz", "not a readable .npz"),
    ("missing", "does not exist"),
    ("metric", "unknown metric 'mAP'"),
])
def test_bad_inputs_exit_2_with_a_clear_message(sets, capsys, case, message):
    d = sets["dir"]
    q = str(d / "q.npz")
    rng = np.random.default_rng(1)
    args = {
        "dims": ["--query", q, "--db", bad(d, "d7.npz", embeddings=rng.normal(size=(9, 7)), labels=np.arange(9))],
        "labels": ["--query", bad(d, "l.npz", embeddings=rng.normal(size=(30, 12)), labels=np.arange(29))],
        "nan": ["--query", bad(d, "n.npz", embeddings=np.r_[np.full((1, 12), np.nan), rng.normal(size=(29, 12))],
                               labels=np.arange(30))],
        "empty": ["--query", bad(d, "e.npz", embeddings=np.zeros((0, 12)), labels=np.zeros(0))],
        "keys": ["--query", bad(d, "k.npz", embeddings=rng.normal(size=(5, 12)))],
        "zeros": ["--query", bad(d, "z.npz", embeddings=np.r_[np.zeros((1, 12)), rng.normal(size=(4, 12))],
                                 labels=np.arange(5))],
        "not npz": ["--query", str(d / "garbage.npz")],
        "missing": ["--query", str(d / "nowhere.npz")],
        "metric": ["--query", q, "--metrics", "mAP"],
    }[case]
    (d / "garbage.npz").write_text("not a zip file")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("evaluate: error:") and message in err, err

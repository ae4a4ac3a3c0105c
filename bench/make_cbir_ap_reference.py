"""Reference values of the CBIR seed's (tanakafer/tfr) AP@r: tests/data/cbir_ap_reference.npz, which
tests/test_seed_metrics.py checks ``ap_hits@K`` against.

How it was run (2 CPU cores, no GPU; numpy only, so the project's own virtualenv serves):

    .venv/bin/python bench/make_cbir_ap_reference.py --seed-git /path/to/tfr/.git

``--seed-git`` is the git directory of a clone of github.com/tanakafer/tfr holding commit
548e014bcecc5eb567ad3fbbdbbe91a8058a14e0. This script holds none of the seed's code: it
reads ``utils/metrics.py`` at that commit out of the clone into a temporary file and
imports its ``APatk`` from there.

What it computes: the seed's evaluation.py ranks its database (the train catalogue's
embeddings) by the Euclidean distance to each query embedding, ``argsort``s the distances,
keeps the labels of the first r (``-r``, default 10) as 1 (same pid) or 0, and scores them
with ``APatk``: the sum of the precisions at the hits over the number of hits among those r
(0 when there is none); mAP is the mean over the queries. This script builds seeded
L2-normalised embeddings, does the same ranking with numpy (no equal distances occur in
these cases) and calls the seed's ``APatk`` on each query's top r.

Cases: r10 (5 classes, 60 database items, 20 queries, r = 10); r5 (the same data, r = 5);
few (a class with only 2 database items, so hits < r for its queries, and queries far
from their class, some with no hit in their top r).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

COMMIT = "548e014bcecc5eb567ad3fbbdbbe91a8058a14e0"
OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "cbir_ap_reference.npz"


def seed_apatk(git_dir: str, commit: str):
    text = subprocess.run(["git", f"--git-dir={git_dir}", "show", f"{commit}:utils/metrics.py"],
                          check=True, capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(prefix="tfr_metrics_"), "seed_metrics.py")
    with open(path, "w") as f:
        f.write(text)
    spec = importlib.util.spec_from_file_location("seed_metrics", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.APatk


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(rng: np.random.Generator, sizes: list[int], queries: int, spread: float,
              dim: int = 8) -> tuple[np.ndarray, ...]:
    centers = rng.standard_normal((len(sizes), dim))
    db_cls = np.repeat(np.arange(len(sizes)), sizes)
    db = unit(centers[db_cls] + spread * rng.standard_normal((len(db_cls), dim)))
    perm = rng.permutation(len(db))
    q_cls = rng.integers(0, len(sizes), queries)
    q = unit(centers[q_cls] + spread * rng.standard_normal((queries, dim)))
    return db[perm], db_cls[perm], q, q_cls


def seed_scores(apatk, db: np.ndarray, db_cls: np.ndarray, q: np.ndarray, q_cls: np.ndarray, r: int) -> np.ndarray:
    out = []
    for emb, pid in zip(q, q_cls):
        distance = np.linalg.norm(db - emb, axis=1)
        top = np.argsort(distance)[:r]
        ap, _ = apatk((db_cls[top] == pid).astype(int))
        out.append(ap)
    return np.asarray(out, np.float64)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed-git", required=True, help="git directory of a clone of tanakafer/tfr")
    parser.add_argument("--commit", default=COMMIT)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    apatk = seed_apatk(args.seed_git, args.commit)
    rng = np.random.default_rng(11)
    base = clustered(rng, [12, 12, 12, 12, 12], 20, 0.9)
    cases = {"r10": (base, 10), "r5": (base, 5), "few": (clustered(rng, [20, 2, 15, 15], 24, 3.0), 10)}
    data: dict[str, np.ndarray] = {}
    for name, ((db, db_cls, q, q_cls), r) in cases.items():
        ap = seed_scores(apatk, db, db_cls, q, q_cls, r)
        data.update({f"{name}__database": db, f"{name}__database_class": db_cls.astype(np.int64), f"{name}__query": q,
                     f"{name}__query_class": q_cls.astype(np.int64), f"{name}__r": np.int64(r),
                     f"{name}__seed_ap_per_query": ap, f"{name}__seed_map": np.float64(ap.mean())})
        print(f"{name:4s} r={r:2d}: seed mAP {ap.mean():.10f}  queries without a hit in the top r: {(ap == 0).sum()}")
    data["cases"] = np.array(list(cases))
    data["versions"] = np.array([f"numpy {np.__version__}", f"seed tanakafer/tfr@{args.commit} utils/metrics.py"])
    np.savez_compressed(args.out, **data)
    print("wrote", args.out)


if __name__ == "__main__":
    main()

"""Reference values of the CIFAR seed's (chungdz/Image_retrieve) "mAP" of ``process_data/mips_cifar.py``:
tests/data/mips_cifar_reference.npz, which tests/test_seed_metrics.py checks ``mips_map@K`` against.

How it was run (2 CPU cores, no GPU, Python 3.11.7):

    python3 -m venv /tmp/seedenv
    /tmp/seedenv/bin/pip install torch==2.13.0+cpu "numpy<2" pandas tqdm
        # installed: torch 2.13.0+cpu, numpy 1.26.4, pandas 3.0.6, tqdm 4.70.1
    /tmp/seedenv/bin/python bench/make_mips_cifar_reference.py --seed-git /path/to/Image_retrieve/.git

``--seed-git`` is the git directory of a clone of github.com/chungdz/Image_retrieve holding
commit c02292180b0cee4448836a6f11ad4ff712dcd2ea (branch ``swin``, whose README is the seed
text). This script holds none of the seed's code: it reads ``process_data/mips_cifar.py``
and the modules it imports (``datasets/dl.py``) at that commit out of the clone into a
temporary directory and runs the script UNCHANGED as __main__ (runpy), in a subprocess of
``--seed-python`` (default: this interpreter). The one shim: the script moves tensors to
CUDA device 0 (``.to(0)``); without a GPU, ``torch.Tensor.to(0)`` is redirected to the
CPU before it runs. The per-query values are read back from the ``mAP.json`` it writes.
The first version of this script (with the clone's path fixed in the code) made the
committed file; this one writes the same values (re-run and compared).

What the seed computes (mips_cifar.py lines 34-64): scores = query @ database^T, the top k
(default 500) by torch.topk, a 0/1 hit vector against the query class's database items, and
per query AP = sum over hit positions j of (hits in the first j) / j, divided by the
literal 500 whatever --k is; mAP = the mean over all queries (no hit: 0).

Cases: R500 (3 classes x 500 database items, as CIFAR-100's train set has, k = 500); R100
(one class with 100 items: the seed still divides by 500); k50 (the R500 data with --k 50:
the seed still divides by 500); ties (exact duplicate database vectors of different
classes: torch.topk's order of equal scores decides the seed's value).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

COMMIT = "c02292180b0cee4448836a6f11ad4ff712dcd2ea"
OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "mips_cifar_reference.npz"
SEED_FILES = ("process_data/mips_cifar.py", "process_data/__init__.py", "datasets/__init__.py", "datasets/dl.py")

DRIVER = r"""
import runpy, sys, torch
_to = torch.Tensor.to
def _cpu_to(self, *args, **kwargs):
    if args and isinstance(args[0], int):
        args = ("cpu",) + args[1:]
    return _to(self, *args, **kwargs)
torch.Tensor.to = _cpu_to
sys.argv = ["mips_cifar.py"] + sys.argv[1:]
runpy.run_path("process_data/mips_cifar.py", run_name="__main__")
"""


def seed_tree(git_dir: str, commit: str) -> str:
    root = tempfile.mkdtemp(prefix="mips_seed_")
    for path in SEED_FILES:
        os.makedirs(os.path.join(root, os.path.dirname(path)), exist_ok=True)
        text = subprocess.run(["git", f"--git-dir={git_dir}", "show", f"{commit}:{path}"],
                              check=True, capture_output=True, text=True).stdout
        with open(os.path.join(root, path), "w") as f:
            f.write(text)
    return root


def make_data(rng: np.random.Generator, sizes: list[int], n_query_per_class: int, dim: int = 16,
              spread: float = 1.6) -> tuple[np.ndarray, ...]:
    centers = rng.standard_normal((len(sizes), dim))
    db, db_cls = [], []
    for c, n in enumerate(sizes):
        db.append(centers[c] + spread * rng.standard_normal((n, dim)))
        db_cls += [c] * n
    db = np.concatenate(db).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)  # the seed's GeM.gem() L2-normalises
    perm = rng.permutation(len(db))  # database rows in a mixed class order, as CIFAR's train set
    db, db_cls = db[perm], np.asarray(db_cls)[perm]
    q, q_cls = [], []
    for c in range(len(sizes)):
        q.append(centers[c] + spread * rng.standard_normal((n_query_per_class, dim)))
        q_cls += [c] * n_query_per_class
    q = np.concatenate(q).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return db, db_cls, q, np.asarray(q_cls)


def run_case(root: str, python: str, db: np.ndarray, db_cls: np.ndarray, q: np.ndarray, q_cls: np.ndarray,
             k: int) -> np.ndarray:
    dpath = tempfile.mkdtemp(prefix="mips_data_")
    np.save(os.path.join(dpath, "database.npy"), db)
    np.save(os.path.join(dpath, "tdatabase.npy"), q)
    with open(os.path.join(dpath, "test_info.csv"), "w") as f:
        f.write("Index,Class\n")
        for i, c in enumerate(q_cls):
            f.write(f"{i},{int(c)}\n")
    model_num = {str(int(c)): [int(i) for i in np.flatnonzero(db_cls == c)] for c in np.unique(db_cls)}
    with open(os.path.join(dpath, "model_num.json"), "w") as f:
        json.dump(model_num, f)
    subprocess.run([python, "-c", DRIVER, f"--dpath={dpath}", f"--k={k}"], cwd=root, check=True,
                   capture_output=True, text=True)
    with open(os.path.join(dpath, "mAP.json")) as f:
        return np.asarray(json.load(f), dtype=np.float64)


def ties_case(rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    base = rng.standard_normal((40, 8)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    db = np.concatenate([base] * 15)  # 600 rows, every vector 15 times
    db_cls = np.concatenate([np.arange(40) % 2] * 15)
    db_cls[::7] = 1 - db_cls[::7]  # some duplicates carry the other class: ties across classes
    return db, db_cls, base[:10] + 0.0, np.arange(10) % 2


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed-git", required=True, help="git directory of a clone of chungdz/Image_retrieve")
    parser.add_argument("--commit", default=COMMIT)
    parser.add_argument("--seed-python", default=sys.executable, help="interpreter with torch, pandas and tqdm")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    root = seed_tree(args.seed_git, args.commit)
    rng = np.random.default_rng(7)
    r500 = make_data(rng, [500, 500, 500], 10)
    r100 = make_data(rng, [500, 100, 500], 10)
    cases = {"R500": (r500, 500), "R100": (r100, 500), "k50": (r500, 50), "ties": (ties_case(rng), 500)}
    data = {}
    for name, ((db, db_cls, q, q_cls), k) in cases.items():
        ap = run_case(root, args.seed_python, db, db_cls, q, q_cls, k)
        data[f"{name}__database"], data[f"{name}__database_class"] = db, db_cls.astype(np.int64)
        data[f"{name}__query"], data[f"{name}__query_class"] = q, q_cls.astype(np.int64)
        data[f"{name}__k"] = np.int64(k)
        data[f"{name}__seed_ap_per_query"], data[f"{name}__seed_map"] = ap, np.float64(ap.mean())
        print(f"{name:5s} k={k:3d}: seed mAP {ap.mean():.10f}  (per-query min {ap.min():.4f} max {ap.max():.4f})")
    data["cases"] = np.array(list(cases))
    version = subprocess.run([args.seed_python, "-c", "import torch; print(torch.__version__)"],
                             check=True, capture_output=True, text=True).stdout.strip()
    data["versions"] = np.array([f"torch {version} (CPU)", f"numpy {np.__version__}",
                                 f"seed chungdz/Image_retrieve@{args.commit} process_data/mips_cifar.py"])
    np.savez_compressed(args.out, **data)
    print("wrote", args.out)


if __name__ == "__main__":
    main()

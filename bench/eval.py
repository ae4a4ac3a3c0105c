"""Evaluation speed on CIFAR-100-sized data: imret vs the floor, pytorch-metric-learning and numpy.

Synthetic L2-normalised embeddings (class centres plus noise; 10,000 queries x 50,000
database items x 128-d, 100 classes by default) are scored four ways in one process:

(a) the floor: the bare query x database score matrix, one BLAS product (torch.mm);
(b) imret's full evaluation (``imret.evaluate.evaluate``): map (full ranking), map@R,
    r_precision, precision@1, recall@1,2,4,8; and the map@R family alone;
(c) pytorch-metric-learning's ``AccuracyCalculator`` (k="max_bin_count") for the
    metrics it has (mean_average_precision_at_r, r_precision, precision_at_1);
(d) a plain numpy baseline: the full score matrix, an argsort per row, metrics from
    the sorted labels.

Every method's values are checked against imret's. A scaling row repeats (a) and (b)
with the database x 4. Each timing is the median of ``--rounds`` rounds.

    python bench/eval.py [--queries 10000] [--database 50000] [--rounds 3] [--skip-numpy]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import numpy as np
import torch

FULL = ["map", "map@R", "r_precision", "precision@1", "recall@1", "recall@2", "recall@4", "recall@8"]
R_FAMILY = ["map@R", "r_precision", "precision@1"]
PML_NAMES = {"mean_average_precision_at_r": "map@R", "r_precision": "r_precision", "precision_at_1": "precision@1"}


def synthetic(num: int, classes: int, dim: int, seed: int, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(num) % classes
    rng.shuffle(labels)
    x = centres[labels] + 2.5 * rng.standard_normal((num, dim)).astype(np.float32) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels.astype(np.int64)


def floor(q: np.ndarray, db: np.ndarray) -> None:
    torch.mm(torch.from_numpy(q), torch.from_numpy(db).T)


def imret_eval(q: np.ndarray, ql: np.ndarray, db: np.ndarray, dl: np.ndarray, names: list[str]) -> dict[str, float]:
    from imret.evaluate import evaluate

    return evaluate(q, ql, db, dl, names, neighbours=8 if "map" in names else 0).metrics


def pml_eval(q: np.ndarray, ql: np.ndarray, db: np.ndarray, dl: np.ndarray) -> dict[str, float]:
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calc = AccuracyCalculator(include=tuple(PML_NAMES), k="max_bin_count")
    out = calc.get_accuracy(torch.from_numpy(q), torch.from_numpy(ql), torch.from_numpy(db), torch.from_numpy(dl),
                            ref_includes_query=False)
    return {PML_NAMES[k]: float(v) for k, v in out.items()}


def numpy_eval(q: np.ndarray, ql: np.ndarray, db: np.ndarray, dl: np.ndarray) -> dict[str, float]:
    """The textbook way: full scores, argsort every row, metrics from the sorted labels."""
    scores = q @ db.T
    order = np.argsort(-scores, axis=1, kind="stable")
    hit = dl[order] == ql[:, None]
    num_pos = hit.sum(1)
    cum = np.cumsum(hit, axis=1)
    ranks = np.arange(1, db.shape[0] + 1)
    prec = cum / ranks
    out = {"map": float(np.mean((prec * hit).sum(1) / num_pos))}
    r = num_pos[:, None]
    within = ranks[None, :] <= r
    out["map@R"] = float(np.mean((prec * hit * within).sum(1) / num_pos))
    out["r_precision"] = float(np.mean((hit * within).sum(1) / num_pos))
    out["precision@1"] = float(np.mean(hit[:, 0]))
    for k in (1, 2, 4, 8):
        out[f"recall@{k}"] = float(np.mean(hit[:, :k].any(1)))
    return out


def timed(fn, rounds: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(rounds):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def agree(name: str, ours: dict[str, float], theirs: dict[str, float], tol: float = 1e-4) -> str:
    worst = max(abs(ours[k] - v) for k, v in theirs.items())
    status = "identical" if worst <= tol else "DIFFERENT"
    print(f"  {name}: {status} (largest difference {worst:.2e} over {', '.join(theirs)})")
    return status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--database", type=int, default=50_000)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip-numpy", action="store_true", help="leave out the (slow) numpy baseline")
    p.add_argument("--skip-scaling", action="store_true", help="leave out the database x 4 row")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((args.classes, args.dim)).astype(np.float32) / np.sqrt(args.dim)
    q, ql = synthetic(args.queries, args.classes, args.dim, 1, centres)
    db, dl = synthetic(args.database, args.classes, args.dim, 2, centres)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{args.queries} queries x {args.database} database x {args.dim}-d, {args.classes} classes, "
          f"median of {args.rounds} rounds")

    t_floor, _ = timed(lambda: floor(q, db), args.rounds)
    t_full, ours = timed(lambda: imret_eval(q, ql, db, dl, FULL), args.rounds)
    t_r, ours_r = timed(lambda: imret_eval(q, ql, db, dl, R_FAMILY), args.rounds)
    t_pml, pml = timed(lambda: pml_eval(q, ql, db, dl), args.rounds)
    rows = [("(a) floor: score matrix (torch.mm)", t_floor, ""),
            ("(b) imret full evaluation", t_full, f"{t_full / t_floor:.2f} x floor"),
            ("(b') imret map@R family", t_r, f"{t_r / t_pml:.2f} x PML"),
            ("(c) PML AccuracyCalculator", t_pml, "")]
    print("values:")
    agree("imret map@R family vs imret full", ours, ours_r, 1e-9)
    agree("PML vs imret", ours, pml)
    if not args.skip_numpy:
        t_np, plain = timed(lambda: numpy_eval(q, ql, db, dl), 1)
        rows.append(("(d) numpy argsort baseline", t_np, f"imret {t_np / t_full:.1f} x faster"))
        agree("numpy vs imret", ours, plain)
    if not args.skip_scaling:
        db4, dl4 = synthetic(4 * args.database, args.classes, args.dim, 3, centres)
        t_floor4, _ = timed(lambda: floor(q, db4), args.rounds)
        t_full4, _ = timed(lambda: imret_eval(q, ql, db4, dl4, FULL), args.rounds)
        rows += [(f"(a) floor, database x 4 ({4 * args.database})", t_floor4, ""),
                 ("(b) imret full, database x 4", t_full4, f"{t_full4 / t_floor4:.2f} x floor")]
    print("\n| method | seconds | ratio |\n|---|---|---|")
    for name, t, ratio in rows:
        print(f"| {name} | {t:.2f} | {ratio} |")
    print("\nimret:", " ".join(f"{k} {v:.4f}" for k, v in ours.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

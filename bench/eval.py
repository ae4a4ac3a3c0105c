"""Evaluation speed and memory on CIFAR-100-sized data: imret vs the floor, pytorch-metric-learning and numpy.

Synthetic L2-normalised embeddings (class centres plus noise; 10,000 queries x 50,000
database items x 128-d, 100 classes by default) are scored several ways:

(a) the floor: the bare query x database score matrix, one BLAS product (torch.mm; in
    products of at most 2 GiB each, so that the x 4 and x 16 databases fit in memory);
(b) imret's full evaluation (``imret.evaluate.evaluate``, the one-pass scan): map (full
    ranking), map@R, r_precision, precision@1, recall@1,2,4,8, and the 8 nearest
    neighbours that evaluate saves; (b') the map@R family alone (FAISS top-k path);
(c) pytorch-metric-learning's ``AccuracyCalculator`` (k="max_bin_count") for the
    metrics it has (mean_average_precision_at_r, r_precision, precision_at_1);
(d) a plain numpy baseline: the score matrix, an argsort per row, metrics from the
    sorted labels (1,000 queries at a time, to bound its memory).

Every case runs in a fresh process, so that one case's memory (numpy's sorted matrix,
PML's) cannot inflate another's figure; rounds alternate the cases, and each figure is
the median over rounds of one timed call after one untimed warm-up call. Each case
reports its CPU time (all threads; less inflated than wall time when other processes share
the cores) and its peak RSS during the timed call (VmHWM, reset before it), beside the RSS of
an interpreter that has only imported torch, faiss and imret, and the features' size.
Every method's values are checked against imret's.

    python bench/eval.py [--queries 10000] [--database 50000] [--rounds 3] [--block-mb 512]
                         [--skip-numpy] [--skip-scaling] [--skip-x16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FULL = ["map", "map@R", "r_precision", "precision@1", "recall@1", "recall@2", "recall@4", "recall@8"]
R_FAMILY = ["map@R", "r_precision", "precision@1"]
PML_NAMES = {"mean_average_precision_at_r": "map@R", "r_precision": "r_precision", "precision_at_1": "precision@1"}
FLOOR_CHUNK_BYTES = 2 * 10**9  # the floor's products: at most 2 GB of scores each
NEIGHBOURS = 8


# ----------------------------------------------------------------------------- data


def synthetic(num: int, classes: int, dim: int, seed: int, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class centres plus noise, L2-normalised; built in chunks, so that its peak stays near the result."""
    rng = np.random.default_rng(seed)
    labels = np.arange(num) % classes
    rng.shuffle(labels)
    out = np.empty((num, dim), np.float32)
    for lo in range(0, num, 65536):
        hi = min(lo + 65536, num)
        x = centres[labels[lo:hi]] + 2.5 * rng.standard_normal((hi - lo, dim)).astype(np.float32) / np.sqrt(dim)
        out[lo:hi] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out, labels.astype(np.int64)


def write_data(folder: Path, args: argparse.Namespace, mults: list[int]) -> None:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((args.classes, args.dim)).astype(np.float32) / np.sqrt(args.dim)
    q, ql = synthetic(args.queries, args.classes, args.dim, 1, centres)
    np.save(folder / "q.npy", q)
    np.save(folder / "ql.npy", ql)
    for mult in mults:  # seed 2 for x 1, 3 for x 4 (as before), 4 for x 16
        db, dl = synthetic(mult * args.database, args.classes, args.dim, {1: 2, 4: 3}.get(mult, 4), centres)
        np.save(folder / f"db{mult}.npy", db)
        np.save(folder / f"dl{mult}.npy", dl)


# ----------------------------------------------------------------------------- the cases (run in a child)


def floor(q: np.ndarray, db: np.ndarray) -> None:
    import torch

    rows = max(1, FLOOR_CHUNK_BYTES // (4 * len(db)))
    for lo in range(0, len(q), rows):
        torch.mm(torch.from_numpy(q[lo:lo + rows]), torch.from_numpy(db).T)


def imret_full(q: np.ndarray, ql: np.ndarray, db: np.ndarray, dl: np.ndarray, block_mb: float) -> dict:
    from imret.evaluate import ExactSearch, evaluate

    result = evaluate(q, ql, db, dl, FULL, neighbours=NEIGHBOURS, search=ExactSearch(block_mb=block_mb))
    return {"metrics": result.metrics, "ids": result.neighbours.ids.tolist()[:200],
            "scores": result.neighbours.scores.tolist()[:200], "ranking": result.meta["ranking"]}


def imret_family(q: np.ndarray, ql: np.ndarray, db: np.ndarray, dl: np.ndarray) -> dict:
    from imret.evaluate import evaluate

    return {"metrics": evaluate(q, ql, db, dl, R_FAMILY, neighbours=0).metrics}


def faiss_neighbours(q: np.ndarray, db: np.ndarray) -> dict:
    """The saved neighbours as FAISS finds them (the path evaluate took before the one-pass scan)."""
    from imret.search.knn import search_shard

    neigh = search_shard(q[:200], db, 0, NEIGHBOURS)
    return {"ids": neigh.ids.tolist(), "scores": neigh.scores.tolist()}


def pml_eval(q: np.ndarray, ql: np.ndarray, db: np.ndarray, dl: np.ndarray) -> dict:
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calc = AccuracyCalculator(include=tuple(PML_NAMES), k="max_bin_count")
    out = calc.get_accuracy(torch.from_numpy(q), torch.from_numpy(ql), torch.from_numpy(db), torch.from_numpy(dl),
                            ref_includes_query=False)
    return {"metrics": {PML_NAMES[k]: float(v) for k, v in out.items()}}


def numpy_eval(q: np.ndarray, ql: np.ndarray, db: np.ndarray, dl: np.ndarray) -> dict:
    """The textbook way: full scores, argsort every row, metrics from the sorted labels."""
    sums: dict[str, float] = {}
    for lo in range(0, len(q), 1000):
        hit = dl[np.argsort(-(q[lo:lo + 1000] @ db.T), axis=1, kind="stable")] == ql[lo:lo + 1000, None]
        num_pos = hit.sum(1)
        ranks = np.arange(1, db.shape[0] + 1)
        prec = np.cumsum(hit, axis=1) / ranks
        within = ranks[None, :] <= num_pos[:, None]
        parts = {"map": (prec * hit).sum(1) / num_pos, "map@R": (prec * hit * within).sum(1) / num_pos,
                 "r_precision": (hit * within).sum(1) / num_pos, "precision@1": hit[:, 0]}
        parts.update({f"recall@{k}": hit[:, :k].any(1) for k in (1, 2, 4, 8)})
        for name, v in parts.items():
            sums[name] = sums.get(name, 0.0) + float(np.sum(v))
    return {"metrics": {name: s / len(q) for name, s in sums.items()}}


def memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def release_freed() -> None:
    """Hand memory freed by the warm-up back to the OS (glibc keeps it otherwise), so that the
    timed call's peak shows what it needs rather than what the warm-up left behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak() -> bool:
    """Start VmHWM again from the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(args: argparse.Namespace) -> int:
    import faiss  # noqa: F401  (imported in every case, so that the import baseline is the same)
    import torch  # noqa: F401

    import imret.evaluate  # noqa: F401

    data = Path(args.data)
    if args.child == "constant":  # what every case carries before it does anything of its own
        imports = memory_kib("VmRSS")
        rng = np.random.default_rng(0)
        tiny = rng.standard_normal((2304, args.dim)).astype(np.float32)
        labels = rng.integers(0, 8, 2304)
        imret_full(tiny[:256], labels[:256], tiny[256:], labels[256:], args.block_mb)
        release_freed()
        print(json.dumps({"imports_kib": imports, "rss_kib": memory_kib("VmRSS")}))
        return 0
    q, ql = np.load(data / "q.npy"), np.load(data / "ql.npy")
    db, dl = np.load(data / f"db{args.mult}.npy"), np.load(data / f"dl{args.mult}.npy")
    run = {"floor": lambda: floor(q, db), "full": lambda: imret_full(q, ql, db, dl, args.block_mb),
           "family": lambda: imret_family(q, ql, db, dl), "faiss": lambda: faiss_neighbours(q, db),
           "pml": lambda: pml_eval(q, ql, db, dl), "numpy": lambda: numpy_eval(q, ql, db, dl)}[args.child]
    if args.warmup:
        run()
        release_freed()
    before = memory_kib("VmRSS")
    exact_peak = reset_peak()
    start, cpu_start = time.perf_counter(), time.process_time()
    out = run() or {}
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "rss_before_kib": before, "peak_kib": memory_kib("VmHWM"),
                      "peak_is_of_call": exact_peak, "features_bytes": int(q.nbytes + db.nbytes), **out}))
    return 0


# ----------------------------------------------------------------------------- the parent


def run_child(args: argparse.Namespace, case: str, mult: int, warmup: bool = True) -> dict:
    cmd = [sys.executable, __file__, "--child", case, "--mult", str(mult), "--data", args.data,
           "--block-mb", str(args.block_mb)] + (["--warmup"] if warmup else [])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"bench/eval.py: case {case} x{mult} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def agree(name: str, ours: dict[str, float], theirs: dict[str, float], tol: float) -> None:
    worst = max(abs(ours[k] - v) for k, v in theirs.items())
    status = "identical" if worst <= tol else "DIFFERENT"
    print(f"  {name}: {status} (largest difference {worst:.2e} over {', '.join(theirs)}; tolerance {tol:g})")


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def mib(kib: float) -> str:
    return f"{kib / 1024:,.0f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--database", type=int, default=50_000)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--block-mb", type=float, default=512, help="imret's evaluate.block_mb")
    p.add_argument("--skip-numpy", action="store_true", help="leave out the (slow) numpy baseline")
    p.add_argument("--skip-scaling", action="store_true", help="leave out the database x 4 and x 16 rows")
    p.add_argument("--skip-x16", action="store_true", help="leave out the database x 16 row")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--mult", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--warmup", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    mults = [1] if args.skip_scaling else [1, 4] if args.skip_x16 else [1, 4, 16]
    with tempfile.TemporaryDirectory(prefix="imret-bench-eval-") as tmp:
        args.data = tmp
        write_data(Path(tmp), args, mults)
        return report(args, mults)


def report(args: argparse.Namespace, mults: list[int]) -> int:
    import torch

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch "
          f"threads, torch {torch.__version__}; {load()} at the start")
    print(f"{args.queries} queries x {args.database} database x {args.dim}-d, {args.classes} classes; "
          f"imret block_mb {args.block_mb:g}; median of {args.rounds} rounds, cases alternating, each in a fresh process")
    constant = run_child(args, "constant", 1, warmup=False)
    plan = [("floor", 1), ("full", 1), ("family", 1), ("pml", 1)]
    plan += [("floor", 4), ("full", 4)] if 4 in mults else []
    results: dict[tuple[str, int], list[dict]] = {}
    for r in range(args.rounds):
        for case, mult in plan:
            results.setdefault((case, mult), []).append(run_child(args, case, mult))
        print(f"  round {r + 1} done; {load()}", flush=True)
    if 16 in mults:  # one round: the x 16 row is there for its memory
        for case in ("floor", "full"):
            results[(case, 16)] = [run_child(args, case, 16, warmup=False)]
    if not args.skip_numpy:
        results[("numpy", 1)] = [run_child(args, "numpy", 1, warmup=False)]
    faiss = run_child(args, "faiss", 1, warmup=False)
    print_table(results, constant, args)
    print_values(results, faiss)
    print(f"\n{load()} at the end")
    return 0


def median(results: dict, key: tuple[str, int], field: str = "seconds") -> float:
    return statistics.median(r[field] for r in results[key])


def print_table(results: dict, constant: dict, args: argparse.Namespace) -> None:
    base = constant["rss_kib"]
    print(f"\nRSS of an interpreter that imported torch, faiss and imret: {mib(constant['imports_kib'])} MiB; after a "
          f"first (tiny) evaluation, the constant every case carries: {mib(base)} MiB")
    print("\n| case | seconds | ratio | CPU s | CPU ratio | peak RSS MiB | features MiB | peak - constant - features MiB |")
    print("|---|---|---|---|---|---|---|---|")
    names = {"floor": "(a) floor: score matrix (torch.mm)", "full": "(b) imret full evaluation (one pass)",
             "family": "(b') imret map@R family (FAISS top-k)", "pml": "(c) PML AccuracyCalculator",
             "numpy": "(d) numpy argsort baseline"}
    for (case, mult), runs in results.items():
        t, cpu = median(results, (case, mult)), median(results, (case, mult), "cpu_seconds")
        ratio = cpu_ratio = ""
        if case == "full":
            ratio = f"{t / median(results, ('floor', mult)):.2f} x floor"
            cpu_ratio = f"{cpu / median(results, ('floor', mult), 'cpu_seconds'):.2f} x floor"
            if mult > 1 and ("full", 1) in results:
                ratio += f"; {t / median(results, ('full', 1)):.2f} x the x 1 time"
                cpu_ratio += f"; {cpu / median(results, ('full', 1), 'cpu_seconds'):.2f} x the x 1"
        elif case == "family":
            ratio = f"{t / median(results, ('pml', 1)):.2f} x PML"
        elif case == "numpy":
            ratio = f"imret {t / median(results, ('full', 1)):.1f} x faster"
        peak = max(r["peak_kib"] for r in runs)
        feats = runs[0]["features_bytes"] / 1024
        extra = peak - base - feats
        within = f" ({'within' if extra <= args.block_mb * 1024 else 'OVER'} block_mb {args.block_mb:g})" \
            if case == "full" else ""
        label = f"{names[case]}, database x {mult}" if mult > 1 else names[case]
        rounds = f" ({len(runs)} run{'s' if len(runs) > 1 else ''})" if len(runs) != args.rounds else ""
        print(f"| {label}{rounds} | {t:.2f} | {ratio} | {cpu:.2f} | {cpu_ratio} | {mib(peak)} | {mib(feats)} | "
              f"{mib(extra)}{within} |")


def print_values(results: dict, faiss: dict) -> None:
    ours = results[("full", 1)][0]
    print(f"\nvalues (ranking: {ours['ranking']}):")
    agree("imret map@R family (FAISS top-k path) vs imret full", ours["metrics"],
          results[("family", 1)][0]["metrics"], 1e-9)
    agree("PML vs imret", ours["metrics"], results[("pml", 1)][0]["metrics"], 1e-4)
    if ("numpy", 1) in results:
        agree("numpy vs imret", ours["metrics"], results[("numpy", 1)][0]["metrics"], 1e-6)
    same = [r["metrics"] == ours["metrics"] for rs in (results[k] for k in results if k == ("full", 1)) for r in rs]
    print(f"  imret full, every round: {'identical' if all(same) else 'DIFFERENT'} values")
    ids, ref_ids = np.array(ours["ids"]), np.array(faiss["ids"])
    diff = np.abs(np.array(ours["scores"]) - np.array(faiss["scores"])).max()
    print(f"  saved neighbours of the first 200 queries vs FAISS's top-{NEIGHBOURS}: ids "
          f"{'identical' if np.array_equal(ids, ref_ids) else 'DIFFERENT'}, scores differ by at most {diff:.1e}")
    print("\nimret:", " ".join(f"{k} {v:.6f}" for k, v in ours["metrics"].items()))


if __name__ == "__main__":
    sys.exit(main())

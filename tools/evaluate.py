"""Score saved embeddings: ``python tools/evaluate.py --query Q.npz [--db D.npz] [--out results.json]``.

Each .npz holds ``embeddings`` (n x d) and ``labels`` (n). With ``--db`` every query is
searched against the database; without it the query set is searched against itself,
each query left out of its own ranking (the CUB / Cars / SOP protocol). Embeddings are
L2-normalised first, so scores are cosine similarities. Prints a table and, with
``--out``, writes the same flat keys as the pipeline's eval/results.json (``map``,
``map@R``, ``recall@1``, ...) plus ``meta``. Bad input exits with status 2 and a
message saying what is wrong.

    python tools/evaluate.py --query q.npz --db db.npz --metrics map map@10 map@R --k 1 5 10
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from pathlib import Path

import numpy as np

DEFAULT_METRICS = ["map", "map@R", "r_precision", "precision@1"]
DEFAULT_KS = [1, 2, 4, 8]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/evaluate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--query", required=True, type=Path, help=".npz with embeddings (n x d) and labels (n)")
    p.add_argument("--db", type=Path, help=".npz of the database; without it: the queries against themselves")
    p.add_argument("--metrics", nargs="+", help=f"metric names (default: {' '.join(DEFAULT_METRICS)} and recall@K)")
    p.add_argument("--k", nargs="+", type=int, help=f"add recall@K for each K (default with no --metrics: {DEFAULT_KS})")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--roc-pairs", type=int, default=1_000_000, help="pairs for roc_auc beyond which pairs are sampled")
    p.add_argument("--seed", type=int, default=0, help="seed of the pair sample")
    return p.parse_args(argv)


def metric_names(metrics: list[str] | None, ks: list[int] | None) -> list[str]:
    from imret.metrics import check_metric_name

    names = list(metrics) if metrics else list(DEFAULT_METRICS)
    for k in ks if ks is not None else ([] if metrics else DEFAULT_KS):
        if k < 1:
            raise ValueError(f"--k {k}: K must be a positive integer")
        names.append(f"recall@{k}")
    names = list(dict.fromkeys(names))
    for name in names:
        check_metric_name(name)
    return names


def load_set(path: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings (float32, L2-normalised) and labels of one .npz, or ValueError saying why not."""
    if not path.exists():
        raise ValueError(f"{what} file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k in ("embeddings", "labels")}
            present = list(z.files)
    except (OSError, ValueError, AttributeError, TypeError, zipfile.BadZipFile, EOFError) as err:  # .npy: no .files
        raise ValueError(f"{what} file {path} is not a readable .npz file ({err})") from None
    if len(arrays) < 2:
        missing = [k for k in ("embeddings", "labels") if k not in arrays]
        raise ValueError(f"{what} file {path} has no {' or '.join(missing)} array (it holds: "
                         f"{', '.join(present) or 'nothing'}); save it with np.savez(path, embeddings=E, labels=L)")
    emb, labels = arrays["embeddings"], arrays["labels"]
    return _checked(emb, labels, path, what)


def _checked(emb: np.ndarray, labels: np.ndarray, path: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    if emb.ndim != 2:
        raise ValueError(f"{what} embeddings in {path} must be n x d; got shape {emb.shape}")
    if len(emb) == 0 or emb.shape[1] == 0:
        raise ValueError(f"{what} file {path} is empty: embeddings of shape {emb.shape}")
    if labels.ndim != 1 or len(labels) != len(emb):
        raise ValueError(f"{what} file {path} has {len(emb)} embeddings but labels of shape {labels.shape}; "
                         "there must be exactly one label per embedding")
    if not np.issubdtype(emb.dtype, np.number):
        raise ValueError(f"{what} embeddings in {path} are not numbers (dtype {emb.dtype})")
    emb = emb.astype(np.float32)
    bad = ~np.isfinite(emb).all(axis=1)
    if bad.any():
        raise ValueError(f"{what} file {path}: {int(bad.sum())} embeddings contain NaN or infinite values "
                         f"(first at row {int(np.flatnonzero(bad)[0])})")
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{what} file {path}: {int((norms == 0).sum())} embeddings are all zeros and have no "
                         f"direction (first at row {int(np.flatnonzero(norms[:, 0] == 0)[0])})")
    return (emb / norms).astype(np.float32), labels


def encode_labels(*label_sets: np.ndarray) -> list[np.ndarray]:
    """Any labels (ints, strings) as int64 codes shared across the sets."""
    _, codes = np.unique(np.concatenate(label_sets), return_inverse=True)
    bounds = np.cumsum([0] + [len(s) for s in label_sets])
    return [codes[a:b].astype(np.int64) for a, b in zip(bounds[:-1], bounds[1:])]


def check_out(out: Path | None, inputs: list[Path | None]) -> None:
    """--out must not be one of the input files (after symlinks and hard links): writing it would destroy the input."""
    if out is None:
        return
    for given in inputs:
        if given is not None and (out.resolve() == given.resolve() or _same_file(out, given)):
            raise ValueError(f"--out {out} is the input file {given}; writing the results there would overwrite the "
                             f"embeddings. Give another path, e.g. --out {out.with_name(out.stem + '-results.json')}")
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give the path of the JSON file to write, e.g. {out / 'results.json'}")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False


def run(args: argparse.Namespace) -> dict:
    from imret.evaluate import evaluate

    check_out(args.out, [args.query, args.db])
    names = metric_names(args.metrics, args.k)
    queries, qlabels = load_set(args.query, "query")
    if args.db is None:
        (qcodes,) = encode_labels(qlabels)
        result = evaluate(queries, qcodes, None, None, names, roc_pairs=args.roc_pairs, seed=args.seed, neighbours=0)
    else:
        database, dlabels = load_set(args.db, "database")
        if database.shape[1] != queries.shape[1]:
            raise ValueError(f"query embeddings have dimension {queries.shape[1]} but database embeddings "
                             f"{database.shape[1]} ({args.query} vs {args.db}); both must come from the same model")
        qcodes, dcodes = encode_labels(qlabels, dlabels)
        result = evaluate(queries, qcodes, database, dcodes, names, roc_pairs=args.roc_pairs, seed=args.seed,
                          neighbours=0)
    result.meta.update(query_file=str(args.query), database_file=str(args.db) if args.db else None)
    return result.results()


def print_table(results: dict) -> None:
    meta = results["meta"]
    against = "themselves (each query left out)" if meta["database_file"] is None else meta["database_file"]
    print(f"{meta['num_queries']} queries against {against}: {meta['num_database']} items ranked per query; "
          f"{meta['queries_without_positives']} queries without positives left out")
    width = max(len(k) for k in results if k != "meta")
    for key, value in results.items():
        if key != "meta":
            print(f"  {key:<{width}}  {value:.4f}")
    if "roc_pairs" in meta:
        how = "a seeded sample of" if meta["roc_pairs_sampled"] else "all"
        print(f"  (pair metrics over {how} {meta['roc_pairs']} pairs)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        results = run(args)
    except ValueError as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 2
    print_table(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

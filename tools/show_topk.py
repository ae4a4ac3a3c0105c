"""Draw one query's top-k from an evaluated run: ``python tools/show_topk.py --exp NAME --query-index I``.

``I`` is the query's row in the query split (its sample number). The results come from
``eval/neighbours.npz`` of the evaluate stage. With ``--split database`` the query is
instead item I of the database split, searched against the rest of the database from
the extracted features (the CIFAR seed's "show a train image's neighbours"). Images
are decoded from the shards. The
PNG shows the query (grey border) then its results, green when their label is the
query's and red when not; the table lists the same with keys and scores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/show_topk.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--exp", required=True, help="run name (a directory under the runs root)")
    p.add_argument("--query-index", type=int, required=True, help="the query's row in the query split")
    p.add_argument("-k", type=int, default=8, help="results to show (at most the saved neighbours, 100)")
    p.add_argument("--runs-root", type=Path, default=Path("runs"), help="where run directories live (default: runs)")
    p.add_argument("--out", type=Path, help="PNG to write (default: <run>/eval/topk-<I>.png)")
    p.add_argument("--size", type=int, default=96, help="pixels per tile")
    p.add_argument("--split", choices=("query", "database"), default="query",
                   help="which split the query index is in (default: query)")
    return p.parse_args(argv)


def neighbours_of(run: object, index: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    path = run.eval / "neighbours.npz"
    if not path.exists():
        raise ValueError(f"{path} is missing: run the evaluate stage of this run first")
    with np.load(path) as z:
        queries, ids, scores = z["queries"], z["ids"], z["scores"]
    where = np.flatnonzero(queries == index)
    if not len(where):
        raise ValueError(f"query {index} was not evaluated: the evaluated query rows are "
                         f"{queries.min()}..{queries.max()} ({len(queries)} rows; evaluate.sample_queries "
                         "may have left it out)")
    keep = ids[where[0]] >= 0
    return ids[where[0]][keep][:k], scores[where[0]][keep][:k]


def database_neighbours(run: object, split: str, index: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Item ``index`` of the database split against the rest of it, from the extracted features."""
    from imret.features import load_features
    from imret.search.knn import search_shard

    database = load_features(run, split)
    if not 0 <= index < len(database.labels):
        raise ValueError(f"--query-index {index}: the database split '{split}' has items 0..{len(database.labels) - 1}")
    query = database.embeddings[index:index + 1]
    neigh = search_shard(query, database.embeddings, 0, min(k, len(database.labels) - 1), np.array([index]))
    keep = neigh.ids[0] >= 0
    return neigh.ids[0][keep], neigh.scores[0][keep]


def main(argv: list[str] | None = None) -> int:
    from imret.data.loader import decode_image
    from imret.data.shards import ShardSplit
    from imret.evaluate.inputs import stage_input
    from tools.query import open_run

    args = parse_args(argv)
    try:
        cfg, run = open_run(args.runs_root, args.exp)
        inp = stage_input(cfg)
        dsplit = ShardSplit(cfg.data.root, inp.database_split)
        if args.split == "database":
            qsplit = dsplit
            ids, scores = database_neighbours(run, inp.database_split, args.query_index, args.k)
        else:
            ids, scores = neighbours_of(run, args.query_index, args.k)
            qsplit = dsplit if inp.database_split == inp.query_split else ShardSplit(cfg.data.root, inp.query_split)
    except ValueError as err:
        print(f"show_topk: error: {err}", file=sys.stderr)
        return 2
    label = int(qsplit.labels[args.query_index])
    correct = [int(dsplit.labels[i]) == label for i in ids]
    print(f"query {args.query_index} ({qsplit.keys[args.query_index]}, label {label}):")
    for rank, (i, s, ok) in enumerate(zip(ids, scores, correct), 1):
        print(f"  {rank:>3}  {s:7.4f}  {'+' if ok else '-'}  {dsplit.keys[i]} (label {int(dsplit.labels[i])})")
    out = args.out or run.eval / f"topk-{args.query_index}.png"
    write_png(out, decode_image(qsplit, args.query_index), [decode_image(dsplit, int(i)) for i in ids], correct,
              args.size)
    print(f"wrote {out}")
    return 0


def write_png(path: Path, query: object, results: list[object], correct: list[bool], size: int) -> None:
    from PIL import Image

    from imret.tb import grid, retrieval_rows

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid(retrieval_rows([query], [results], [correct], size))).save(path)


if __name__ == "__main__":
    sys.exit(main())

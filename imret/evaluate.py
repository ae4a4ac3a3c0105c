"""The evaluate stage: search the database for every query and score the rankings.

Writes ``runs/<exp>/eval/results.json``: every metric under its flat name (``map``,
``recall@1``, ...) plus ``meta`` (counts, config digest, how the ranks were found),
``eval/neighbours.npz`` (each query's top-k ids and scores, for the tools), and the
metrics to TensorBoard as scalars and as an hparams entry.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from imret import metrics as metric_lib
from imret.config import ExperimentConfig
from imret.distributed import DistInfo
from imret.extract import Features, load_features
from imret.metrics import Ranks
from imret.rundir import RunDir, atomic_write_bytes, atomic_write_json
from imret.search import Neighbours, full_ranks, knn, positives_per_query, ranks_from_knn
from imret.tb import make_board

SAVED_NEIGHBOURS = 100  # neighbours kept per query in eval/neighbours.npz


def run(cfg: ExperimentConfig, run: RunDir, info: DistInfo) -> dict[str, Any]:
    if not info.is_main:  # a single-process stage; extra ranks (if any) have nothing to do
        return {}
    ev = cfg.evaluate
    query = load_features(run, ev.query)
    database = load_features(run, ev.database) if ev.database and ev.database != ev.query else None
    chosen = _query_sample(len(query.labels), ev.sample_queries, ev.seed)
    if chosen is not None:
        query = Features(query.embeddings[chosen], query.keys[chosen], query.labels[chosen], query.manifest)
    results = evaluate(query, database, ev.metrics)
    results["meta"].update(experiment=cfg.name, config_digest=cfg.digest(), query_split=ev.query,
                           database_split=ev.database or ev.query, sampled_queries=chosen is not None)
    neighbours = results.pop("_neighbours")
    _save_neighbours(run, neighbours, chosen)
    atomic_write_json(run.results, results)
    _to_tensorboard(cfg, run, info, results)
    _print_table(cfg.name, results)
    return {k: v for k, v in results.items() if k != "meta"}


def _query_sample(n: int, size: int, seed: int) -> np.ndarray | None:
    if not size or size >= n:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def evaluate(query: Features, database: Features | None, names: list[str]) -> dict[str, Any]:
    """All rank metrics for ``query`` against ``database`` (None: against itself, minus each query)."""
    self_search = database is None
    db = query if database is None else database
    num_pos = positives_per_query(query.labels, db.labels, self_search)
    db_size = len(db.labels) - int(self_search)
    depth = metric_lib.depth_needed(names, int(num_pos.max(initial=0)), db_size)
    # one neighbour more than the depth: it shows whether the last tie group continues
    k = min(max(SAVED_NEIGHBOURS, depth + 1 if depth < db_size else 1), db_size)
    neighbours = knn(query.embeddings, db.embeddings, k, exclude_self=self_search)
    ranks: Ranks
    if depth >= db_size:  # full-ranking metrics (map): exact ranks of every positive
        ranks = full_ranks(query.embeddings, query.labels, None if self_search else db.embeddings,
                           None if self_search else db.labels)
        method = "exact full ranking (blocked inner products + binary search)"
    else:
        ranks = ranks_from_knn(neighbours, query.labels, db.labels, exclude_self=self_search)
        method = f"faiss exact top-{neighbours.ids.shape[1]} (ranks exact to depth {ranks.depth})"
    values = metric_lib.compute(ranks, names)
    without = int((num_pos == 0).sum())
    meta = {"num_queries": len(query.labels), "num_database": db_size, "queries_without_positives": without,
            "ranking": method}
    return {**values, "meta": meta, "_neighbours": neighbours}


def _save_neighbours(run: RunDir, neighbours: Neighbours, chosen: np.ndarray | None) -> None:
    buf = io.BytesIO()
    k = min(SAVED_NEIGHBOURS, neighbours.ids.shape[1])
    np.savez(buf, ids=neighbours.ids[:, :k], scores=neighbours.scores[:, :k],
             queries=chosen if chosen is not None else np.arange(len(neighbours.ids)))
    atomic_write_bytes(run.eval / "neighbours.npz", buf.getvalue())


def _to_tensorboard(cfg: ExperimentConfig, run: RunDir, info: DistInfo, results: dict[str, Any]) -> None:
    metrics = {k: v for k, v in results.items() if isinstance(v, float)}
    board = make_board(info, run.tb)
    step = _trained_steps(run)
    board.scalars(metrics, step, prefix="eval/")
    board.hparams(_hparams(cfg), metrics)
    board.close()


def _trained_steps(run: RunDir) -> int:
    from imret.checkpoint import Checkpointer, read_meta

    latest = Checkpointer(run.ckpt).latest()
    return int(read_meta(latest)["step"]) if latest else 0


def _hparams(cfg: ExperimentConfig) -> dict[str, Any]:
    return {
        "backbone": cfg.model.backbone, "embed_dim": cfg.model.embed_dim, "pool": cfg.model.pool,
        "loss": "+".join(t.name for t in cfg.loss.terms), "lr": cfg.optim.lr, "optimizer": cfg.optim.name,
        "batch_size": cfg.data.batch_size, "epochs": cfg.train.epochs, "image_size": cfg.data.image_size,
    }


def _print_table(name: str, results: dict[str, Any]) -> None:
    meta = results["meta"]
    print(f"evaluate: {name}: {meta['num_queries']} queries, {meta['num_database']} database items "
          f"({meta['queries_without_positives']} queries without positives left out)")
    for key, value in results.items():
        if isinstance(value, float):
            print(f"  {key:<14} {value:.4f}")

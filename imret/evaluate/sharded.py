"""A sharded evaluation: the database search split over array tasks, then merged.

``search_task`` (pass 1) searches every query against one database shard,
``count_task`` (pass 2, only when the full-ranking ``map`` is asked for) counts that
shard's negatives above every positive, and ``merge_shards`` combines the shards'
files into the same results an unsharded run writes (``imret.search.sharded`` has the
arithmetic; docs/evaluation.md the protocol). ``imret.pipeline`` names the passes as
the evaluate stage's array sub-stages, so that ``slurm/`` submits them generically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imret import metrics as metric_lib
from imret.config import ExperimentConfig
from imret.data.loader import rank_range
from imret.distributed import DistInfo
from imret.evaluate.core import (
    FULL_METHOD, SAVED_NEIGHBOURS, SearchPlan, assemble, check_inputs, knn_ranks,
)
from imret.evaluate.inputs import StageInput, load_inputs
from imret.evaluate.pairs import Pairs, pair_similarities, sample_pairs
from imret.evaluate.results import finish
from imret.features import load_feature_rows
from imret.metrics import Ranks
from imret.rundir import RunDir, atomic_write_npz
from imret.search.knn import Neighbours, merge_topk, search_shard
from imret.search.scan import scan
from imret.search.sharded import Csr, negative_counts, positive_scores, ranks_from_counts


def shard_path(run: RunDir, kind: str, task_index: int, num_tasks: int) -> Path:
    return run.eval / "shards" / f"{kind}-{task_index:04d}-of-{num_tasks:04d}.npz"


def needs_count_pass(cfg: ExperimentConfig) -> bool:
    """Whether a sharded evaluation needs pass 2 (``count_task``): the full-ranking ``map``."""
    return "map" in cfg.evaluate.metrics


def num_tasks(cfg: ExperimentConfig) -> int:
    """Array tasks of each pass: one per database shard."""
    return cfg.evaluate.db_shards


@dataclass
class _ShardSetup:
    inp: StageInput
    queries: np.ndarray
    query_labels: np.ndarray
    database_labels: np.ndarray
    plan: SearchPlan
    pairs: Pairs | None


def _shard_setup(cfg: ExperimentConfig, run: RunDir) -> _ShardSetup:
    ev = cfg.evaluate
    data = load_inputs(cfg, run, database_embeddings=False)
    inp, query_labels, database_labels = data.split, data.query_labels, data.database_labels
    plan = SearchPlan.make(list(ev.metrics), query_labels, database_labels, inp.self_ids, SAVED_NEIGHBOURS)
    pairs = sample_pairs(query_labels, database_labels, inp.self_ids, ev.roc_pairs, ev.seed) if plan.pair_names else None
    return _ShardSetup(inp, data.queries, query_labels, database_labels, plan, pairs)


def _check_task(task_index: int, num_tasks: int) -> None:
    if num_tasks < 1 or not 0 <= task_index < num_tasks:
        raise ValueError(f"task {task_index} of {num_tasks}: the task index must be in [0, {num_tasks})")


def _is_current(path: Path, cfg: ExperimentConfig) -> bool:
    if not path.exists():
        return False
    with np.load(path) as z:
        return str(z["config_digest"]) == cfg.digest()


def search_task(cfg: ExperimentConfig, run: RunDir, task_index: int, num_tasks: int,
                setup: _ShardSetup | None = None) -> Path:
    """Pass 1 of array task ``task_index`` of ``num_tasks``: every query against database shard i.

    Reads only the shard's rows of the database (memory-mapped), and writes
    ``eval/shards/topk-<i>-of-<n>.npz``: the shard's top-k (scores, global ids); when
    ``map`` is asked for, each query's scores against the shard's positives; and the
    similarities of the sampled pairs whose item is in the shard. A task whose file is
    there (same config digest) is skipped. ``setup``: the queries etc., when the caller
    runs several tasks in one process and has them already.
    """
    _check_task(task_index, num_tasks)
    path = shard_path(run, "topk", task_index, num_tasks)
    if _is_current(path, cfg):
        return path
    setup = setup or _shard_setup(cfg, run)
    lo, hi = rank_range(len(setup.database_labels), task_index, num_tasks)
    part = load_feature_rows(run, setup.inp.database_split, lo, hi)
    if len(part.labels):
        check_inputs(setup.queries, setup.query_labels, part.embeddings, part.labels)
    out: dict[str, Any] = {"config_digest": cfg.digest(), "range": np.array([lo, hi])}
    neigh = _shard_topk(setup, part.embeddings, part.labels, lo, cfg.evaluate.block_mb)
    out.update(scores=neigh.scores, ids=neigh.ids)
    if setup.plan.full:
        pos = positive_scores(setup.queries, setup.query_labels, part.embeddings, part.labels, lo, setup.inp.self_ids)
        out.update(pos_sizes=pos.sizes, pos_values=pos.values)
    if setup.pairs is not None:
        mine = np.flatnonzero((setup.pairs.item >= lo) & (setup.pairs.item < hi))
        out.update(pair_index=mine, pair_similarity=pair_similarities(
            setup.queries, part.embeddings, setup.pairs.query[mine], setup.pairs.item[mine], lo))
    atomic_write_npz(path, **out)
    return path


def _shard_topk(setup: _ShardSetup, embeddings: np.ndarray, labels: np.ndarray, lo: int,
                block_mb: float) -> Neighbours:
    """The shard's top k, found as the unsharded evaluation finds them: by FAISS when the
    metrics need a prefix of the ranking, by the scan (the same products, so the same
    scores) when they need the full ranking."""
    plan, self_ids = setup.plan, setup.inp.self_ids
    if not plan.full or not plan.k or not len(labels):
        return search_shard(setup.queries, embeddings, lo, plan.k, self_ids)
    neigh = scan(setup.queries, setup.query_labels, embeddings, labels, plan.k, self_ids, block_mb=block_mb,
                 id_offset=lo)
    assert neigh is not None
    return neigh


def count_task(cfg: ExperimentConfig, run: RunDir, task_index: int, num_tasks: int,
               setup: _ShardSetup | None = None, thresholds: Csr | None = None) -> Path:
    """Pass 2 of array task i (only when ``needs_count_pass``; after every ``search_task``).

    Merges every shard's positive scores into each query's sorted thresholds and counts
    this shard's negatives scoring >= each; writes ``eval/shards/count-<i>-of-<n>.npz``.
    """
    _check_task(task_index, num_tasks)
    path = shard_path(run, "count", task_index, num_tasks)
    if _is_current(path, cfg):
        return path
    setup = setup or _shard_setup(cfg, run)
    thresholds = thresholds if thresholds is not None else _thresholds(_load_shards(cfg, run, "topk", num_tasks))
    lo, hi = rank_range(len(setup.database_labels), task_index, num_tasks)
    part = load_feature_rows(run, setup.inp.database_split, lo, hi)
    counts = negative_counts(setup.queries, setup.query_labels, part.embeddings, part.labels, thresholds)
    atomic_write_npz(path, config_digest=cfg.digest(), negatives=counts)
    return path


def _load_shards(cfg: ExperimentConfig, run: RunDir, kind: str, num_tasks: int) -> list[dict[str, np.ndarray]]:
    paths = [shard_path(run, kind, i, num_tasks) for i in range(num_tasks)]
    missing = [i for i, p in enumerate(paths) if not _is_current(p, cfg)]
    if missing:
        step = "search_task" if kind == "topk" else "count_task"
        raise ValueError(f"evaluate: {kind} results of tasks {missing} of {num_tasks} are missing or from another "
                         f"config in {paths[0].parent}; run imret.evaluate.sharded.{step} for them first")
    out = []
    for p in paths:
        with np.load(p) as z:
            out.append({k: z[k] for k in z.files})
    return out


def _thresholds(shards: list[dict[str, np.ndarray]]) -> Csr:
    """Each query's positive scores over every shard, sorted: the thresholds of pass 2."""
    return Csr.merge_sorted([Csr.from_sizes(s["pos_sizes"], s["pos_values"]) for s in shards])


def merge_shards(cfg: ExperimentConfig, run: RunDir, info: DistInfo, run_missing: bool = False) -> dict[str, Any]:
    """Combine the shard tasks' files into results.json etc., exactly as an unsharded run.

    ``run_missing``: first run, in this process, every task whose file is not there yet
    (so that ``db_shards > 1`` also works without an array job).
    """
    n = cfg.evaluate.db_shards
    setup = _shard_setup(cfg, run)
    if run_missing:
        for i in range(n):
            search_task(cfg, run, i, n, setup)
    shards = _load_shards(cfg, run, "topk", n)
    thresholds = _thresholds(shards) if setup.plan.full else None
    if run_missing and thresholds is not None:  # pass 2: full-ranking ranks
        for i in range(n):
            count_task(cfg, run, i, n, setup, thresholds)
    neigh = merge_topk([Neighbours(s["scores"], s["ids"]) for s in shards], setup.plan.k)
    ranks, method = _merged_ranks(cfg, run, setup, neigh, thresholds)
    values = metric_lib.compute(ranks, setup.plan.rank_names) if ranks is not None else {}
    if setup.pairs is not None:
        similarity = np.empty(len(setup.pairs.query), np.float64)
        for s in shards:
            similarity[s["pair_index"]] = s["pair_similarity"]
        setup.pairs.similarity = similarity
    result = assemble(setup.plan, values, neigh, setup.pairs, method + f", over {n} database shards",
                       len(setup.query_labels))
    return finish(cfg, run, info, result, setup.inp)


def _merged_ranks(cfg: ExperimentConfig, run: RunDir, setup: _ShardSetup, neigh: Neighbours,
                  thresholds: Csr | None) -> tuple[Ranks | None, str]:
    plan = setup.plan
    if not plan.rank_names:
        return None, "none (pair metrics only)"
    if thresholds is not None:
        counts = _load_shards(cfg, run, "count", cfg.evaluate.db_shards)
        negatives = np.sum([s["negatives"] for s in counts], axis=0)
        return ranks_from_counts(thresholds, negatives, plan.num_positives, plan.database_size), FULL_METHOD
    return knn_ranks(plan, neigh, setup.query_labels, setup.database_labels)

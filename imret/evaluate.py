"""The evaluate stage: search the database for every query and score the rankings.

Writes ``runs/<exp>/eval/``:

- ``results.json``: every metric under its flat name (``map``, ``recall@1``, ...) plus
  ``meta`` (counts, config digest, how the ranks were found, how pairs were sampled);
- ``neighbours.npz``: each query's top-k ids and scores, for the tools;
- ``roc.npz``: the ROC curve of pair similarities, when ``roc_auc`` is asked for;

and to TensorBoard: the metrics as scalars at the trained step, an hparams entry, a grid
of a few queries with their top-k results, and a projector sample of the database.

A database too large for one job is split over ``evaluate.db_shards`` array tasks:
``search_task`` (pass 1) searches every query against one database shard, ``count_task``
(pass 2, only when the full-ranking ``map`` is asked for) counts that shard's negatives
above every positive, and ``merge_shards`` combines the shards' files into the same
results an unsharded run writes. See docs/evaluation.md.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imret import metrics as metric_lib
from imret.config import ExperimentConfig
from imret.data.loader import rank_range
from imret.distributed import DistInfo
from imret.extract import load_feature_rows, load_features, load_labels
from imret.metrics import PAIR_METRICS, Ranks, RocCurve
from imret.rundir import RunDir, atomic_write_bytes, atomic_write_json
from imret.search import (
    Csr, Neighbours, full_ranks, merge_topk, negative_counts, positive_scores, positives_per_query,
    ranks_from_counts, ranks_from_knn, search_shard,
)

SAVED_NEIGHBOURS = 100  # neighbours kept per query in eval/neighbours.npz
ROC_POINTS = 2000  # points of the ROC curve kept in eval/roc.npz (the AUC uses every pair)
FULL_METHOD = "exact full ranking (blocked inner products, per-row cell counts; docs/evaluation.md)"


# ----------------------------------------------------------------------------- the evaluation itself


@dataclass
class Evaluation:
    metrics: dict[str, float]
    meta: dict[str, Any]
    neighbours: Neighbours | None = None
    roc: RocCurve | None = None

    def results(self) -> dict[str, Any]:
        """What results.json holds: the flat metric names, then ``meta``."""
        return {**self.metrics, "meta": self.meta}


@dataclass
class Pairs:
    """(query, database item) pairs for the pair metrics, and whether they were sampled."""

    query: np.ndarray  # int64 query index
    item: np.ndarray  # int64 global database id
    positive: np.ndarray  # bool: same label
    sampled: bool
    similarity: np.ndarray = field(default_factory=lambda: np.zeros(0))  # float64, filled by the search


def evaluate(queries: np.ndarray, query_labels: np.ndarray, database: np.ndarray | None,
             database_labels: np.ndarray | None, names: list[str], self_ids: np.ndarray | None = None,
             roc_pairs: int = 1_000_000, seed: int = 0, neighbours: int = SAVED_NEIGHBOURS) -> Evaluation:
    """Every metric in ``names`` for the queries against the database.

    ``database=None``: the queries against themselves, each query left out of its own
    ranking. ``self_ids``: the queries are items of ``database`` (query i is item
    self_ids[i]), e.g. a sample of a split searched against the whole split.
    """
    if database is None:
        database, database_labels, self_ids = queries, query_labels, np.arange(len(queries))
    assert database_labels is not None
    check_inputs(queries, query_labels, database, database_labels)
    plan = SearchPlan.make(names, query_labels, database_labels, self_ids, neighbours)
    neigh = search_shard(queries, database, 0, plan.k, self_ids) if plan.k else None
    ranks, method = _ranks(plan, neigh, queries, query_labels, database, database_labels, self_ids)
    values = metric_lib.compute(ranks, plan.rank_names) if ranks is not None else {}
    pairs = sample_pairs(query_labels, database_labels, self_ids, roc_pairs, seed) if plan.pair_names else None
    if pairs is not None:
        pairs.similarity = pair_similarities(queries, database, pairs.query, pairs.item)
    return _assemble(plan, values, neigh, pairs, method, len(query_labels))


def check_inputs(queries: np.ndarray, query_labels: np.ndarray, database: np.ndarray,
                 database_labels: np.ndarray) -> None:
    """ValueError naming the problem for inputs no search can use."""
    for name, emb, labels in (("query", queries, query_labels), ("database", database, database_labels)):
        if emb.ndim != 2 or len(emb) == 0 or emb.shape[1] == 0:
            raise ValueError(f"the {name} embeddings must be a non-empty n x d array; got shape {emb.shape}")
        if len(labels) != len(emb):
            raise ValueError(f"the {name} set has {len(emb)} embeddings but {len(labels)} labels; "
                             "there must be one label per embedding")
        if not np.isfinite(emb).all():
            bad = int((~np.isfinite(emb)).any(axis=1).sum())
            raise ValueError(f"{bad} {name} embeddings contain NaN or infinite values; "
                             "check the model or the file they came from")
    if queries.shape[1] != database.shape[1]:
        raise ValueError(f"query embeddings have dimension {queries.shape[1]} but database embeddings "
                         f"{database.shape[1]}; both must come from the same model")


@dataclass
class SearchPlan:
    """What a set of metric names needs from the search."""

    rank_names: list[str]
    pair_names: list[str]
    full: bool  # the exact full ranking (map), rather than top-k lists
    k: int  # neighbours to search for (top-k metrics, saved neighbours)
    num_positives: np.ndarray
    database_size: int
    exclude_self: bool

    @classmethod
    def make(cls, names: list[str], query_labels: np.ndarray, database_labels: np.ndarray,
             self_ids: np.ndarray | None, neighbours: int) -> SearchPlan:
        for name in names:
            metric_lib.check_metric_name(name)
        exclude = self_ids is not None
        num_pos = positives_per_query(query_labels, database_labels, exclude)
        db_size = len(database_labels) - int(exclude)
        rank_names = [n for n in names if n not in PAIR_METRICS]
        depth = metric_lib.depth_needed(rank_names, int(num_pos.max(initial=0)), db_size) if rank_names else 0
        full = bool(rank_names) and depth >= db_size
        # one neighbour more than the depth: it shows whether the last tie group continues
        k = min(max(neighbours, 0 if full or not rank_names else depth + 1), db_size)
        return cls(rank_names, [n for n in names if n in PAIR_METRICS], full, k, num_pos, db_size, exclude)


def _ranks(plan: SearchPlan, neigh: Neighbours | None, queries: np.ndarray, query_labels: np.ndarray,
           database: np.ndarray, database_labels: np.ndarray,
           self_ids: np.ndarray | None) -> tuple[Ranks | None, str]:
    if not plan.rank_names:
        return None, "none (pair metrics only)"
    if plan.full:
        return full_ranks(queries, query_labels, database, database_labels, self_ids=self_ids), FULL_METHOD
    assert neigh is not None
    ranks = ranks_from_knn(neigh, query_labels, database_labels, exclude_self=plan.exclude_self)
    return ranks, f"faiss exact top-{neigh.ids.shape[1]} (ranks exact to depth {ranks.depth})"


def _assemble(plan: SearchPlan, values: dict[str, float], neigh: Neighbours | None, pairs: Pairs | None,
              method: str, num_queries: int) -> Evaluation:
    meta: dict[str, Any] = {"num_queries": num_queries, "num_database": plan.database_size,
                            "queries_without_positives": int((plan.num_positives <= 0).sum()), "ranking": method}
    roc = None
    if pairs is not None:
        values.update(metric_lib.pair_metrics(pairs.similarity, pairs.positive, plan.pair_names))
        meta.update(roc_pairs_sampled=pairs.sampled, roc_pairs=len(pairs.query),
                    roc_positive_pairs=int(pairs.positive.sum()), roc_negative_pairs=int((~pairs.positive).sum()))
        if pairs.positive.any() and (~pairs.positive).any():
            roc = metric_lib.roc_curve(pairs.similarity, pairs.positive)
    ordered = {name: values[name] for name in plan.rank_names + plan.pair_names if name in values}
    return Evaluation(ordered, meta, neigh, roc)


# ----------------------------------------------------------------------------- pairs for roc_auc and mean similarities


def sample_pairs(query_labels: np.ndarray, database_labels: np.ndarray, self_ids: np.ndarray | None,
                 max_pairs: int, seed: int) -> Pairs:
    """Every (query, item) pair when there are at most ``max_pairs``, else a seeded sample.

    The sample is stratified: half of it (or every positive pair, if fewer) drawn
    uniformly from the positive pairs, the rest uniformly from the negative pairs. The
    ROC curve and the two mean similarities are conditional on the class of a pair, so
    this estimates them without bias, and rare positives (many classes) still get half
    of the sample. A query is never paired with itself.
    """
    nq, nd = len(query_labels), len(database_labels)
    own = None if self_ids is None else np.asarray(self_ids, np.int64)
    total = nq * nd - (0 if own is None else nq)
    if total <= max_pairs:
        return _all_pairs(query_labels, database_labels, own)
    rng = np.random.default_rng(seed)
    from imret.search import LabelIndex

    index = LabelIndex.build(database_labels)
    start, count = index.slices(query_labels)
    own_pos = None if own is None else index.inverse[own]
    pos_per_query = count - (0 if own is None else 1)
    neg_per_query = nd - count
    n_pos = int(min(pos_per_query.sum(), max_pairs // 2))
    q_pos, x_pos = _draw(rng, pos_per_query, n_pos, lambda q, o: start[q] + _skip(o, start[q], own_pos, q))
    q_neg, x_neg = _draw(rng, neg_per_query, max_pairs - n_pos, lambda q, o: np.where(o < start[q], o, o + count[q]))
    query = np.concatenate([q_pos, q_neg])
    item = index.order[np.concatenate([x_pos, x_neg])]
    positive = np.r_[np.ones(len(q_pos), bool), np.zeros(len(q_neg), bool)]
    return Pairs(query, item, positive, True)


def _all_pairs(query_labels: np.ndarray, database_labels: np.ndarray, own: np.ndarray | None) -> Pairs:
    query = np.repeat(np.arange(len(query_labels)), len(database_labels))
    item = np.tile(np.arange(len(database_labels)), len(query_labels))
    if own is not None:
        keep = item != own[query]
        query, item = query[keep], item[keep]
    return Pairs(query, item, query_labels[query] == database_labels[item], False)


def _draw(rng: np.random.Generator, per_query: np.ndarray, n: int, position: Any) -> tuple[np.ndarray, np.ndarray]:
    """``n`` pairs uniform over all (query, j < per_query[query]); returns queries and label-order positions."""
    if n <= 0 or per_query.sum() <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    cum = np.cumsum(per_query)
    flat = np.sort(rng.integers(0, cum[-1], n))  # sorted: the pairs of one query stay together
    query = np.searchsorted(cum, flat, side="right")
    offset = flat - (cum[query] - per_query[query])
    return query.astype(np.int64), np.asarray(position(query, offset), np.int64)


def _skip(offset: np.ndarray, start: np.ndarray, own_pos: np.ndarray | None, query: np.ndarray) -> np.ndarray:
    """Offsets among a class's items with the query's own item left out."""
    if own_pos is None:
        return offset
    return offset + (start + offset >= own_pos[query])


def pair_similarities(queries: np.ndarray, database: np.ndarray, query: np.ndarray, item: np.ndarray,
                      id_offset: int = 0, chunk: int = 1 << 16) -> np.ndarray:
    """Inner products of the given pairs in float64 (``item`` global ids; ``database`` holds
    rows from ``id_offset``). Each pair's value depends only on its two vectors."""
    out = np.empty(len(query), np.float64)
    for lo in range(0, len(query), chunk):
        q = np.asarray(queries[query[lo:lo + chunk]], np.float64)
        x = np.asarray(database[item[lo:lo + chunk] - id_offset], np.float64)
        out[lo:lo + chunk] = np.einsum("ij,ij->i", q, x)
    return out


# ----------------------------------------------------------------------------- the stage


@dataclass
class StageInput:
    """What the evaluate stage searches, from the run's features."""

    query_split: str
    database_split: str
    query_rows: np.ndarray  # rows of the query split that are queries (all, or a seeded sample)
    self_ids: np.ndarray | None  # self-search: the queries' ids in the database (= query_rows)
    sampled: bool = False  # query_rows is a seeded sample (evaluate.sample_queries)


def stage_input(cfg: ExperimentConfig) -> StageInput:
    ev = cfg.evaluate
    self_search = not ev.database or ev.database == ev.query
    return StageInput(ev.query, ev.query if self_search else ev.database, np.zeros(0, np.int64),
                      np.zeros(0, np.int64) if self_search else None)


def _resolve_rows(cfg: ExperimentConfig, inp: StageInput, num_query_rows: int) -> StageInput:
    ev = cfg.evaluate
    chosen = _query_sample(num_query_rows, ev.sample_queries, ev.seed)
    rows = np.arange(num_query_rows) if chosen is None else chosen
    return StageInput(inp.query_split, inp.database_split, rows, rows if inp.self_ids is not None else None,
                      chosen is not None)


def _query_sample(n: int, size: int, seed: int) -> np.ndarray | None:
    if not size or size >= n:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def run(cfg: ExperimentConfig, run: RunDir, info: DistInfo) -> dict[str, Any]:
    """The evaluate stage (one process). With ``db_shards > 1`` it runs any shard task not
    done yet (an array job may have done them) and merges."""
    if not info.is_main:  # a single-process stage; extra ranks (if any) have nothing to do
        return {}
    if cfg.evaluate.db_shards > 1:
        return merge_shards(cfg, run, info, run_missing=True)
    ev = cfg.evaluate
    inp = stage_input(cfg)
    query = load_features(run, inp.query_split)
    inp = _resolve_rows(cfg, inp, len(query.labels))
    database = query if inp.self_ids is not None else load_features(run, inp.database_split)
    result = evaluate(query.embeddings[inp.query_rows], query.labels[inp.query_rows], database.embeddings,
                      database.labels, list(ev.metrics), self_ids=inp.self_ids, roc_pairs=ev.roc_pairs, seed=ev.seed)
    return finish(cfg, run, info, result, inp)


def finish(cfg: ExperimentConfig, run: RunDir, info: DistInfo, result: Evaluation, inp: StageInput) -> dict[str, Any]:
    """Write results.json, neighbours.npz, roc.npz and TensorBoard; print the table."""
    result.meta.update(experiment=cfg.name, config_digest=cfg.digest(), query_split=inp.query_split,
                       database_split=inp.database_split, sampled_queries=inp.sampled,
                       db_shards=cfg.evaluate.db_shards)
    if result.neighbours is not None:
        _save_neighbours(run, result.neighbours, inp.query_rows)
    if result.roc is not None:
        _save_roc(run, result.roc, result.meta)
    atomic_write_json(run.results, result.results())
    _to_tensorboard(cfg, run, info, result, inp)
    print_table(cfg.name, result)
    return dict(result.metrics)


GRID_QUERIES = 8  # queries shown in TensorBoard's retrieval grid
GRID_K = 8  # results per query in it
GRID_SIZE = 64  # pixels per tile
PROJECTOR_ITEMS = 500  # database items in the embedding projector
PROJECTOR_SIZE = 32  # pixels per projector thumbnail


def _to_tensorboard(cfg: ExperimentConfig, run: RunDir, info: DistInfo, result: Evaluation, inp: StageInput) -> None:
    from imret.tb import make_board

    board = make_board(info, run.tb)
    step = _trained_steps(run)
    board.scalars(result.metrics, step, prefix="eval/")
    board.hparams(_hparams(cfg), result.metrics)
    try:
        _pictures(board, cfg, run, result, inp, step)
    except (OSError, ValueError) as err:  # pictures are a courtesy: the numbers are already written
        print(f"evaluate: no TensorBoard images: {err}", flush=True)
    board.close()


def _pictures(board: Any, cfg: ExperimentConfig, run: RunDir, result: Evaluation, inp: StageInput, step: int) -> None:
    """A grid of a few queries with their top-k (green: same label, red: not), and a
    projector sample of the database with thumbnails, both decoded from the shards."""
    from imret.data.loader import decode_image
    from imret.data.shards import ShardSplit
    from imret.extract import load_feature_subset
    from imret.tb import grid, retrieval_rows, thumbnail

    qsplit = ShardSplit(cfg.data.root, inp.query_split)
    dsplit = qsplit if inp.database_split == inp.query_split else ShardSplit(cfg.data.root, inp.database_split)
    rng = np.random.default_rng(cfg.evaluate.seed)
    if result.neighbours is not None and len(inp.query_rows):
        shown = np.sort(rng.permutation(len(inp.query_rows))[:GRID_QUERIES])
        ids = [[int(i) for i in result.neighbours.ids[q, :GRID_K] if i >= 0] for q in shown]
        labels = [qsplit.labels[inp.query_rows[q]] for q in shown]
        rows = retrieval_rows([decode_image(qsplit, int(inp.query_rows[q])) for q in shown],
                              [[decode_image(dsplit, i) for i in row] for row in ids],
                              [[dsplit.labels[i] == label for i in row] for row, label in zip(ids, labels)], GRID_SIZE)
        board.image("eval/top_k", grid(rows), step)
    sample = np.sort(rng.permutation(len(dsplit))[:PROJECTOR_ITEMS])
    feats = load_feature_subset(run, inp.database_split, sample)
    names = dsplit.class_names
    meta = [names[int(label)] if 0 <= label < len(names) else str(int(label)) for label in feats.labels]
    thumbs = np.stack([thumbnail(decode_image(dsplit, int(i)), PROJECTOR_SIZE) for i in sample])
    board.embedding(feats.embeddings, meta, thumbs, tag=inp.database_split, step=step)


def _trained_steps(run: RunDir) -> int:
    from imret.checkpoint import Checkpointer, read_meta

    latest = Checkpointer(run.ckpt).latest()
    return int(read_meta(latest)["step"]) if latest else 0


def _hparams(cfg: ExperimentConfig) -> dict[str, Any]:
    return {
        "backbone": cfg.model.backbone, "embed_dim": cfg.model.embed_dim, "pool": cfg.model.pool,
        "loss": "+".join(t.name for t in cfg.loss.terms), "lr": cfg.optim.lr, "optimizer": cfg.optim.name,
        "batch_size": cfg.data.batch_size, "epochs": cfg.train.epochs, "image_size": cfg.data.image_size,
        "checkpoint": cfg.extract.checkpoint,
    }


def _save_neighbours(run: RunDir, neighbours: Neighbours, query_rows: np.ndarray) -> None:
    buf = io.BytesIO()
    k = min(SAVED_NEIGHBOURS, neighbours.ids.shape[1])
    np.savez(buf, ids=neighbours.ids[:, :k], scores=neighbours.scores[:, :k], queries=query_rows)
    atomic_write_bytes(run.eval / "neighbours.npz", buf.getvalue())


def _save_roc(run: RunDir, roc: RocCurve, meta: dict[str, Any]) -> None:
    buf = io.BytesIO()
    thin = roc.thinned(ROC_POINTS)
    np.savez(buf, fpr=thin.fpr, tpr=thin.tpr, thresholds=thin.thresholds, auc=roc.auc,
             sampled=meta.get("roc_pairs_sampled", False), pairs=meta.get("roc_pairs", 0))
    atomic_write_bytes(run.eval / "roc.npz", buf.getvalue())


def print_table(name: str, result: Evaluation) -> None:
    meta = result.meta
    print(f"evaluate: {name}: {meta['num_queries']} queries, {meta['num_database']} database items "
          f"({meta['queries_without_positives']} queries without positives left out)")
    for key, value in result.metrics.items():
        print(f"  {key:<14} {value:.4f}")
    if "roc_pairs" in meta:
        how = "a seeded sample of" if meta["roc_pairs_sampled"] else "all"
        print(f"  (pair metrics over {how} {meta['roc_pairs']} pairs)")


# ----------------------------------------------------------------------------- sharded over array tasks


def shard_path(run: RunDir, kind: str, task_index: int, num_tasks: int) -> Path:
    return run.eval / "shards" / f"{kind}-{task_index:04d}-of-{num_tasks:04d}.npz"


def needs_count_pass(cfg: ExperimentConfig) -> bool:
    """Whether a sharded evaluation needs pass 2 (``count_task``): the full-ranking ``map``."""
    return "map" in cfg.evaluate.metrics


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
    inp = stage_input(cfg)
    query = load_features(run, inp.query_split)
    inp = _resolve_rows(cfg, inp, len(query.labels))
    database_labels = query.labels if inp.self_ids is not None else load_labels(run, inp.database_split)[1]
    queries, query_labels = query.embeddings[inp.query_rows], query.labels[inp.query_rows]
    plan = SearchPlan.make(list(ev.metrics), query_labels, database_labels, inp.self_ids, SAVED_NEIGHBOURS)
    pairs = sample_pairs(query_labels, database_labels, inp.self_ids, ev.roc_pairs, ev.seed) if plan.pair_names else None
    return _ShardSetup(inp, queries, query_labels, database_labels, plan, pairs)


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
    neigh = search_shard(setup.queries, part.embeddings, lo, setup.plan.k, setup.inp.self_ids)
    out.update(scores=neigh.scores, ids=neigh.ids)
    if setup.plan.full:
        pos = positive_scores(setup.queries, setup.query_labels, part.embeddings, part.labels, lo, setup.inp.self_ids)
        out.update(pos_sizes=pos.sizes, pos_values=pos.values)
    if setup.pairs is not None:
        mine = np.flatnonzero((setup.pairs.item >= lo) & (setup.pairs.item < hi))
        out.update(pair_index=mine, pair_similarity=pair_similarities(
            setup.queries, part.embeddings, setup.pairs.query[mine], setup.pairs.item[mine], lo))
    _write_npz(path, out)
    return path


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
    _write_npz(path, {"config_digest": cfg.digest(), "negatives": counts})
    return path


def _load_shards(cfg: ExperimentConfig, run: RunDir, kind: str, num_tasks: int) -> list[dict[str, np.ndarray]]:
    paths = [shard_path(run, kind, i, num_tasks) for i in range(num_tasks)]
    missing = [i for i, p in enumerate(paths) if not _is_current(p, cfg)]
    if missing:
        step = "search_task" if kind == "topk" else "count_task"
        raise ValueError(f"evaluate: {kind} results of tasks {missing} of {num_tasks} are missing or from another "
                         f"config in {paths[0].parent}; run imret.evaluate.{step} for them first")
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
    result = _assemble(setup.plan, values, neigh, setup.pairs, method + f", over {n} database shards",
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
    ranks = ranks_from_knn(neigh, setup.query_labels, setup.database_labels, exclude_self=plan.exclude_self)
    return ranks, f"faiss exact top-{neigh.ids.shape[1]} (ranks exact to depth {ranks.depth})"


def _write_npz(path: Path, arrays: dict[str, Any]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())

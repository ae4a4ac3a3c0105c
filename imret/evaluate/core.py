"""Evaluation: every requested metric for a set of queries against a database.

``evaluate`` is a pure function of embeddings and labels; the search is injected, as
pytorch-metric-learning's ``AccuracyCalculator(knn_func=...)`` takes its k-NN: the
default ``ExactSearch`` is FAISS's exact top-k when the metrics need only a prefix of
each ranking, and imret's one-pass scan (``imret.search.scan``) when they need the full
ranking: the same blocked scores give every positive's rank and the top-k lists. A test
may pass a brute-force search and must get the same numbers. The metrics are pure
functions of the resulting ranks (``imret.metrics``), reduced block by block to one value
per query on the full-ranking path, so that no step holds every positive's rank; pair
metrics (roc_auc, mean similarities) come from sampled (query, item) pairs
(``imret.evaluate.pairs``), and the sketch
seed's triplet metrics from sampled (query, positive, negative) triples
(``imret.evaluate.triplets``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from imret import metrics as metric_lib
from imret.evaluate.pairs import Pairs, pair_similarities, sample_pairs
from imret.evaluate.triplets import sample_triples, triple_meta, triple_similarities
from imret.metrics import PAIR_METRICS, Ranks, RocCurve
from imret.search.blocks import DEFAULT_BLOCK_MB
from imret.search.knn import Neighbours, search_shard
from imret.search.ranks import positives_per_query, ranks_from_knn
from imret.search.scan import scan

SAVED_NEIGHBOURS = 100  # neighbours kept per query in eval/neighbours.npz
FULL_METHOD = "exact full ranking (blocked inner products, per-row cell counts; docs/evaluation.md)"


class Search(Protocol):
    """What ``evaluate`` asks of a search. ``self_ids``: the queries are database items
    (query i is item self_ids[i]), each left out of its own ranking."""

    def topk(self, queries: np.ndarray, database: np.ndarray, k: int, self_ids: np.ndarray | None) -> Neighbours:
        """Each query's top k (scores descending, equal scores by ascending id)."""
        ...

    def scan(self, queries: np.ndarray, query_labels: np.ndarray, database: np.ndarray,
             database_labels: np.ndarray, k: int, self_ids: np.ndarray | None,
             consume: Callable[[np.ndarray, Ranks], None]) -> Neighbours | None:
        """One pass over the database: the rank of every positive of every query in the full
        ranking, handed to ``consume(query_indices, ranks)`` block by block (possibly from
        several threads, for disjoint queries), and each query's top k as ``topk`` gives
        them (None when k is 0)."""
        ...


@dataclass
class ExactSearch:
    """FAISS exact inner-product top-k, and imret's exact one-pass scan (imret.search)."""

    device: str | None = None  # the scan's torch device; None: a GPU when there is one
    block_mb: float = DEFAULT_BLOCK_MB  # the scan's working set, all threads together (evaluate.block_mb)

    def topk(self, queries: np.ndarray, database: np.ndarray, k: int, self_ids: np.ndarray | None) -> Neighbours:
        return search_shard(queries, database, 0, k, self_ids)

    def scan(self, queries: np.ndarray, query_labels: np.ndarray, database: np.ndarray,
             database_labels: np.ndarray, k: int, self_ids: np.ndarray | None,
             consume: Callable[[np.ndarray, Ranks], None]) -> Neighbours | None:
        return scan(queries, query_labels, database, database_labels, k, self_ids, consume, self.block_mb,
                    self.device)


@dataclass
class Evaluation:
    metrics: dict[str, float]
    meta: dict[str, Any]
    neighbours: Neighbours | None = None
    roc: RocCurve | None = None

    def results(self) -> dict[str, Any]:
        """What results.json holds: the flat metric names, then ``meta``."""
        return {**self.metrics, "meta": self.meta}


def evaluate(queries: np.ndarray, query_labels: np.ndarray, database: np.ndarray | None,
             database_labels: np.ndarray | None, names: list[str], self_ids: np.ndarray | None = None,
             roc_pairs: int = 1_000_000, seed: int = 0, neighbours: int = SAVED_NEIGHBOURS,
             search: Search | None = None, triplet_batch: int = 64) -> Evaluation:
    """Every metric in ``names`` for the queries against the database.

    ``database=None``: the queries against themselves, each query left out of its own
    ranking. ``self_ids``: the queries are items of ``database`` (query i is item
    self_ids[i]), e.g. a sample of a split searched against the whole split.
    ``search``: how to search (default ``ExactSearch()``). ``triplet_batch``: triples per
    batch of the in-batch metrics (the sketch seed's 64).
    """
    if database is None:
        database, database_labels, self_ids = queries, query_labels, np.arange(len(queries))
    assert database_labels is not None
    search = search or ExactSearch()
    check_inputs(queries, query_labels, database, database_labels)
    plan = SearchPlan.make(names, query_labels, database_labels, self_ids, neighbours)
    if plan.full:
        per_query = PerQuery(plan.rank_names, len(query_labels))
        neigh = search.scan(queries, query_labels, database, database_labels, plan.k, self_ids, per_query.add)
        values, method = per_query.means(plan.num_positives > 0), FULL_METHOD
    else:
        neigh = search.topk(queries, database, plan.k, self_ids) if plan.k else None
        values, method = _topk_values(plan, neigh, query_labels, database_labels)
    pairs = sample_pairs(query_labels, database_labels, self_ids, roc_pairs, seed) if plan.pair_names else None
    if pairs is not None:
        pairs.similarity = pair_similarities(queries, database, pairs.query, pairs.item)
    result = assemble(plan, values, neigh, pairs, method, len(query_labels))
    if plan.triplet_names:
        add_triplet_metrics(result, plan.triplet_names, queries, query_labels, database, database_labels,
                            self_ids, triplet_batch, seed)
    return result


def add_triplet_metrics(result: Evaluation, names: list[str], queries: np.ndarray, query_labels: np.ndarray,
                        database: np.ndarray, database_labels: np.ndarray, self_ids: np.ndarray | None,
                        batch: int, seed: int) -> None:
    """The sketch seed's in-batch metrics over seeded triples, added to ``result`` after its other metrics."""
    triples = sample_triples(query_labels, database_labels, self_ids, batch, seed)
    cross, negative = triple_similarities(queries, database, triples)
    shape = cross.shape[:2]
    values = metric_lib.triplet_metrics(cross, negative, query_labels[triples.query].reshape(shape),
                                        database_labels[triples.positive].reshape(shape), names)
    result.metrics.update(values)
    result.meta.update(triple_meta(triples))


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
    triplet_names: list[str]
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
        triplet_names = [n for n in names if metric_lib.is_triplet_metric(n)]
        rank_names = [n for n in names if n not in PAIR_METRICS and n not in triplet_names]
        depth = metric_lib.depth_needed(rank_names, int(num_pos.max(initial=0)), db_size) if rank_names else 0
        full = bool(rank_names) and depth >= db_size
        # one neighbour more than the depth: it shows whether the last tie group continues
        k = min(max(neighbours, 0 if full or not rank_names else depth + 1), db_size)
        return cls(rank_names, [n for n in names if n in PAIR_METRICS], triplet_names, full, k, num_pos, db_size,
                   exclude)


class PerQuery:
    """Every rank metric's value per query, filled block by block from the blocks' ``Ranks``."""

    def __init__(self, names: list[str], num_queries: int) -> None:
        self.names = names
        self.values = {name: np.full(num_queries, np.nan) for name in names if name not in PAIR_METRICS}

    def add(self, queries: np.ndarray, ranks: Ranks) -> None:
        # blocks hold disjoint queries, so threads write disjoint entries
        for name, value in metric_lib.per_query(ranks, self.names).items():
            self.values[name][queries] = value

    def means(self, valid: np.ndarray) -> dict[str, float]:
        """``metric_lib.compute``'s numbers: means over the queries that have a positive."""
        return {name: float(v[valid].mean()) if valid.any() else float("nan") for name, v in self.values.items()}


def _topk_values(plan: SearchPlan, neigh: Neighbours | None, query_labels: np.ndarray,
                 database_labels: np.ndarray) -> tuple[dict[str, float], str]:
    if not plan.rank_names:
        return {}, "none (pair metrics only)"
    assert neigh is not None
    ranks, method = knn_ranks(plan, neigh, query_labels, database_labels)
    return metric_lib.compute(ranks, plan.rank_names), method


def knn_ranks(plan: SearchPlan, neigh: Neighbours, query_labels: np.ndarray,
              database_labels: np.ndarray) -> tuple[Ranks, str]:
    """Ranks from top-k lists, and how they were found."""
    ranks = ranks_from_knn(neigh, query_labels, database_labels, exclude_self=plan.exclude_self)
    return ranks, f"faiss exact top-{neigh.ids.shape[1]} (ranks exact to depth {ranks.depth})"


def assemble(plan: SearchPlan, values: dict[str, float], neigh: Neighbours | None, pairs: Pairs | None,
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

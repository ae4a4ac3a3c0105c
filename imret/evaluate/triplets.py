"""(query, positive, negative) triples for the sketch seed's validation figures (``inbatch_topK`` and the
triplet cosines of ``imret.metrics.triplet_metrics``).

The sketch seed validates on triples: each query (a photo) with a random sketch of its
class as positive and a random sketch of another class as negative, in shuffled batches
of 64 with the last partial batch dropped (its val and test DataLoaders:
``batch_size=64, shuffle=True, drop_last=True``). imret draws the same from the run's
features: every query that has a positive and a negative in the database, in a seeded
order, one uniform positive and one uniform negative each, cut into batches of
``evaluate.triplet_batch`` with the remainder dropped. A query is never its own positive.
The cosines are computed here on the rows involved, in float64, so they are cosines also
for features stored without normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from imret.search.ranks import LabelIndex


@dataclass
class Triples:
    """Triples in batch order: ``query`` indexes the queries, ``positive`` / ``negative`` the database."""

    query: np.ndarray
    positive: np.ndarray
    negative: np.ndarray
    batch: int
    usable: int  # queries with a positive and a negative, before the remainder was dropped


def sample_triples(query_labels: np.ndarray, database_labels: np.ndarray, self_ids: np.ndarray | None,
                   batch: int, seed: int) -> Triples:
    """One seeded positive and negative for each usable query, in seeded batches of ``batch``."""
    if batch < 1:
        raise ValueError(f"evaluate.triplet_batch must be >= 1, got {batch}")
    index = LabelIndex.build(database_labels)
    start, count = index.slices(query_labels)
    own_pos = None if self_ids is None else index.inverse[np.asarray(self_ids, np.int64)]
    n_pos = count - (0 if own_pos is None else 1)
    n_neg = len(database_labels) - count
    usable = np.flatnonzero((n_pos > 0) & (n_neg > 0))
    rng = np.random.default_rng([seed, 3])
    order = rng.permutation(usable)
    order = order[: len(order) // batch * batch]
    offset = (rng.random(len(order)) * n_pos[order]).astype(np.int64)
    if own_pos is not None:  # skip the query's own item inside its class's slice
        offset = offset + (start[order] + offset >= own_pos[order])
    positive = index.order[start[order] + offset]
    neg = (rng.random(len(order)) * n_neg[order]).astype(np.int64)
    negative = index.order[np.where(neg < start[order], neg, neg + count[order])]
    return Triples(order.astype(np.int64), positive.astype(np.int64), negative.astype(np.int64), batch, len(usable))


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, np.float64)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def triple_similarities(queries: np.ndarray, database: np.ndarray, triples: Triples) -> tuple[np.ndarray, np.ndarray]:
    """``cross[b, i, j]`` = cos(query i, positive j) within batch b, and ``negative[b, i]`` = cos(query i, its negative)."""
    b = triples.batch
    q = _unit(queries[triples.query]).reshape(-1, b, queries.shape[1])
    p = _unit(database[triples.positive]).reshape(-1, b, queries.shape[1])
    n = _unit(database[triples.negative]).reshape(-1, b, queries.shape[1])
    return np.einsum("bid,bjd->bij", q, p), np.einsum("bid,bid->bi", q, n)


def triple_meta(triples: Triples) -> dict[str, Any]:
    return {"triplet_batch": triples.batch, "triplet_batches": len(triples.query) // triples.batch,
            "triplet_queries_usable": triples.usable}

"""What the evaluate stage searches: the query and database splits, read from the run's features.

The queries are the query split's rows, or a seeded sample of them
(``evaluate.sample_queries``); an empty ``evaluate.database`` (or the query split's
name) searches the query split against itself, each query left out of its own ranking.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from imret.config import ExperimentConfig
from imret.features import load_features, load_labels
from imret.rundir import RunDir


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


@dataclass
class Inputs:
    """The stage's queries (embeddings and labels) and its database, read from the run's features."""

    split: StageInput
    queries: np.ndarray
    query_labels: np.ndarray
    database: np.ndarray | None  # None when not read (a sharded evaluation reads it task by task)
    database_labels: np.ndarray


def load_inputs(cfg: ExperimentConfig, run: RunDir, database_embeddings: bool = True) -> Inputs:
    """The queries (all, or the seeded sample) and the database of the evaluate stage."""
    inp = stage_input(cfg)
    query = load_features(run, inp.query_split)
    inp = _resolve_rows(cfg, inp, len(query.labels))
    if inp.self_ids is not None:
        database, database_labels = query.embeddings, query.labels
    elif database_embeddings:
        db = load_features(run, inp.database_split)
        database, database_labels = db.embeddings, db.labels
    else:
        database, database_labels = None, load_labels(run, inp.database_split)[1]
    return Inputs(inp, query.embeddings[inp.query_rows], query.labels[inp.query_rows],
                  database if database_embeddings else None, database_labels)

"""The evaluate stage: search the database for every query of a run and score the rankings.

Writes ``runs/<exp>/eval/``:

- ``results.json``: every metric under its flat name (``map``, ``recall@1``, ...) plus
  ``meta`` (counts, config digest, how the ranks were found, how pairs were sampled);
- ``neighbours.npz``: each query's top-k ids and scores, for the tools;
- ``roc.npz``: the ROC curve of pair similarities, when ``roc_auc`` is asked for;

and TensorBoard (``imret.evaluate.pictures``). With ``evaluate.db_shards > 1`` the
search is split over array tasks and merged (``imret.evaluate.sharded``).
"""

from __future__ import annotations

from typing import Any

from imret.config import ExperimentConfig
from imret.distributed import DistInfo
from imret.evaluate.core import ExactSearch, evaluate
from imret.evaluate.inputs import load_inputs
from imret.evaluate.results import finish
from imret.evaluate.sharded import merge_shards
from imret.rundir import RunDir


def evaluate_stage(cfg: ExperimentConfig, run: RunDir, info: DistInfo) -> dict[str, Any]:
    """The evaluate stage (one process). With ``db_shards > 1`` it runs any shard task not
    done yet (an array job may have done them) and merges."""
    if not info.is_main:  # a single-process stage; extra ranks (if any) have nothing to do
        return {}
    if cfg.evaluate.db_shards > 1:
        return merge_shards(cfg, run, info, run_missing=True)
    ev = cfg.evaluate
    data = load_inputs(cfg, run)
    result = evaluate(data.queries, data.query_labels, data.database, data.database_labels, list(ev.metrics),
                      self_ids=data.split.self_ids, roc_pairs=ev.roc_pairs, seed=ev.seed,
                      triplet_batch=ev.triplet_batch, search=ExactSearch(block_mb=ev.block_mb))
    return finish(cfg, run, info, result, data.split)

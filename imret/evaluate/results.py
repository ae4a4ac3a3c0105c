"""What an evaluation leaves behind: results.json, neighbours.npz, roc.npz, TensorBoard, a printed table."""

from __future__ import annotations

from typing import Any

import numpy as np

from imret.config import ExperimentConfig
from imret.distributed import DistInfo
from imret.evaluate.core import SAVED_NEIGHBOURS, Evaluation
from imret.evaluate.inputs import StageInput
from imret.evaluate.pictures import to_tensorboard
from imret.metrics import RocCurve
from imret.rundir import RunDir, atomic_write_json, atomic_write_npz
from imret.search.knn import Neighbours

ROC_POINTS = 2000  # points of the ROC curve kept in eval/roc.npz (the AUC uses every pair)


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
    to_tensorboard(cfg, run, info, result, inp)
    print_table(cfg.name, result)
    return dict(result.metrics)


def _save_neighbours(run: RunDir, neighbours: Neighbours, query_rows: np.ndarray) -> None:
    k = min(SAVED_NEIGHBOURS, neighbours.ids.shape[1])
    atomic_write_npz(run.eval / "neighbours.npz", ids=neighbours.ids[:, :k], scores=neighbours.scores[:, :k],
                     queries=query_rows)


def _save_roc(run: RunDir, roc: RocCurve, meta: dict[str, Any]) -> None:
    thin = roc.thinned(ROC_POINTS)
    atomic_write_npz(run.eval / "roc.npz", fpr=thin.fpr, tpr=thin.tpr, thresholds=thin.thresholds, auc=roc.auc,
                     sampled=meta.get("roc_pairs_sampled", False), pairs=meta.get("roc_pairs", 0))


def print_table(name: str, result: Evaluation) -> None:
    meta = result.meta
    print(f"evaluate: {name}: {meta['num_queries']} queries, {meta['num_database']} database items "
          f"({meta['queries_without_positives']} queries without positives left out)")
    for key, value in result.metrics.items():
        print(f"  {key:<14} {value:.4f}")
    if "roc_pairs" in meta:
        how = "a seeded sample of" if meta["roc_pairs_sampled"] else "all"
        print(f"  (pair metrics over {how} {meta['roc_pairs']} pairs)")

"""TensorBoard for an evaluation: the metrics, an hparams entry, a retrieval grid and a projector.

The pictures are decoded from the shards: a few queries with their top-k results
(green: same label, red: not) and a sample of the database with thumbnails.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from imret.checkpoint import latest_step
from imret.config import ExperimentConfig
from imret.data.loader import decode_image
from imret.data.shards import ShardSplit
from imret.distributed import DistInfo
from imret.evaluate.core import Evaluation
from imret.evaluate.inputs import StageInput
from imret.features import load_feature_subset
from imret.rundir import RunDir
from imret.tb import grid, make_board, retrieval_rows, thumbnail

GRID_QUERIES = 8  # queries shown in TensorBoard's retrieval grid
GRID_K = 8  # results per query in it
GRID_SIZE = 64  # pixels per tile
PROJECTOR_ITEMS = 500  # database items in the embedding projector
PROJECTOR_SIZE = 32  # pixels per projector thumbnail


def to_tensorboard(cfg: ExperimentConfig, run: RunDir, info: DistInfo, result: Evaluation, inp: StageInput) -> None:
    board = make_board(info, run.tb)
    step = latest_step(run)
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


def _hparams(cfg: ExperimentConfig) -> dict[str, Any]:
    return {
        "backbone": cfg.model.backbone, "embed_dim": cfg.model.embed_dim, "pool": cfg.model.pool,
        "loss": "+".join(t.name for t in cfg.loss.terms), "lr": cfg.optim.lr, "optimizer": cfg.optim.name,
        "batch_size": cfg.data.batch_size, "epochs": cfg.train.epochs, "image_size": cfg.data.image_size,
        "checkpoint": cfg.extract.checkpoint,
    }

"""Checkpoint selection: validation during training, the best checkpoint, early stopping.

The REIR and PSS seeds evaluate on a held-out split every few epochs and keep the
checkpoint with the best Recall@1; the sketch seed stops when its validation metric
has not improved for a while. ``train.validation`` expresses both. At the end of every
epoch it names (``due``), the trainer validates before it saves the epoch-end
checkpoint:

- every rank embeds its part of the validation splits with the current weights,
  through the extract stage's own machinery, into ``train/validation/`` (overwritten
  each time);
- rank 0 scores them with ``imret.evaluate.core.evaluate`` and broadcasts the value;
- every rank updates the same ``Selection`` (best value, its step, the validations
  without improvement since) and the checkpoint saved next carries it in its
  ``meta.json``.

So a requeued job resumes with the selection of the checkpoint it resumes from, and
a run interrupted anywhere ends with the same choice as one that was not: an
interruption during a validation resumes from an earlier checkpoint and validates
again, with the same weights. ``imret.checkpoint`` never prunes the best checkpoint,
and ``extract.checkpoint: best`` finds it through the newest checkpoint's metadata.

Validation does not disturb training: the RNG states are restored after it, and the
ranks' BatchNorm statistics are first made rank 0's (those the checkpoint saves, which
DDP would broadcast at the next step anyway).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from imret.config import ExperimentConfig
from imret.config.schema import ValidationConfig
from imret.distributed import DistInfo, barrier, broadcast_object
from imret.models.embedding import EmbeddingNet
from imret.rundir import RunDir


@dataclass
class Selection:
    """Where the selection stands; stored in every checkpoint's metadata."""

    best: float | None = None
    best_step: int = -1  # global step of the best checkpoint (an epoch end); -1: none yet
    best_epoch: int = 0
    bad: int = 0  # validations in a row without a strict improvement
    stopped: bool = False  # patience ran out: training is over
    history: list[list[float]] = field(default_factory=list)  # [epoch, value] of every validation

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Selection:
        return cls(**meta["selection"]) if "selection" in meta else cls()

    def to_meta(self) -> dict[str, Any]:
        return asdict(self)

    def record(self, val: ValidationConfig, epoch: int, step: int, value: float) -> bool:
        """Take one validation's value; True when it is a new best."""
        self.history.append([epoch, value])
        if better(val.mode, value, self.best):
            self.best, self.best_step, self.best_epoch, self.bad = value, step, epoch, 0
            return True
        self.bad += 1
        self.stopped = bool(val.patience) and self.bad >= val.patience
        return False


def due(val: ValidationConfig, epoch: int) -> bool:
    """Whether the end of ``epoch`` (1-based) is validated: ``first``, then every ``every`` epochs."""
    if not val.every:
        return False
    first = val.first or val.every
    return epoch >= first and (epoch - first) % val.every == 0


def better(mode: str, value: float, best: float | None) -> bool:
    """A strict improvement (as the seeds keep a checkpoint only when R@1 beats every earlier one)."""
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value > best if mode == "max" else value < best


def validation_run(run: RunDir) -> RunDir:
    """Where validation embeddings go: a run-like directory inside the train stage's."""
    return RunDir(run.root / "train" / "validation")


def validate(cfg: ExperimentConfig, run: RunDir, info: DistInfo, model: EmbeddingNet, epoch: int) -> float:
    """The validation metric of ``model`` now, on every rank (a collective: every rank must call it)."""
    val = cfg.train.validation
    vrun = validation_run(run)
    if info.is_main and vrun.root.exists():
        shutil.rmtree(vrun.root)  # the previous validation's embeddings: never reused
    barrier(info)
    _sync_buffers(model, info)
    devices = [info.device] if info.device.type == "cuda" else []
    was_training = model.training
    with torch.random.fork_rng(devices=devices):
        model.eval()
        try:
            _embed_splits(cfg, vrun, info, model, epoch)
        finally:
            model.train(was_training)
    value = _score(cfg, vrun) if info.is_main else None
    return float(broadcast_object(value, info))  # type: ignore[arg-type]


def _embed_splits(cfg: ExperimentConfig, vrun: RunDir, info: DistInfo, model: EmbeddingNet, epoch: int) -> None:
    from imret.extract import extract_split  # late: the extract stage's machinery, only when validating

    val = cfg.train.validation
    for split in dict.fromkeys(s for s in (val.query, val.database) if s):
        extract_split(cfg, vrun, info, model, f"validation after epoch {epoch}", split)


def _score(cfg: ExperimentConfig, vrun: RunDir) -> float:
    """The metric on rank 0, with the evaluate section's sampling settings (pairs, seed, triplet batches) and
    memory budget (block_mb)."""
    from imret.evaluate.core import ExactSearch, evaluate
    from imret.features import load_features

    val, ev = cfg.train.validation, cfg.evaluate
    queries = load_features(vrun, val.query)
    database = load_features(vrun, val.database) if val.database and val.database != val.query else None
    result = evaluate(queries.embeddings, queries.labels, database.embeddings if database else None,
                      database.labels if database else None, [val.metric], roc_pairs=ev.roc_pairs, seed=ev.seed,
                      neighbours=0, triplet_batch=ev.triplet_batch, search=ExactSearch(block_mb=ev.block_mb))
    return float(result.metrics.get(val.metric, float("nan")))


def _sync_buffers(model: torch.nn.Module, info: DistInfo) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank, so each rank embeds with the saved model."""
    if info.distributed:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)

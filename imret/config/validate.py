"""Rules that involve several fields of a config, checked at load, before anything is submitted.

Only rules that the config itself can decide live here (a batch that divides into
P x K, stages in order, one rank per GPU). Rules that need a component's knowledge
(a loss's parameters, a metric's name, a timm model, a cluster method) are that
component's own ``check`` and are asked by ``imret.checks``, one floor up, so that
this package imports no component.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path

from imret.config.errors import ConfigError
from imret.config.schema import (
    STAGE_ORDER, DataConfig, EvaluateConfig, ExperimentConfig, ModelConfig, ResourcesConfig, ScheduleConfig,
    TrainConfig,
)


def closest(key: str, valid: Iterable[str]) -> str:
    """"did you mean 'x'? " for the nearest of ``valid``, or nothing."""
    matches = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"did you mean '{matches[0]}'? " if matches else ""


def validate(cfg: ExperimentConfig) -> None:
    """Every cross-field rule of the config; ConfigError naming the fix."""
    _validate_stages(cfg.stages)
    _validate_data(cfg.data)
    if "train" in cfg.stages and not cfg.loss.terms:
        raise ConfigError("loss.terms: the train stage needs at least one loss term")
    _validate_model(cfg.model)
    _validate_evaluate(cfg.evaluate)
    _validate_resources(cfg.resources)
    _validate_schedule(cfg.schedule, cfg.train)
    if cfg.optim.accumulate < 1:
        raise ConfigError(f"optim.accumulate: must be >= 1, got {cfg.optim.accumulate}")


def _validate_stages(stages: list[str]) -> None:
    for stage in stages:
        if stage not in STAGE_ORDER:
            raise ConfigError(f"stages: unknown stage '{stage}'; {closest(stage, STAGE_ORDER)}"
                              f"stages are {', '.join(STAGE_ORDER)}")
    order = [STAGE_ORDER.index(s) for s in stages]
    if order != sorted(order) or len(set(order)) != len(order):
        raise ConfigError(f"stages: {stages} must be distinct and in the order {', '.join(STAGE_ORDER)}")


def _validate_data(data: DataConfig) -> None:
    if data.batch_size < 1:
        raise ConfigError(f"data.batch_size: must be positive, got {data.batch_size}")
    if data.sampler == "pk":
        k = data.samples_per_class
        if k < 1 or data.batch_size % k:
            raise ConfigError(
                f"data.batch_size ({data.batch_size}) must be divisible by data.samples_per_class ({k}): "
                f"a P x K batch holds P classes of K samples each. Try batch_size={max(k, data.batch_size // max(k, 1) * k)}."
            )
    if data.sampler == "triplet" and not (data.anchor_modality and data.positive_modality):
        raise ConfigError("data.sampler=triplet needs data.anchor_modality and data.positive_modality (e.g. sketch, photo)")
    if data.sampler == "triplet" and data.batch_size % 3:
        raise ConfigError(f"data.batch_size ({data.batch_size}) must divide by 3: a triplet batch holds whole "
                          f"(anchor, positive, negative) triples")
    if len(data.crop_scale) != 2 or not 0 < data.crop_scale[0] <= data.crop_scale[1] <= 1:
        raise ConfigError(f"data.crop_scale: expected [low, high] with 0 < low <= high <= 1, got {data.crop_scale}")
    if len(data.mean) not in (0, 3) or len(data.std) not in (0, 3):
        raise ConfigError("data.mean / data.std: give three values (RGB) or leave empty for the backbone's own")
    if not data.train_splits:
        raise ConfigError("data.train_splits: name at least one split to train on")


def _validate_model(model: ModelConfig) -> None:
    if model.embed_dim < 0:
        raise ConfigError(f"model.embed_dim: must be >= 0, got {model.embed_dim}")
    if model.pretrained_path and not Path(model.pretrained_path).is_file():
        raise ConfigError(
            f"model.pretrained_path: {model.pretrained_path} does not exist. imret never downloads weights: "
            "save them locally (e.g. a timm .safetensors file) and give its path, or leave it empty for random init."
        )


def _validate_evaluate(ev: EvaluateConfig) -> None:
    if ev.db_shards < 1:
        raise ConfigError(f"evaluate.db_shards: must be >= 1, got {ev.db_shards}")
    if not ev.block_mb > 0:
        raise ConfigError(f"evaluate.block_mb: the scan's memory budget must be a positive number of MiB, "
                          f"got {ev.block_mb}; the default is 512")


def _validate_resources(res: ResourcesConfig) -> None:
    if res.gpus_per_node and res.tasks_per_node not in (0, res.gpus_per_node):
        raise ConfigError(
            f"resources.tasks_per_node ({res.tasks_per_node}) must equal resources.gpus_per_node "
            f"({res.gpus_per_node}): imret runs one rank per GPU. Leave tasks_per_node at 0."
        )
    for key, value in (("nodes", res.nodes), ("local_ranks", res.local_ranks), ("time_min", res.time_min)):
        if value < 1:
            raise ConfigError(f"resources.{key}: must be >= 1, got {value}")
    for stage in res.stages:
        if stage not in STAGE_ORDER:
            raise ConfigError(f"resources.stages: unknown stage '{stage}'; {closest(stage, STAGE_ORDER)}"
                              f"stages are {', '.join(STAGE_ORDER)}")


def _validate_schedule(sched: ScheduleConfig, train: TrainConfig) -> None:
    if sched.milestones != sorted(sched.milestones):
        raise ConfigError(f"schedule.milestones: must be increasing, got {sched.milestones}")
    if sched.name == "multistep" and not sched.milestones:
        raise ConfigError("schedule.milestones: the multistep schedule needs at least one epoch")
    if train.epochs < 1:
        raise ConfigError(f"train.epochs: must be >= 1, got {train.epochs}")

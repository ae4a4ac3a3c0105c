"""Rules that involve several fields of a config, checked at load, before anything is submitted.

Only rules that the config itself can decide live here (a batch that divides into
P x K, stages in order, one rank per GPU, numbers in range, safe names). Rules that need a component's knowledge
(a loss's parameters, a metric's name, a timm model, a cluster method) are that
component's own ``check`` and are asked by ``imret.checks``, one floor up, so that
this package imports no component.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from imret.config.errors import ConfigError
from imret.config.names import check_name, check_run_name
from imret.config.schema import (STAGE_ORDER, DataConfig, EvaluateConfig, ExperimentConfig, ModelConfig, ResourcesConfig,
                                 ScheduleConfig)


def closest(key: str, valid: Iterable[str]) -> str:
    """"did you mean 'x'? " for the nearest of ``valid``, or nothing."""
    matches = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"did you mean '{matches[0]}'? " if matches else ""


# Lower bounds (inclusive) of numeric fields: a value below one would run and produce nothing (0 steps, no
# batches) or nonsense, and a stage that produced nothing must not be marked done. NaN and inf are refused too.
_AT_LEAST: dict[str, float] = {
    "data.image_size": 1, "data.batch_size": 1, "data.samples_per_class": 1, "data.max_per_class": 0,
    "data.steps_per_epoch": 0, "data.num_workers": 0,
    "model.gem_p": 1e-6, "model.embed_dim": 0, "model.ensemble.branches": 0, "model.ensemble.meta_class_size": 1,
    "optim.lr": 0, "optim.weight_decay": 0, "optim.momentum": 0, "optim.head_lr_mult": 0, "optim.grad_clip": 0,
    "optim.accumulate": 1,
    "schedule.step_size": 1, "schedule.gamma": 0, "schedule.warmup_epochs": 0, "schedule.min_lr": 0,
    "train.epochs": 1, "train.checkpoint_every": 0, "train.keep_checkpoints": 1, "train.log_every": 1,
    "train.max_steps": 0,
    "extract.batch_size": 1, "extract.num_workers": 0,
    "evaluate.sample_queries": 0, "evaluate.db_shards": 1, "evaluate.roc_pairs": 1, "evaluate.triplet_batch": 1,
    "cluster.k": 1, "cluster.min_size": 1, "cluster.exact_below": 0, "cluster.recall_sample": 0, "cluster.levels": 1,
    "resources.nodes": 1, "resources.gpus_per_node": 0, "resources.tasks_per_node": 0, "resources.cpus_per_task": 1,
    "resources.mem_gb": 0, "resources.time_min": 1, "resources.signal_delay_s": 0, "resources.max_requeues": 0,
    "resources.local_ranks": 1, "resources.dist_timeout_s": 1,
    "sweep.array_parallelism": 1,
    "data.eval_resize": 0, "model.bn_momentum": 0,
    "train.validation.every": 0, "train.validation.first": 0, "train.validation.patience": 0,
    "cluster.hilander.hidden": 2, "cluster.hilander.num_conv": 1, "cluster.hilander.epochs": 1,
    "cluster.hilander.lr": 0, "cluster.hilander.momentum": 0, "cluster.hilander.weight_decay": 0,
    "cluster.hilander.batch_size": 1, "cluster.hilander.eta_min": 0,
}
_STAGE_AT_LEAST = {"nodes": 1, "gpus_per_node": 0, "tasks_per_node": 0, "cpus_per_task": 1, "mem_gb": 0, "time_min": 1}


def validate(cfg: ExperimentConfig) -> None:
    """Every cross-field rule of the config; ConfigError naming the fix."""
    _validate_names(cfg)
    _validate_ranges(cfg)
    _validate_stages(cfg.stages)
    _validate_data(cfg.data)
    if "train" in cfg.stages and not cfg.loss.terms:
        raise ConfigError("loss.terms: the train stage needs at least one loss term")
    _validate_model(cfg.model)
    _validate_evaluate(cfg.evaluate)
    _validate_resources(cfg.resources)
    _validate_schedule(cfg.schedule)
    _validate_weights(cfg)
    _validate_validation(cfg)


def _validate_names(cfg: ExperimentConfig) -> None:
    if cfg.name:
        check_name(cfg.name, "experiment name")
    if cfg.run.name:
        check_run_name(cfg.run.name, "run.name")
    for where, split in _split_names(cfg):
        if split:  # empty: "not set" (the query split searched against itself, or the evaluate stage's splits)
            check_name(split, where)
    res = cfg.resources
    for key in ("partition", "account", "qos", "constraint", "exclude"):
        value = getattr(res, key)
        if any(ch in value for ch in "\n\r\0") or value != value.strip():
            raise ConfigError(f"resources.{key}: {value!r} holds a line break or surrounding blanks; it becomes an "
                              f"#SBATCH line, so give the bare value")


def _split_names(cfg: ExperimentConfig) -> list[tuple[str, str]]:
    """Every split name with its field: each becomes a directory under data.root and the run directory."""
    single = [("evaluate.query", cfg.evaluate.query), ("evaluate.database", cfg.evaluate.database),
              ("train.validation.query", cfg.train.validation.query),
              ("train.validation.database", cfg.train.validation.database)]
    lists = {"data.train_splits": cfg.data.train_splits, "extract.splits": cfg.extract.splits,
             "cluster.splits": cfg.cluster.splits, "cluster.labelled": cfg.cluster.labelled}
    return single + [(f"{where}[{i}]", s) for where, names in lists.items() for i, s in enumerate(names)]


def _check_at_least(where: str, value: float, low: float) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: must be a finite number, got {value}")
    if value < low:
        raise ConfigError(f"{where}: must be >= {low:g}, got {value}")


def _validate_ranges(cfg: ExperimentConfig) -> None:
    for where, low in _AT_LEAST.items():
        value: Any = cfg
        for part in where.split("."):
            value = getattr(value, part)
        _check_at_least(where, value, low)
    for stage, override in cfg.resources.stages.items():
        for key, low in _STAGE_AT_LEAST.items():
            if getattr(override, key) is not None:
                _check_at_least(f"resources.stages.{stage}.{key}", getattr(override, key), low)
    if cfg.optim.momentum >= 1 or not all(0 <= b < 1 for b in cfg.optim.betas) or len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.momentum / optim.betas: expected values in [0, 1) (two betas), got "
                          f"{cfg.optim.momentum} / {cfg.optim.betas}")
    if any(m < 0 for m in cfg.schedule.milestones):
        raise ConfigError(f"schedule.milestones: epochs must be >= 0, got {cfg.schedule.milestones}")


def _validate_stages(stages: list[str]) -> None:
    for stage in stages:
        if stage not in STAGE_ORDER:
            raise ConfigError(f"stages: unknown stage '{stage}'; {closest(stage, STAGE_ORDER)}"
                              f"stages are {', '.join(STAGE_ORDER)}")
    order = [STAGE_ORDER.index(s) for s in stages]
    if order != sorted(order) or len(set(order)) != len(order):
        raise ConfigError(f"stages: {stages} must be distinct and in the order {', '.join(STAGE_ORDER)}")


def _validate_data(data: DataConfig) -> None:
    if data.sampler in ("pk", "pid_shuffle"):
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
    if model.pretrained_path and not Path(model.pretrained_path).is_file():
        raise ConfigError(
            f"model.pretrained_path: {model.pretrained_path} does not exist. imret never downloads weights: "
            "save them locally (e.g. a timm .safetensors file) and give its path, or leave it empty for random init."
        )


def _validate_evaluate(ev: EvaluateConfig) -> None:
    # db_shards and the other counts are in _AT_LEAST; the budget is a real number that must exceed 0 strictly
    if not (ev.block_mb > 0 and math.isfinite(ev.block_mb)):
        raise ConfigError(f"evaluate.block_mb: the scan's memory budget must be a positive number of MiB, "
                          f"got {ev.block_mb}; the default is 512")


def _validate_resources(res: ResourcesConfig) -> None:
    if res.gpus_per_node and res.tasks_per_node not in (0, res.gpus_per_node):
        raise ConfigError(
            f"resources.tasks_per_node ({res.tasks_per_node}) must equal resources.gpus_per_node "
            f"({res.gpus_per_node}): imret runs one rank per GPU. Leave tasks_per_node at 0."
        )
    for stage in res.stages:
        if stage not in STAGE_ORDER:
            raise ConfigError(f"resources.stages: unknown stage '{stage}'; {closest(stage, STAGE_ORDER)}"
                              f"stages are {', '.join(STAGE_ORDER)}")


def _validate_schedule(sched: ScheduleConfig) -> None:
    if sched.milestones != sorted(sched.milestones):
        raise ConfigError(f"schedule.milestones: must be increasing, got {sched.milestones}")
    if sched.name == "multistep" and not sched.milestones:
        raise ConfigError("schedule.milestones: the multistep schedule needs at least one epoch")


# a module name (patch_embed, layer1.0), optionally ending in a numbered range of children (blocks.0-10)
FREEZE_NAME = re.compile(r"[A-Za-z_]\w*(\.\w+)*(\.\d+-\d+)?")


def _validate_weights(cfg: ExperimentConfig) -> None:
    """Pretrained weights, frozen modules and the evaluation crop: the rules the config decides alone."""
    model, data = cfg.model, cfg.data
    if model.pretrained and model.pretrained_path:
        raise ConfigError("model.pretrained and model.pretrained_path both name starting weights; keep one "
                          "(pretrained: the cached timm weights of model.backbone; pretrained_path: a local file)")
    if cfg.train.init_from == "pretrained" and not (model.pretrained or model.pretrained_path):
        raise ConfigError("train.init_from=pretrained starts from the backbone's pretrained weights, but none are "
                          "set: add model.pretrained=true (timm weights named by model.backbone) or model.pretrained_path")
    for name in model.freeze:
        if not FREEZE_NAME.fullmatch(name):
            raise ConfigError(f"model.freeze: '{name}' is not a module name (patch_embed), a child (blocks.3) or a "
                              "range of children (blocks.0-10)")
    if not 0 <= data.eval_crop_pct <= 1:
        raise ConfigError(f"data.eval_crop_pct: expected a fraction in (0, 1] (0: the backbone's own), got "
                          f"{data.eval_crop_pct}")
    if not 0 <= model.bn_momentum <= 1:
        raise ConfigError(f"model.bn_momentum: expected a value in [0, 1] (0: the backbone's own), got {model.bn_momentum}")
    if model.head_init != "default" and not model.embed_dim:
        raise ConfigError(f"model.head_init={model.head_init} initialises the linear head, but model.embed_dim is 0 "
                          "(no head); set embed_dim or leave head_init at default")
    if cfg.optim.eps <= 0:
        raise ConfigError(f"optim.eps: must be positive, got {cfg.optim.eps}")
    if data.eval_resize and data.eval_resize < data.image_size:
        raise ConfigError(f"data.eval_resize ({data.eval_resize}) must be at least data.image_size "
                          f"({data.image_size}): the centre crop is taken from the resized image (0: off)")


def _validate_validation(cfg: ExperimentConfig) -> None:
    val = cfg.train.validation  # its numbers' ranges: _AT_LEAST
    if val.every and not val.query:
        raise ConfigError("train.validation.query: name the split whose samples are the validation queries "
                          "(e.g. test), or set train.validation.every=0")
    if val.patience and not val.every:
        raise ConfigError("train.validation.patience needs train.validation.every > 0: early stopping counts "
                          "validations without improvement")
    if cfg.extract.checkpoint == "best" and not val.every:
        raise ConfigError("extract.checkpoint=best needs a validation during training to choose it: set "
                          "train.validation.every (and its query split and metric), or extract another checkpoint")

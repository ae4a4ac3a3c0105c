"""The typed configuration tree of an experiment.

One dataclass per section; every field has a default and a comment saying what it
means. YAML is loaded strictly: an unknown key is an error naming the nearest valid
key, a value of the wrong type is an error naming the expected type, and
cross-field rules (``validate``) run at load time, before anything is submitted.

``experiments.yaml`` maps experiment names to partial configs. An entry may
``inherit`` one or more other entries; they are deep-merged in order (mappings
merge key by key, lists and scalars are replaced, ``null`` deletes a key), then the
entry itself is merged on top. Names starting with ``_`` are abstract bases: they
can be inherited but not run.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

STAGES = ("train", "extract", "evaluate", "cluster")


class ConfigError(ValueError):
    """A user error in experiments.yaml or in a --set override."""


# ----------------------------------------------------------------------------- schema


@dataclass
class RunConfig:
    root: str = "runs"  # directory holding one run directory per experiment
    name: str = ""  # run directory name; empty means the experiment's name


@dataclass
class DataConfig:
    root: str = ""  # shard directory: <root>/<split>/<split>-NNNNNN.tar + manifest.json
    train_splits: list[str] = field(default_factory=lambda: ["train"])  # concatenated for training
    pseudo_labels: str = ""  # label sidecar (.npz path, or an experiment whose cluster stage wrote one)
    image_size: int = 224  # square input size for training and extraction
    batch_size: int = 64  # GLOBAL batch size, summed over all ranks
    sampler: Literal["pk", "random", "triplet"] = "pk"  # pk: P classes x K samples per batch
    samples_per_class: int = 4  # K of the P x K sampler; P = batch_size / K
    small_classes: Literal["repeat", "drop"] = "repeat"  # classes with < K samples: repeat samples, or leave out
    max_per_class: int = 0  # use at most this many samples of a class per epoch (0: all)
    steps_per_epoch: int = 0  # 0: number of training samples // batch_size
    num_workers: int = 4  # DataLoader worker processes per rank
    augment: Literal["none", "crop", "crop_flip", "autoaugment"] = "crop_flip"  # training augmentation
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])  # random-resized-crop area range
    mean: list[float] = field(default_factory=list)  # normalisation mean; empty: the backbone's own
    std: list[float] = field(default_factory=list)  # normalisation std; empty: the backbone's own
    anchor_modality: str = ""  # triplet sampler: modality of anchors (e.g. sketch)
    positive_modality: str = ""  # triplet sampler: modality of positives/negatives (e.g. photo)


@dataclass
class EnsembleConfig:
    branches: int = 0  # number of randomized-ensemble branches (REIR); 0 turns the ensemble off
    share_type: Literal["none", "maxpool", "layer1", "layer2", "layer3", "layer4"] = "layer2"  # deepest shared stage
    meta_class_size: int = 12  # meta-classes per branch
    codes: Literal["fixed", "random"] = "fixed"  # fixed: redraw until every class has a unique code
    with_random: bool = False  # re-initialise each branch's replicated layers independently


@dataclass
class ModelConfig:
    backbone: str = "resnet18"  # any timm model name
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments (e.g. img_size)
    pretrained_path: str = ""  # local .safetensors / .pth state dict; empty: random init (no downloads)
    pool: Literal["gem", "avg", "max", "token"] = "gem"  # token: the class token of a transformer
    gem_p: float = 3.0  # initial GeM exponent
    gem_learnable: bool = True  # learn the GeM exponent
    embed_dim: int = 128  # embedding size after the linear head; 0: no head (pooled features)
    batchnorm: Literal["train", "frozen", "sync"] = "train"  # sync needs GPUs; frozen uses running stats
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)


@dataclass
class LossTerm:
    name: str = "contrastive"  # a loss from imret.losses (see `imret.losses.LOSSES`)
    weight: float = 1.0  # weight of this term in the total loss
    params: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the loss class


@dataclass
class LossConfig:
    terms: list[LossTerm] = field(default_factory=lambda: [LossTerm()])  # summed by weight


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: float = 1e-4  # base learning rate (backbone)
    weight_decay: float = 1e-4
    momentum: float = 0.9  # SGD only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam/AdamW only
    head_lr_mult: float = 1.0  # lr multiplier for the heads and loss parameters (the seeds' fc_lr_mul)
    grad_clip: float = 0.0  # clip the global gradient norm to this (0: off)
    accumulate: int = 1  # optimizer step every N batches


@dataclass
class ScheduleConfig:
    name: Literal["constant", "step", "multistep", "exponential", "cosine"] = "constant"
    step_size: int = 1  # step: epochs between decays
    milestones: list[int] = field(default_factory=list)  # multistep: epochs at which to decay
    gamma: float = 0.1  # decay factor (exponential: per-epoch shrink, e.g. 0.9)
    warmup_epochs: float = 0.0  # linear warm-up from 0, in (fractional) epochs
    min_lr: float = 0.0  # cosine: final learning rate


@dataclass
class TrainConfig:
    epochs: int = 10
    seed: int = 0  # decides initialisation, sampling and augmentation
    checkpoint_every: int = 0  # also checkpoint every N optimizer steps (0: at epoch ends only)
    keep_checkpoints: int = 2  # keep the newest N checkpoints
    keep_epoch_checkpoints: bool = False  # keep every epoch-end checkpoint (to evaluate a chosen epoch)
    init_from: str = ""  # start from the weights of an experiment (by name) or a checkpoint path
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto: bf16 on GPU, off on CPU
    channels_last: bool = True  # on GPU only
    compile: bool = False  # torch.compile the model
    log_every: int = 10  # TensorBoard scalars every N steps
    max_steps: int = 0  # stop after this many optimizer steps in total (0: epochs decide)


@dataclass
class ExtractConfig:
    splits: list[str] = field(default_factory=list)  # empty: the evaluate stage's query and database splits
    batch_size: int = 128  # per rank
    dtype: Literal["float32", "float16"] = "float32"  # stored embedding precision
    checkpoint: str = "last"  # last | epoch-N | step-N | init (weights before training)
    num_workers: int = 2


@dataclass
class EvaluateConfig:
    query: str = "query"  # split whose samples are the queries
    database: str = "database"  # split searched; empty: the query split against itself, minus the query
    metrics: list[str] = field(
        default_factory=lambda: [
            "map", "map@R", "r_precision", "precision@1",
            "recall@1", "recall@2", "recall@4", "recall@8",
        ]
    )  # see imret.metrics.METRIC_PATTERNS
    sample_queries: int = 0  # evaluate a seeded random sample of this many queries (0: all)
    seed: int = 0  # seed of the query and pair samples
    db_shards: int = 1  # split the database search over this many array tasks
    roc_pairs: int = 1_000_000  # max (query, item) pairs for roc_auc; above it a seeded sample


@dataclass
class ClusterConfig:
    method: str = "density"  # pseudo-labelling method (imret.cluster.METHODS)
    splits: list[str] = field(default_factory=list)  # unlabelled splits to pseudo-label (their features)
    labelled: list[str] = field(default_factory=list)  # labelled splits kept with their true labels (mask 0)
    k: int = 10  # neighbours in the k-NN graph
    tau: float = 0.9  # keep edges with similarity above tau
    thresh: float = 0.8  # select samples whose density exceeds this
    min_size: int = 2  # clusters smaller than this are not selected
    exact_below: int = 200_000  # exact k-NN below this many points, an approximate FAISS index above
    index: Literal["hnsw", "ivf"] = "hnsw"  # the approximate index
    recall_sample: int = 1000  # points whose approximate k-NN is checked against exact k-NN
    levels: int = 10  # Hi-LANDER's levels in all: re-cluster the clusters (average linkage > tau) until none merge; 1: off


@dataclass
class StageResources:
    """Per-stage overrides of ResourcesConfig; unset (null) fields inherit."""

    nodes: int | None = None
    gpus_per_node: int | None = None
    tasks_per_node: int | None = None
    cpus_per_task: int | None = None
    mem_gb: int | None = None
    time_min: int | None = None


@dataclass
class ResourcesConfig:
    nodes: int = 1
    gpus_per_node: int = 0  # 0: a CPU job (gloo)
    tasks_per_node: int = 0  # ranks per node; 0: one per GPU (or 1 on CPU). Must equal gpus_per_node on GPU
    cpus_per_task: int = 2
    mem_gb: int = 0  # per node; 0: the cluster default
    time_min: int = 60
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    exclude: str = ""
    signal_delay_s: int = 120  # SLURM sends USR2 this long before the time limit, to checkpoint
    max_requeues: int = 3  # requeues after time-outs (preemptions are always requeued)
    local_ranks: int = 2  # ranks the local executor starts when there is no SLURM (gloo on CPU)
    dist_timeout_s: int = 300  # a collective waiting longer than this fails the job instead of hanging
    stages: dict[str, StageResources] = field(default_factory=dict)  # overrides by stage name


@dataclass
class SweepConfig:
    grid: dict[str, Any] = field(default_factory=dict)  # key path -> list of values, or {name: value}; the cross product
    points: list[dict[str, Any]] = field(default_factory=list)  # explicit override sets (added to the grid)
    array_parallelism: int = 16  # at most this many array tasks run at once


@dataclass
class ExperimentConfig:
    name: str = ""  # filled from the experiments.yaml key
    description: str = ""  # one line, shown by `submit.py --list`
    run: RunConfig = field(default_factory=RunConfig)
    stages: list[str] = field(default_factory=lambda: ["train", "extract", "evaluate"])
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.root) / (self.run.name or self.name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """A short hash of everything that decides results (not where or how it runs)."""
        d = self.to_dict()
        for key in ("name", "description", "run", "resources", "sweep"):
            d.pop(key)
        for section, key in (("data", "num_workers"), ("extract", "num_workers"), ("train", "log_every")):
            d[section].pop(key)
        blob = json.dumps(d, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ----------------------------------------------------------------------------- strict loading


def _closest(key: str, valid: typing.Iterable[str]) -> str:
    matches = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"did you mean '{matches[0]}'? " if matches else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against type ``tp`` and build dataclasses; raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not allowed; expected {_type_name(tp)}. "
                              f"{_closest(str(value), [str(a) for a in args])}".rstrip())
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _convert(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"{path}: unknown key; {_closest(str(key), names)}"
                              f"valid keys here: {', '.join(names)}")
        kwargs[key] = _convert(value, hints[key], path)
    return cls(**kwargs)


def from_dict(data: dict[str, Any], name: str = "") -> ExperimentConfig:
    """Build and validate a config from a plain mapping."""
    cfg = _build(ExperimentConfig, data, "")
    if name:
        cfg.name = name
    validate(cfg)
    return cfg


# ----------------------------------------------------------------------------- experiments.yaml


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Merge ``top`` into a copy of ``base``: mappings recursively, the rest replaced, null deletes."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@dataclass
class Experiments:
    """The parsed experiments.yaml: raw entries by name."""

    path: Path
    entries: dict[str, dict[str, Any]]

    @classmethod
    def load(cls, path: str | Path) -> Experiments:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: no such file. Run from the repository root or pass --experiments PATH.")
        try:
            entries = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
            raise ConfigError(f"{path}: expected a mapping of experiment names to mappings")
        return cls(path, entries)

    def runnable(self) -> list[str]:
        return [n for n in self.entries if not n.startswith("_")]

    def unknown_name_error(self, name: str) -> ConfigError:
        close = difflib.get_close_matches(name, self.runnable(), n=5, cutoff=0.4)
        hint = f" Closest: {', '.join(close)}." if close else ""
        return ConfigError(f"no experiment named '{name}' in {self.path}.{hint} "
                           f"`python launch/submit.py --list` shows them all.")

    def raw(self, name: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
        """The entry with its inheritance resolved (a plain mapping, not yet typed)."""
        if name not in self.entries:
            raise self.unknown_name_error(name)
        if name in _seen:
            raise ConfigError(f"{self.path}: inheritance cycle: {' -> '.join(_seen + (name,))}")
        entry = dict(self.entries[name])
        parents = entry.pop("inherit", [])
        parents = [parents] if isinstance(parents, str) else parents
        merged: dict[str, Any] = {}
        for parent in parents:
            if parent not in self.entries:
                raise ConfigError(f"{self.path}: {name}: inherit: {self.unknown_name_error(parent)}")
            merged = deep_merge(merged, self.raw(parent, _seen + (name,)))
        return deep_merge(merged, entry)

    def resolve(self, name: str, overrides: typing.Sequence[str] = ()) -> ExperimentConfig:
        if name.startswith("_") and name in self.entries:
            raise ConfigError(f"'{name}' is an abstract base (its name starts with '_'); run an experiment that inherits it.")
        data = self.raw(name)
        for item in overrides:
            data = apply_override(data, item)
        try:
            return from_dict(data, name)
        except ConfigError as err:
            raise ConfigError(f"{self.path}: experiment '{name}': {err}") from None


_LIST_INDEX = re.compile(r"^\d+$")


def apply_override(data: dict[str, Any], item: str) -> dict[str, Any]:
    """Apply one ``key.path=value`` override; the value is parsed as YAML (``[1,2]``, ``true``, ``1e-4``)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. --set optim.lr=0.001")
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML: {err}") from None
    parts = key.strip().split(".")
    _check_override_path(parts, item)
    out = copy.deepcopy(data)
    node: Any = out
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[int(part)]
            continue
        if not isinstance(node.get(part), (dict, list)):
            node[part] = {} if not _LIST_INDEX.match(parts[i + 1]) else node.get(part, [])
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        idx = int(last)
        if idx >= len(node):
            raise ConfigError(f"--set {item!r}: index {idx} is past the end of a list of {len(node)}")
        node[idx] = value
    else:
        node[last] = value
    return out


def _check_override_path(parts: list[str], item: str) -> None:
    """Walk the schema so that a typo in --set is reported before anything else."""
    tp: Any = ExperimentConfig
    for i, part in enumerate(parts):
        where = ".".join(parts[: i + 1])
        origin = typing.get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
            origin = typing.get_origin(tp)
        if dataclasses.is_dataclass(tp):
            names = [f.name for f in dataclasses.fields(tp)]
            if part not in names:
                raise ConfigError(f"--set {item!r}: '{where}' is not a config key; "
                                  f"{_closest(part, names)}valid keys here: {', '.join(names)}")
            tp = typing.get_type_hints(tp)[part]
        elif origin is list:
            if not _LIST_INDEX.match(part):
                raise ConfigError(f"--set {item!r}: '{where}' indexes a list; use a number, e.g. .0")
            tp = typing.get_args(tp)[0]
        elif origin is dict:
            tp = typing.get_args(tp)[1]
        elif tp is Any:
            return
        else:
            raise ConfigError(f"--set {item!r}: '{'.'.join(parts[:i])}' is a value, it has no key '{part}'")


# ----------------------------------------------------------------------------- cross-field rules


def validate(cfg: ExperimentConfig) -> None:
    """Rules that involve several fields, checked before anything is submitted."""
    _validate_stages(cfg)
    _validate_data(cfg.data)
    _validate_loss(cfg)
    _validate_model(cfg.model)
    _validate_evaluate(cfg.evaluate)
    _validate_resources(cfg.resources)
    _validate_schedule(cfg.schedule, cfg.train)
    if cfg.optim.accumulate < 1:
        raise ConfigError(f"optim.accumulate: must be >= 1, got {cfg.optim.accumulate}")


def _validate_stages(cfg: ExperimentConfig) -> None:
    for stage in cfg.stages:
        if stage not in STAGES:
            raise ConfigError(f"stages: unknown stage '{stage}'; {_closest(stage, STAGES)}stages are {', '.join(STAGES)}")
    order = [STAGES.index(s) for s in cfg.stages]
    if order != sorted(order) or len(set(order)) != len(order):
        raise ConfigError(f"stages: {cfg.stages} must be distinct and in the order {', '.join(STAGES)}")
    if "cluster" in cfg.stages:
        from imret.cluster import check_params  # late: pulls in faiss

        try:
            check_params(cfg.cluster)
        except ValueError as err:
            raise ConfigError(str(err)) from None


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


def _validate_loss(cfg: ExperimentConfig) -> None:
    if "train" not in cfg.stages:
        return
    if not cfg.loss.terms:
        raise ConfigError("loss.terms: the train stage needs at least one loss term")
    from imret.losses import check_term  # late: pulls in torch

    for i, term in enumerate(cfg.loss.terms):
        try:
            check_term(term.name, term.params)
        except ValueError as err:
            raise ConfigError(f"loss.terms[{i}]: {err}") from None


def _validate_model(model: ModelConfig) -> None:
    if model.embed_dim < 0:
        raise ConfigError(f"model.embed_dim: must be >= 0, got {model.embed_dim}")
    if model.pretrained_path and not Path(model.pretrained_path).is_file():
        raise ConfigError(
            f"model.pretrained_path: {model.pretrained_path} does not exist. imret never downloads weights: "
            "save them locally (e.g. a timm .safetensors file) and give its path, or leave it empty for random init."
        )
    import timm  # late: heavy

    if model.ensemble.branches:
        from imret.models.ensemble import check_ensemble_config

        try:
            check_ensemble_config(model)
        except ValueError as err:
            raise ConfigError(f"model.ensemble: {err}") from None
    if not timm.is_model(model.backbone):
        close = difflib.get_close_matches(model.backbone, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Closest: {', '.join(close)}." if close else ""
        raise ConfigError(f"model.backbone: timm has no model '{model.backbone}'.{hint}")


def _validate_evaluate(ev: EvaluateConfig) -> None:
    from imret.metrics import check_metric_name

    for name in ev.metrics:
        try:
            check_metric_name(name)
        except ValueError as err:
            raise ConfigError(f"evaluate.metrics: {err}") from None
    if ev.db_shards < 1:
        raise ConfigError(f"evaluate.db_shards: must be >= 1, got {ev.db_shards}")


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
        if stage not in STAGES:
            raise ConfigError(f"resources.stages: unknown stage '{stage}'; {_closest(stage, STAGES)}stages are {', '.join(STAGES)}")


def _validate_schedule(sched: ScheduleConfig, train: TrainConfig) -> None:
    if sched.milestones != sorted(sched.milestones):
        raise ConfigError(f"schedule.milestones: must be increasing, got {sched.milestones}")
    if sched.name == "multistep" and not sched.milestones:
        raise ConfigError("schedule.milestones: the multistep schedule needs at least one epoch")
    if train.epochs < 1:
        raise ConfigError(f"train.epochs: must be >= 1, got {train.epochs}")


# ----------------------------------------------------------------------------- job shape


def stage_resources(cfg: ExperimentConfig, stage: str) -> ResourcesConfig:
    """The resources of one stage: the experiment's, with that stage's overrides applied."""
    res = copy.deepcopy(cfg.resources)
    override = res.stages.get(stage)
    if override:
        for f in dataclasses.fields(override):
            value = getattr(override, f.name)
            if value is not None:
                setattr(res, f.name, value)
    res.stages = {}
    return res


def tasks_per_node(res: ResourcesConfig) -> int:
    """Ranks per node: one per GPU, else the configured number (1 by default)."""
    return res.gpus_per_node or res.tasks_per_node or 1


def save_yaml(cfg: ExperimentConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    tmp.replace(path)


def load_yaml(path: str | Path) -> ExperimentConfig:
    """Load a resolved config written by ``save_yaml`` (a run directory's config.yaml)."""
    data = yaml.safe_load(Path(path).read_text())
    return from_dict(data, data.get("name", ""))

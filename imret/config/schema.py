"""The typed configuration tree of an experiment: one dataclass per section.

Every field has a default and a docstring saying what it means; `imret.config.load`
builds these from YAML strictly (unknown keys and wrong types are errors) and
`imret.config.validate` checks the rules that involve several fields. Nothing here
imports an imret component: the config is the ground floor everything else stands on.
The tree is one concern (the sections are read, typed and checked together), so it stays
one module even past 450 lines.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from imret.config.names import run_dir as safe_run_dir

STAGE_ORDER = ("train", "extract", "evaluate", "cluster")
"""Every stage name, in the order the stages run (``imret.pipeline`` says what each runs)."""


@dataclass
class RunConfig:
    """Where the run's files go."""

    root: str = "runs"
    """Directory holding one run directory per experiment."""
    name: str = ""
    """Run directory name; empty means the experiment's name."""


@dataclass
class DataConfig:
    """The shards to read, and how training batches are drawn and augmented."""

    root: str = ""
    """Shard directory: ``<root>/<split>/<split>-NNNNNN.tar`` plus ``manifest.json``."""
    train_splits: list[str] = field(default_factory=lambda: ["train"])
    """Splits concatenated for training."""
    pseudo_labels: str = ""
    """Label sidecar: an .npz path, or an experiment whose cluster stage wrote one."""
    image_size: int = 224
    """Square input size for training and extraction."""
    batch_size: int = 64
    """The GLOBAL batch size, summed over all ranks."""
    sampler: Literal["pk", "random", "triplet", "pid_shuffle"] = "pk"
    """``pk``: P classes x K samples per batch; ``random``: uniform; ``triplet``: (anchor, positive, negative);
    ``pid_shuffle``: P class slots from a shuffled (tiled) class list, K samples each (the CBIR seed's)."""
    samples_per_class: int = 4
    """K of the P x K sampler; P = batch_size / K."""
    small_classes: Literal["repeat", "drop"] = "repeat"
    """Classes with fewer than K samples: repeat samples, or leave the class out."""
    max_per_class: int = 0
    """Use at most this many samples of a class per epoch (0: all)."""
    steps_per_epoch: int = 0
    """Batches per epoch; 0: the number of training samples // batch_size."""
    num_workers: int = 4
    """DataLoader worker processes per rank."""
    augment: Literal["none", "crop", "crop_flip", "autoaugment", "resize_random_crop", "resize_random_crop_flip",
                     "flip"] = "crop_flip"
    """Training augmentation. ``crop``/``crop_flip``/``autoaugment``: a random resized crop (``crop_scale``);
    ``resize_random_crop[_flip]``: the evaluation resize (``resize``, ``eval_resize``), then a random
    ``image_size`` crop; ``flip``: the evaluation transform and a horizontal flip; ``none``: the evaluation
    transform."""
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    """Random-resized-crop area range, as fractions of the image."""
    mean: list[float] = field(default_factory=list)
    """Normalisation mean (RGB); empty: the backbone's own."""
    std: list[float] = field(default_factory=list)
    """Normalisation std (RGB); empty: the backbone's own. Mean [0,0,0] and std [1,1,1]: pixels in [0, 1], no normalisation."""
    interpolation: Literal["", "bilinear", "bicubic", "nearest"] = ""
    """Resampling of every resize and random-resized crop; empty: the backbone's (its weights' tag's) own."""
    eval_crop_pct: float = 0.0
    """Evaluation: resize the short side to image_size / eval_crop_pct, then centre-crop; 0: the backbone's own."""
    eval_resize: int = 0
    """Evaluation: resize the short side to this many pixels, then centre-crop image_size (e.g. 256 -> 224);
    overrides eval_crop_pct; 0: off."""
    resize: Literal["short_side", "squash"] = "short_side"
    """How the evaluation resize (and ``resize_random_crop``'s) reaches its size: the shorter side, keeping the
    aspect ratio; or ``squash``: both sides, to a square."""
    reduced_decode: bool = True
    """Decode JPEGs at 1/2, 1/4 or 1/8 size when the crop allows (same crops; see imret.data.decode)."""
    anchor_modality: str = ""
    """Triplet sampler: the modality of anchors (e.g. sketch)."""
    positive_modality: str = ""
    """Triplet sampler: the modality of positives and negatives (e.g. photo)."""


@dataclass
class EnsembleConfig:
    """A randomized ensemble (REIR): branches over a shared trunk."""

    branches: int = 0
    """Number of randomized-ensemble branches; 0 turns the ensemble off."""
    share_type: Literal["none", "maxpool", "layer1", "layer2", "layer3", "layer4"] = "layer2"
    """The deepest backbone stage the branches share."""
    meta_class_size: int = 12
    """Meta-classes per branch."""
    codes: Literal["fixed", "random"] = "fixed"
    """``fixed``: redraw until every class has a unique code; ``random``: one draw."""
    with_random: bool = False
    """Re-initialise each branch's replicated layers independently."""


@dataclass
class ModelConfig:
    """The network: timm backbone, pooling, embedding head."""

    backbone: str = "resnet18"
    """Any timm model name, optionally with its weights' tag as timm names them (``resnet50.tv_in1k``); the tag
    also decides the default mean, std, interpolation and evaluation crop."""
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra ``timm.create_model`` arguments (e.g. img_size)."""
    pretrained_path: str = ""
    """Local .safetensors / .pth state dict; empty: random init (imret never downloads)."""
    pretrained: bool = False
    """Start from the timm weights that ``backbone`` names (its tag, or timm's default tag), read from
    ``weights_dir``; ``python -m tools.fetch_weights --exp NAME`` puts them there. Jobs never download."""
    weights_dir: str = "weights"
    """The pretrained-weights cache: ``<weights_dir>/<model>.<tag>.safetensors`` (+ a .json naming the source).
    Relative paths are from the working directory; ``~`` and ``$VARS`` are expanded. Not part of the digest."""
    pool: Literal["gem", "avg", "max", "token"] = "gem"
    """Global pooling; ``token``: the class token of a transformer."""
    normalize: bool = True
    """L2-normalise the embedding the losses see; false: the raw pooled (or projected) features, as the sketch
    seed trains. Extraction stores L2-normalised embeddings either way, for the inner-product search."""
    gem_p: float = 3.0
    """Initial GeM exponent."""
    gem_learnable: bool = True
    """Learn the GeM exponent."""
    embed_dim: int = 128
    """Embedding size after the linear head; 0: no head (the pooled features)."""
    batchnorm: Literal["train", "frozen", "frozen_stats", "sync"] = "train"
    """``frozen``: running statistics used and kept, affine frozen; ``frozen_stats``: running statistics used and
    kept, affine (gamma, beta) trained, as the PSS seed does; ``sync`` needs GPUs."""
    head_init: Literal["default", "orthogonal"] = "default"
    """Initialisation of the linear embedding head: torch's default, or an orthogonal weight and zero bias
    (Keras ``Orthogonal``)."""
    bn_momentum: float = 0.0
    """BatchNorm running-statistics momentum of the backbone, in torch's convention (Keras 0.99 = 0.01);
    0: the backbone's own (torch: 0.1)."""
    freeze: list[str] = field(default_factory=list)
    """Backbone modules whose parameters are not trained, by name (``patch_embed``), a numbered range of children
    (``blocks.0-10``) or a single child (``blocks.3``). They still run in train mode (dropout, drop path)."""
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    """The randomized ensemble, when ``branches`` > 0."""


@dataclass
class LossTerm:
    """One weighted term of the training loss."""

    name: str = "contrastive"
    """A loss of ``imret.losses.LOSSES``, or ``package.module:Class``."""
    weight: float = 1.0
    """Weight of this term in the total loss."""
    params: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the loss class."""


@dataclass
class LossConfig:
    """The training loss."""

    terms: list[LossTerm] = field(default_factory=lambda: [LossTerm()])
    """Terms summed by weight."""


@dataclass
class OptimConfig:
    """The optimizer."""

    name: Literal["adam", "adamw", "sgd"] = "adamw"
    """Optimizer class."""
    lr: float = 1e-4
    """Base learning rate (backbone)."""
    weight_decay: float = 1e-4
    """Weight decay of matrices and convolutions (of 1-D tensors too with ``decay_1d``)."""
    decay_1d: bool = False
    """Also decay 1-D tensors (biases, norm scales and shifts, GeM p), as the PSS seed decays every parameter."""
    momentum: float = 0.9
    """SGD only."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam and AdamW only."""
    eps: float = 1e-8
    """Adam and AdamW only: the denominator's epsilon (Keras: 1e-7)."""
    head_lr_mult: float = 1.0
    """Learning-rate multiplier of the heads and loss parameters (the seeds' fc_lr_mul)."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this (0: off)."""
    accumulate: int = 1
    """Take an optimizer step every N batches."""


@dataclass
class ScheduleConfig:
    """The learning-rate schedule, by (fractional) epoch."""

    name: Literal["constant", "step", "multistep", "exponential", "cosine"] = "constant"
    """Schedule shape."""
    step_size: int = 1
    """``step``: epochs between decays."""
    milestones: list[int] = field(default_factory=list)
    """``multistep``: epochs at which to decay."""
    gamma: float = 0.1
    """Decay factor (``exponential``: the per-epoch shrink, e.g. 0.9)."""
    warmup_epochs: float = 0.0
    """Linear warm-up from 0, in (fractional) epochs."""
    min_lr: float = 0.0
    """``cosine``: the final learning rate."""


@dataclass
class ValidationConfig:
    """Validation during training: retrieval on a held-out split, to keep the best checkpoint and stop early."""

    every: int = 0
    """Validate after every N epochs (0: never)."""
    first: int = 0
    """The first epoch (1-based) validated, then every ``every`` epochs after it; 0: epoch ``every``. The PSS seed
    validates after epochs 1, 6, 11, ... (first 1, every 5)."""
    query: str = ""
    """Split whose samples are the queries."""
    database: str = ""
    """Split searched; empty: the query split against itself, each query left out."""
    metric: str = "recall@1"
    """The metric that selects (any name of ``imret.metrics``); logged to TensorBoard as ``validation/<metric>``."""
    mode: Literal["max", "min"] = "max"
    """Whether a larger or a smaller metric is better; only a strict improvement counts."""
    patience: int = 0
    """Stop training after this many validations in a row without improvement (0: never stop early)."""


@dataclass
class TrainConfig:
    """The training loop."""

    epochs: int = 10
    """Epochs to train."""
    seed: int = 0
    """Decides initialisation, sampling and augmentation."""
    checkpoint_every: int = 0
    """Also checkpoint every N optimizer steps (0: at epoch ends only)."""
    keep_checkpoints: int = 2
    """Keep the newest N checkpoints."""
    keep_epoch_checkpoints: bool = False
    """Keep every epoch-end checkpoint (to evaluate a chosen epoch)."""
    init_from: str = ""
    """Start from the weights of an experiment (by name) or a checkpoint path; ``pretrained``: the backbone's
    pretrained weights (``model.pretrained``), as PSS starts every iteration from ImageNet."""
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    """Mixed precision on GPU; ``auto``: bf16. ``fp16`` scales the loss (torch's GradScaler, checkpointed)."""
    channels_last: bool = True
    """Channels-last memory format (on GPU only)."""
    compile: bool = False
    """``torch.compile`` the model."""
    log_every: int = 10
    """TensorBoard scalars every N steps."""
    max_steps: int = 0
    """Stop after this many optimizer steps in total (0: the epochs decide)."""
    loss_fp32: bool = True
    """Compute the loss in float32 with autocast off, even when the network runs in bf16/fp16 (PSS: Smooth-AP)."""
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    """Periodic validation, best-checkpoint selection and early stopping."""


@dataclass
class ExtractConfig:
    """Feature extraction."""

    splits: list[str] = field(default_factory=list)
    """Splits to embed; empty: the evaluate stage's query and database splits."""
    batch_size: int = 128
    """Images per batch, per rank."""
    dtype: Literal["float32", "float16"] = "float32"
    """Stored embedding precision."""
    checkpoint: str = "last"
    """``last``, ``best`` (the best validation, ``train.validation``), ``epoch-N``, ``step-N`` or ``init``
    (the weights before training)."""
    num_workers: int = 2
    """DataLoader worker processes per rank."""


@dataclass
class EvaluateConfig:
    """Retrieval evaluation."""

    query: str = "query"
    """Split whose samples are the queries."""
    database: str = "database"
    """Split searched; empty: the query split against itself, each query left out."""
    metrics: list[str] = field(
        default_factory=lambda: [
            "map", "map@R", "r_precision", "precision@1",
            "recall@1", "recall@2", "recall@4", "recall@8",
        ]
    )
    """Metric names (see ``imret.metrics.METRIC_PATTERNS`` and ``PAIR_METRICS``)."""
    sample_queries: int = 0
    """Evaluate a seeded random sample of this many queries (0: all)."""
    seed: int = 0
    """Seed of the query and pair samples."""
    db_shards: int = 1
    """Split the database search over this many array tasks."""
    roc_pairs: int = 1_000_000
    """Most (query, item) pairs for roc_auc; above it, a seeded sample."""
    block_mb: float = 512.0
    """Memory budget (MiB) of the exact full-ranking scan, all threads together: its score blocks,
    counting tables and temporaries (not the features themselves). More is faster up to blocks of
    256 query rows per thread; the least is 32 rows per thread (about 130 bytes per database item),
    which a smaller budget exceeds. It changes no result, so it is not part of the config digest."""
    triplet_batch: int = 64
    """Triples per batch of the in-batch metrics (``inbatch_topK``; the sketch seed's 64)."""


@dataclass
class HilanderConfig:
    """Hi-LANDER's training (``cluster.method: hilander``); the defaults are PSS's iteration-0 recipe.

    Inference reads ``cluster.k`` (PSS/train.sh:39 ``--knn_k 10``), ``cluster.tau``
    (train.sh:40 ``--tau 0.9``), ``cluster.levels`` (train.sh:40 ``--level 10``) and
    ``cluster.thresh`` (train.sh:42 ``--thresh 0.8``)."""

    train_k: list[int] = field(default_factory=lambda: [10, 5, 3])
    """k of each set of training graphs (PSS/train.sh:32 ``--knn_k 10,5,3``)."""
    train_levels: list[int] = field(default_factory=lambda: [2, 3, 4])
    """Levels of each set, one per ``train_k`` (PSS/train.sh:32 ``--levels 2,3,4``)."""
    hidden: int = 512
    """Width of the graph convs (PSS/train.sh:33 ``--hidden 512``)."""
    num_conv: int = 1
    """Graph convs, 1 to 4 (PSS/train.sh:34 ``--num_conv 1``)."""
    epochs: int = 1000
    """Training epochs, each as many rounds as the largest graph has batches (PSS/train.sh:33)."""
    lr: float = 0.01
    """Initial learning rate of SGD (PSS/train.sh:33 ``--lr 0.01``)."""
    momentum: float = 0.9
    """SGD momentum (PSS/train_subg_inat.py:44, the default; train.sh does not pass it)."""
    weight_decay: float = 1e-5
    """SGD weight decay (PSS/train_subg_inat.py:45, the default)."""
    batch_size: int = 4096
    """Seed nodes per step; their in-edges come along (PSS/train.sh:34 ``--batch_size 4096``)."""
    balance: bool = True
    """Equal numbers of same- and other-class edges in the edge loss (PSS/train.sh:34 ``--balance``)."""
    eta_min: float = 1e-5
    """Floor of the cosine schedule, stepped every batch (PSS/train_subg_inat.py:168-170)."""
    early_stop: bool = True
    """Stop levelling when a level adds over 1/(k-1) of the previous level's edges (PSS/train.sh:41)."""
    seed: int = 0
    """Seeds initialisation, shuffling and balancing (the seed seeds nothing: train_subg_inat.py:66)."""
    device: str = "auto"
    """Where the model runs: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``."""


@dataclass
class ClusterConfig:
    """Pseudo-labelling of unlabelled splits (the cluster-finetune loop)."""

    method: str = "density"
    """Pseudo-labelling method (``imret.cluster.methods.METHODS``)."""
    splits: list[str] = field(default_factory=list)
    """Unlabelled splits to pseudo-label (their features)."""
    labelled: list[str] = field(default_factory=list)
    """Labelled splits kept with their true labels (mask 0)."""
    cumulative: bool = True
    """Keep earlier iterations' selections (read from ``data.pseudo_labels``) with their pseudo-labels frozen
    (mask 3), and cluster only the rest, as PSS does; false: re-cluster all of the splits every iteration."""
    k: int = 10
    """Neighbours in the k-NN graph."""
    tau: float = 0.9
    """Keep edges with similarity above tau."""
    thresh: float = 0.8
    """Select samples whose density exceeds this."""
    min_size: int = 2
    """Clusters smaller than this are not selected."""
    exact_below: int = 200_000
    """Exact k-NN below this many points, an approximate FAISS index above."""
    index: Literal["hnsw", "ivf"] = "hnsw"
    """The approximate index."""
    recall_sample: int = 1000
    """Points whose approximate k-NN is checked against exact k-NN."""
    levels: int = 10
    """Levels in all: re-cluster the clusters (average linkage > tau) until none merge; 1: off."""
    hilander: HilanderConfig = field(default_factory=HilanderConfig)
    """Hi-LANDER's training settings (used when ``method`` is ``hilander``)."""


@dataclass
class StageResources:
    """Per-stage overrides of ``ResourcesConfig``; unset (null) fields inherit."""

    nodes: int | None = None
    """Nodes of this stage's job."""
    gpus_per_node: int | None = None
    """GPUs per node of this stage's job."""
    tasks_per_node: int | None = None
    """Ranks per node of this stage's job."""
    cpus_per_task: int | None = None
    """CPUs per rank of this stage's job."""
    mem_gb: int | None = None
    """Memory per node of this stage's job."""
    time_min: int | None = None
    """Time limit of this stage's job."""


@dataclass
class ResourcesConfig:
    """The job shape: what SLURM is asked for, and the local executor's ranks."""

    nodes: int = 1
    """Nodes per job."""
    gpus_per_node: int = 0
    """GPUs per node; 0: a CPU job (gloo)."""
    tasks_per_node: int = 0
    """Ranks per node; 0: one per GPU (or 1 on CPU). Must equal gpus_per_node on GPU."""
    cpus_per_task: int = 2
    """CPUs per rank."""
    mem_gb: int = 0
    """Memory per node; 0: the cluster's default."""
    time_min: int = 60
    """Time limit of each job, in minutes."""
    partition: str = ""
    """SLURM partition (empty: the cluster's default)."""
    account: str = ""
    """SLURM account."""
    qos: str = ""
    """SLURM quality of service."""
    constraint: str = ""
    """SLURM node features the job needs."""
    exclude: str = ""
    """SLURM nodes to avoid."""
    signal_delay_s: int = 120
    """SLURM sends USR2 this long before the time limit, to checkpoint."""
    max_requeues: int = 3
    """Requeues after time-outs (preemptions are always requeued)."""
    local_ranks: int = 2
    """Ranks the local executor starts when there is no SLURM (gloo on CPU)."""
    dist_timeout_s: int = 300
    """A collective waiting longer than this fails the job instead of hanging."""
    stages: dict[str, StageResources] = field(default_factory=dict)
    """Overrides by stage name."""


@dataclass
class SweepConfig:
    """One experiment, many configurations (a SLURM array)."""

    grid: dict[str, Any] = field(default_factory=dict)
    """Key path -> list of values, or {name: value}; the cross product gives the points."""
    points: list[dict[str, Any]] = field(default_factory=list)
    """Explicit override sets, added to the grid's points."""
    array_parallelism: int = 16
    """At most this many array tasks run at once."""


@dataclass
class ExperimentConfig:
    """One experiment: every section, with the name it has in experiments.yaml."""

    name: str = ""
    """Filled from the experiments.yaml key."""
    description: str = ""
    """One line, shown by ``submit.py --list``."""
    run: RunConfig = field(default_factory=RunConfig)
    """Where the run's files go."""
    stages: list[str] = field(default_factory=lambda: ["train", "extract", "evaluate"])
    """Stages to run, in ``STAGE_ORDER``."""
    data: DataConfig = field(default_factory=DataConfig)
    """The shards and the training batches."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The network."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The training loss."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """The optimizer."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """The learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop."""
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    """Feature extraction."""
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """Retrieval evaluation."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Pseudo-labelling."""
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    """The job shape."""
    sweep: SweepConfig = field(default_factory=SweepConfig)
    """Sweep points, when the experiment is a sweep."""

    @property
    def run_dir(self) -> Path:
        """``run.root / (run.name or name)``; never outside ``run.root`` (``imret.config.names``)."""
        return safe_run_dir(self.run.root, self.run.name or self.name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """A short hash of everything that decides results (not where or how it runs)."""
        d = self.to_dict()
        for key in ("name", "description", "run", "resources", "sweep"):
            d.pop(key)
        for section, key in (("data", "num_workers"), ("extract", "num_workers"), ("train", "log_every"),
                             ("model", "weights_dir"), ("evaluate", "block_mb")):
            d[section].pop(key)
        if d["cluster"]["method"] != "hilander":
            d["cluster"].pop("hilander")  # another method's results do not depend on it
        blob = json.dumps(d, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

"""Datasets and DataLoaders over shard splits: P x K training batches, exact-once extraction."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from imret.config import ExperimentConfig
from imret.data.decode import DecodeTransform, open_rgb
from imret.data.labels import LABELLED, apply_sidecar, load_sidecar, resolve_sidecar
from imret.data.sampler import BatchPlan, RankBatches, TripletPlan
from imret.data.shards import ShardError, ShardSplit, image_bytes
from imret.data.transforms import eval_transform, train_transform
from imret.distributed import DistInfo


class MultiSplit:
    """Several splits read as one index space (e.g. labelled + pseudo-labelled data)."""

    def __init__(self, splits: Sequence[ShardSplit]) -> None:
        self.splits = list(splits)
        self.offsets = np.cumsum([0] + [len(s) for s in self.splits])
        self.keys = np.concatenate([s.keys for s in self.splits])
        self.labels = np.concatenate([s.labels for s in self.splits])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, i: int) -> tuple[ShardSplit, int]:
        j = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.splits[j], i - int(self.offsets[j])


def encoded_image(split: ShardSplit, i: int) -> bytes:
    """Sample ``i``'s image file, as stored in its shard."""
    return image_bytes(split.read(i), split.ref(i))


@contextlib.contextmanager
def decode_errors(split: ShardSplit, i: int) -> Iterator[None]:
    """Turn PIL's errors into a ShardError that names the shard and the sample."""
    try:
        yield
    except (OSError, SyntaxError) as err:
        ref = split.ref(i)
        raise ShardError(f"shard {ref.shard}: the image of sample {ref.key} cannot be decoded: {err}") from err


def decode_image(split: ShardSplit, i: int) -> Image.Image:
    """Sample ``i``'s whole image as RGB (pictures, tools); the loaders decode through DecodeTransform."""
    data = encoded_image(split, i)
    with decode_errors(split, i):
        return open_rgb(data)


def as_decode_transform(transform: Callable, reduced_decode: bool) -> DecodeTransform:
    if isinstance(transform, DecodeTransform):
        return transform
    return DecodeTransform(transform, reduced=reduced_decode)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed python's and torch's CPU RNGs (what timm's transforms draw from) for one sample.

    ``torch.manual_seed`` would also seed every CUDA generator, which costs about 100 us
    a call on a CUDA build; transforms only draw from the CPU generator.
    """
    py_state, torch_state = random.getstate(), torch.get_rng_state()
    random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        torch.set_rng_state(torch_state)


class TrainSet(Dataset):
    """Items are ``(index, augmentation seed)``; returns ``(image, label, index)``.

    ``transform`` is a PIL-image transform (timm's); JPEGs are decoded at reduced size where
    its crop allows, unless ``reduced_decode`` is False (see imret.data.decode).
    """

    def __init__(self, data: MultiSplit, labels: np.ndarray, transform: Callable, reduced_decode: bool = True) -> None:
        self.data, self.labels = data, labels
        self.transform = as_decode_transform(transform, reduced_decode)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        index, aug_seed = item
        split, local = self.data.locate(index)
        data = encoded_image(split, local)
        # the crop box is drawn before decoding (from the header's size), so decoding runs inside the seed
        with seeded(aug_seed), decode_errors(split, local):
            tensor = self.transform(data)
        return tensor, int(self.labels[index]), index


class EvalSet(Dataset):
    """Returns ``(image, label, index)`` with the deterministic evaluation transform (reduced decode as TrainSet)."""

    def __init__(self, split: ShardSplit, transform: Callable, reduced_decode: bool = True) -> None:
        self.split = split
        self.transform = as_decode_transform(transform, reduced_decode)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        data = encoded_image(self.split, index)
        with decode_errors(self.split, index):
            tensor = self.transform(data)
        return tensor, int(self.split.labels[index]), index


class TrainData:
    """Everything the trainer needs from the data: a loader, its sampler and label facts."""

    def __init__(self, cfg: ExperimentConfig, info: DistInfo, reduced_decode: bool | None = None) -> None:
        d = cfg.data
        reduced_decode = d.reduced_decode if reduced_decode is None else reduced_decode
        self.source = MultiSplit([ShardSplit(d.root, s) for s in d.train_splits])
        labels = self.source.labels
        self.num_classes = int(labels.max()) + 1 if len(labels) else 0
        self.labelled_classes = self.num_classes  # classes with real labels (the rest are pseudo-classes)
        if d.pseudo_labels:
            sidecar = load_sidecar(resolve_sidecar(d.pseudo_labels, cfg.run.root))
            labels = apply_sidecar(self.source.keys, labels, sidecar)
            real = sidecar["labels"][sidecar["mask"] == LABELLED]
            self.labelled_classes = int(real.max()) + 1 if len(real) else 0
            self.num_classes = int(labels.max()) + 1 if (labels >= 0).any() else 0
        self.labels = labels
        self.plan = self._plan(cfg, labels)
        self.sampler = RankBatches(self.plan, info.rank, info.world_size)
        dataset = TrainSet(self.source, labels, train_transform(d, cfg.model.backbone), reduced_decode)
        self.loader = DataLoader(
            dataset, batch_sampler=self.sampler, num_workers=d.num_workers,
            persistent_workers=d.num_workers > 0, pin_memory=info.backend == "nccl",
        )

    def _plan(self, cfg: ExperimentConfig, labels: np.ndarray) -> BatchPlan | TripletPlan:
        d = cfg.data
        if d.sampler == "triplet":
            # the modality is the first path component of a sample's key ("sketch/airplane/..."),
            # as the sketchy converter writes them
            modalities = np.array([str(k).split("/", 1)[0] for k in self.source.keys])
            return TripletPlan(labels, modalities, d.batch_size, d.anchor_modality, d.positive_modality,
                               seed=cfg.train.seed, steps_per_epoch=d.steps_per_epoch)
        return BatchPlan(labels, d.batch_size, kind=d.sampler,
                         samples_per_class=d.samples_per_class, seed=cfg.train.seed,
                         steps_per_epoch=d.steps_per_epoch, small_classes=d.small_classes,
                         max_per_class=d.max_per_class)

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch

    def epoch(self, epoch: int, start_step: int = 0) -> DataLoader:
        self.sampler.set_position(epoch, start_step)
        return self.loader


class RangeSampler(Sampler[int]):
    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))


def rank_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous, disjoint, covering parts of ``range(n)``: sizes differ by at most one."""
    return n * rank // world_size, n * (rank + 1) // world_size


def extraction_loader(cfg: ExperimentConfig, split: ShardSplit, rank: int, world_size: int,
                      reduced_decode: bool | None = None) -> DataLoader:
    """This rank's part of ``split``, each sample exactly once, in order (workers keep batch order)."""
    start, stop = rank_range(len(split), rank, world_size)
    reduced = cfg.data.reduced_decode if reduced_decode is None else reduced_decode
    dataset = EvalSet(split, eval_transform(cfg.data, cfg.model.backbone), reduced)
    return DataLoader(dataset, batch_size=cfg.extract.batch_size, sampler=RangeSampler(start, stop),
                      num_workers=cfg.extract.num_workers)



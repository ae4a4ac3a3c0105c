"""The loaders on real gloo ranks with worker processes, and pseudo-label sidecars."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from imret.data.labels import SELECTED, apply_sidecar, load_sidecar, save_sidecar
from imret.data.loader import TrainData, extraction_loader
from imret.data.shards import ShardSplit
from imret.distributed import DistInfo
from tests.helpers import run_ranks, tiny_images, write_tiny_split
from tests.test_train import tiny_config


@pytest.fixture
def uneven(tmp_path):
    """7 classes of uneven sizes (one smaller than K), 3 shards."""
    items = [it for it in tiny_images(7, 9, seed=5) if int(it[0][-4:]) < [9, 4, 7, 2, 9, 6, 8][it[1]]]
    write_tiny_split(tmp_path / "d", "train", items, 7, shard_bytes=6000)
    return tmp_path


def batches_of_rank(info: DistInfo, cfg, epoch: int, start_step: int = 0) -> list[tuple[list[int], list[str]]]:
    data = TrainData(cfg, info)
    out = []
    for images, labels, index in data.epoch(epoch, start_step):
        digests = [hashlib.sha1(img.numpy().tobytes()).hexdigest()[:12] for img in images]
        out.append((index.tolist(), digests))
    return out


def global_batches(per_rank: list[list]) -> list[tuple[list[int], list[str]]]:
    steps = {len(r) for r in per_rank}
    assert len(steps) == 1, f"ranks ran different step counts: {steps}"
    return [(sum((r[s][0] for r in per_rank), []), sum((r[s][1] for r in per_rank), []))
            for s in range(steps.pop())]


@pytest.mark.parametrize("world", [2, 3])
def test_training_loader_on_ranks_with_workers(uneven, world):
    cfg = tiny_config(uneven / "d", uneven, "load", data__batch_size=12, data__samples_per_class=3,
                      data__num_workers=2)
    labels = ShardSplit(uneven / "d", "train").labels
    first = global_batches(run_ranks(batches_of_rank, world, cfg, 1))
    for indices, _ in first:
        classes, counts = np.unique(labels[indices], return_counts=True)
        assert len(classes) == 4 and (counts == 3).all()  # P x K globally
    again = global_batches(run_ranks(batches_of_rank, world, cfg, 1))
    assert again == first  # same seed: identical indices and identical augmented images
    resumed = global_batches(run_ranks(batches_of_rank, world, cfg, 1, 2))
    assert resumed == first[2:]  # restored mid-epoch: exactly the rest of the epoch
    single = global_batches([batches_of_rank(DistInfo(), cfg, 1)])
    assert single == first  # the same images whatever the number of ranks and workers


def extraction_indices(info: DistInfo, root, cfg) -> list[int]:
    split = ShardSplit(root, "query")
    return [i for _, _, index in extraction_loader(cfg, split, info.rank, info.world_size) for i in index.tolist()]


def test_extraction_loader_yields_every_key_once(tmp_path):
    items = tiny_images(5, 8, seed=6)[:37]  # 37 samples: divisible neither by 3 ranks nor 2 workers
    write_tiny_split(tmp_path / "d", "query", items, 5, shard_bytes=5000)
    cfg = tiny_config(tmp_path / "d", tmp_path, "x", extract__batch_size=4, extract__num_workers=2)
    per_rank = run_ranks(extraction_indices, 3, tmp_path / "d", cfg)
    seen = sorted(i for r in per_rank for i in r)
    assert seen == list(range(37))
    assert [len(r) for r in per_rank] == [12, 12, 13]


def test_sidecar_overrides_labels_and_excludes_unselected(tmp_path, uneven):
    split = ShardSplit(uneven / "d", "train")
    keys = split.keys[:6]
    path = tmp_path / "labels.npz"
    save_sidecar(path, keys, np.array([10, 10, 11, -1, -1, 12]), np.array([1, 1, 1, 2, 2, 1]))
    sidecar = load_sidecar(path)
    assert sidecar["mask"].tolist() == [SELECTED] * 3 + [2, 2, SELECTED]
    labels = apply_sidecar(split.keys, split.labels, sidecar)
    assert labels[:6].tolist() == [10, 10, 11, -1, -1, 12] and np.array_equal(labels[6:], split.labels[6:])
    cfg = tiny_config(uneven / "d", uneven, "side", data__pseudo_labels=str(path), data__batch_size=6,
                      data__samples_per_class=2)
    data = TrainData(cfg, DistInfo())
    assert data.num_classes == 13
    drawn = data.plan.epoch(0).ravel()
    assert not np.isin(drawn, [3, 4]).any()  # label -1: never trained on
    with pytest.raises(ValueError, match="does not exist"):
        load_sidecar(tmp_path / "missing.npz")

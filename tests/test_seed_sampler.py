"""The CBIR seed's batches (``data.sampler: pid_shuffle``): P class slots from a shuffled, tiled class list,
K samples per slot, so that a catalogue with fewer classes than P still fills its batches."""

from __future__ import annotations

import numpy as np
import pytest

from imret.data.sampler import BatchPlan, RankBatches


def plan(labels: np.ndarray, batch: int = 40, k: int = 2, seed: int = 0) -> BatchPlan:
    return BatchPlan(labels, batch, kind="pid_shuffle", samples_per_class=k, seed=seed)


def test_fewer_classes_than_p_are_tiled_so_a_class_may_fill_two_slots():
    labels = np.repeat(np.arange(13), 6)  # 13 classes ("Cat-13") for P = 20 slots of K = 2
    batches = plan(labels).epoch(0)
    assert batches.shape == (78 // 40, 40)  # samples // batch steps, as the other plans
    for batch in batches:
        slots = labels[batch].reshape(20, 2)
        assert (slots[:, 0] == slots[:, 1]).all()  # class-contiguous pairs: the angular loss's (anchor, positive)
        counts = np.bincount(slots[:, 0], minlength=13)
        assert counts.max() <= 2 and (counts > 0).sum() >= 7  # 26 tiled slots, 20 taken: at most twice each
        pairs = batch.reshape(20, 2)
        assert (pairs[:, 0] != pairs[:, 1]).all()  # a slot's K samples are distinct (two slots may share one)


def test_k_samples_repeat_only_for_classes_smaller_than_k():
    labels = np.array([0] * 5 + [1] + [2] * 3 + [3] * 4)
    p = plan(labels, batch=8, k=4, seed=3)
    for batch in p.epoch(0):
        for slot in batch.reshape(2, 4):
            size = int((labels == labels[slot[0]]).sum())
            assert (labels[slot] == labels[slot[0]]).all()
            # without replacement when the class has K or more; else each sample at most ceil(K / n) times
            most = np.bincount(slot).max()
            assert (most == 1) if size >= 4 else (most <= -(-4 // size))


def test_the_plan_is_seeded_and_every_rank_slices_the_same_batches():
    labels = np.repeat(np.arange(30), 4)
    a, b = plan(labels, seed=5).epoch(2), plan(labels, seed=5).epoch(2)
    assert np.array_equal(a, b) and not np.array_equal(a, plan(labels, seed=6).epoch(2))
    ranks = [list(RankBatches(plan(labels, seed=5), r, 2)) for r in range(2)]
    first = [i for i, _ in ranks[0][0]] + [i for i, _ in ranks[1][0]]
    assert first == plan(labels, seed=5).epoch(0)[0].tolist()


def test_pid_shuffle_needs_the_batch_to_hold_whole_slots():
    from imret.config import ConfigError, ExperimentConfig
    from imret.config.validate import validate

    cfg = ExperimentConfig()
    cfg.data.sampler, cfg.data.batch_size, cfg.data.samples_per_class = "pid_shuffle", 41, 2
    with pytest.raises(ConfigError, match="must be divisible by data.samples_per_class"):
        validate(cfg)

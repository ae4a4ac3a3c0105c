"""The seeded batch plan: P x K structure, determinism, rank slices and mid-epoch resume."""

from __future__ import annotations

import numpy as np
import pytest

from imret.data.sampler import BatchPlan, RankBatches, augmentation_seeds


def labels_with_sizes(sizes: list[int]) -> np.ndarray:
    return np.concatenate([np.full(n, c) for c, n in enumerate(sizes)])


@pytest.mark.parametrize("sizes", [[9, 7, 12, 5, 8, 30], [4] * 10, [2, 3, 11, 6]])
def test_every_batch_has_p_classes_of_k(sizes):
    labels = labels_with_sizes(sizes)
    plan = BatchPlan(labels, 12, samples_per_class=3, seed=4)
    for epoch in range(3):
        batches = plan.epoch(epoch)
        assert batches.shape == (plan.steps_per_epoch, 12)
        for batch in batches:
            classes, counts = np.unique(labels[batch], return_counts=True)
            assert len(classes) == 4 and set(counts.tolist()) == {3}


def test_small_classes_drop_rule():
    labels = labels_with_sizes([2, 10, 10, 10])
    plan = BatchPlan(labels, 6, samples_per_class=3, small_classes="drop")
    assert 0 not in labels[plan.epoch(0)]
    assert 0 in labels[BatchPlan(labels, 6, samples_per_class=3, small_classes="repeat").epoch(0)]


def test_same_seed_same_batches_other_seed_other_batches():
    labels = labels_with_sizes([20] * 8)
    a = BatchPlan(labels, 16, samples_per_class=4, seed=1)
    assert np.array_equal(a.epoch(2), BatchPlan(labels, 16, samples_per_class=4, seed=1).epoch(2))
    assert not np.array_equal(a.epoch(2), BatchPlan(labels, 16, samples_per_class=4, seed=2).epoch(2))
    assert not np.array_equal(a.epoch(2), a.epoch(3))


def test_an_epoch_visits_the_data_about_once():
    labels = labels_with_sizes([40] * 10)
    plan = BatchPlan(labels, 20, samples_per_class=4, seed=0)
    seen = np.bincount(plan.epoch(0).ravel(), minlength=len(labels))
    assert plan.steps_per_epoch == 20 and seen.max() == 1 and seen.sum() == 400


@pytest.mark.parametrize("world", [2, 3])
def test_rank_slices_reassemble_the_global_batch(world):
    labels = labels_with_sizes([15] * 6)
    plan = BatchPlan(labels, 12, samples_per_class=2, seed=3)
    per_rank = [list(RankBatches(plan, r, world)) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # equal step counts
    for step, global_batch in enumerate(plan.epoch(0)):
        joined = [i for r in range(world) for i, _ in per_rank[r][step]]
        assert joined == global_batch.tolist()
        seeds = [s for r in range(world) for _, s in per_rank[r][step]]
        assert seeds == augmentation_seeds(3, 0, step, 12).tolist()  # independent of the rank count


def test_resume_mid_epoch_continues_with_the_same_batches():
    labels = labels_with_sizes([11] * 7)
    plan = BatchPlan(labels, 6, samples_per_class=3, seed=9)
    sampler = RankBatches(plan, 1, 2)
    sampler.set_position(epoch=1)
    full = list(sampler)
    sampler.set_position(epoch=1, start_step=4)
    assert list(sampler) == full[4:] and len(sampler) == len(full) - 4


def test_random_plan():
    labels = labels_with_sizes([10, 3, 8])
    plan = BatchPlan(labels, 7, kind="random", seed=0)
    batches = plan.epoch(0)
    assert batches.shape == (3, 7) and len(np.unique(batches)) == 21


def test_errors_say_what_to_change():
    with pytest.raises(ValueError, match="P=4 distinct classes but the training data has 3"):
        BatchPlan(labels_with_sizes([5, 5, 5]), 8, samples_per_class=2)
    with pytest.raises(ValueError, match="every label is -1"):
        BatchPlan(np.full(10, -1), 4, samples_per_class=2)
    with pytest.raises(ValueError, match="must divide evenly over 3 ranks"):
        RankBatches(BatchPlan(labels_with_sizes([5] * 4), 8, samples_per_class=2), 0, 3)


def test_unlabelled_samples_are_never_drawn():
    labels = labels_with_sizes([10, 10, 10])
    labels[::2] = -1
    drawn = BatchPlan(labels, 6, samples_per_class=2).epoch(0).ravel()
    assert (labels[drawn] >= 0).all()


def test_triplet_plan_draws_anchor_positive_negative_triples():
    from imret.data.sampler import TripletPlan

    labels = np.array([0, 0, 1, 1, 2, 2, 0, 1, 2, 0, 1, 2])
    modalities = np.array(["sketch"] * 6 + ["photo"] * 6)
    plan = TripletPlan(labels, modalities, 6, "sketch", "photo", seed=3)
    batches = plan.epoch(0)
    assert batches.shape == (3, 6)
    triples = batches.reshape(-1, 3)
    assert (modalities[triples[:, 0]] == "sketch").all() and (modalities[triples[:, 1:]] == "photo").all()
    assert (labels[triples[:, 0]] == labels[triples[:, 1]]).all()
    assert (labels[triples[:, 0]] != labels[triples[:, 2]]).all()
    assert sorted(triples[:, 0].tolist()) == list(range(6))  # each anchor once per epoch
    assert np.array_equal(plan.epoch(0), TripletPlan(labels, modalities, 6, "sketch", "photo", seed=3).epoch(0))
    with pytest.raises(ValueError, match="must divide by 3"):
        TripletPlan(labels, modalities, 8, "sketch", "photo")
    with pytest.raises(ValueError, match="modality 'drawing'.*has: photo, sketch"):
        TripletPlan(labels, modalities, 6, "drawing", "photo")

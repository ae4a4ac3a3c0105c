"""Seeded global batch plans, split across ranks.

Every rank computes the same plan of global batches for an epoch from
``(seed, epoch)`` alone and takes its own contiguous slice of each batch. So every
rank runs the same number of steps, two runs with the same seed draw the same
batches, and resuming mid-epoch is starting the plan at a step.

P x K plan (``kind="pk"``): each class's samples are shuffled and cut into chunks of
K; each batch then takes one chunk from each of P distinct classes, drawn without
replacement with probability proportional to the chunks a class has left. Drawing in
proportion to what is left drains the classes at similar rates, so a pass ends with
few chunks unused (a random chunk order packed greedily strands the last classes'
chunks), and it does not favour large classes early in the pass as largest-first
packing would. When fewer than P classes have chunks left, a new pass (a new
shuffle) continues, so an epoch always has exactly ``steps_per_epoch`` batches. A class with fewer than K
samples is topped up by repeating its samples (``small_classes="repeat"``) or left
out (``"drop"``). ``max_per_class`` caps the samples a class contributes per pass.

Random plan (``kind="random"``): a seeded permutation, cut into batches.

Class-shuffle plan (``kind="pid_shuffle"``, the CBIR seed's tf.data pipeline, after
tf_retrieval_baseline): each pass shuffles the list of classes, tiled to at least P entries
when there are fewer than P classes (so a class can fill two slots of one batch), keeps a
whole number of P-slot batches, and gives each slot K samples of its class: a shuffle of
the class's samples repeated ceil(K / n) times, first K taken (no repeats unless the class
has fewer than K samples). Batches stay class-contiguous, K per slot.

Each position of a global batch also gets an augmentation seed derived from
``(seed, epoch, step, position)``, so a sample's augmentation does not depend on
which rank or worker loads it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

_MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """A well-spread 63-bit seed from integers (splitmix64 steps)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & _MASK64)) & _MASK64
        h = (h * 0xBF58476D1CE4E5B9) & _MASK64
        h ^= h >> 31
        h = (h * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 29
    return h >> 1


class BatchPlan:
    """The global batches of every epoch, as arrays of sample indices."""

    def __init__(
        self,
        labels: np.ndarray,
        batch_size: int,
        *,
        kind: str = "pk",
        samples_per_class: int = 4,
        seed: int = 0,
        steps_per_epoch: int = 0,
        small_classes: str = "repeat",
        max_per_class: int = 0,
    ) -> None:
        self.labels = np.asarray(labels)
        self.batch_size = batch_size
        self.kind = kind
        self.k = samples_per_class
        self.seed = seed
        self.small_classes = small_classes
        self.max_per_class = max_per_class
        self._by_class = self._group()
        usable = sum(len(v) for v in self._by_class.values())
        self.steps_per_epoch = steps_per_epoch or usable // batch_size
        self._check()

    def _group(self) -> dict[int, np.ndarray]:
        valid = np.flatnonzero(self.labels >= 0)  # -1: unlabelled, not trained on
        order = np.argsort(self.labels[valid], kind="stable")
        valid = valid[order]
        classes, starts = np.unique(self.labels[valid], return_index=True)
        groups = np.split(valid, starts[1:])
        by_class = {int(c): g for c, g in zip(classes, groups)}
        if self.kind == "pk" and self.small_classes == "drop":  # pid_shuffle keeps every class, as its seed
            by_class = {c: g for c, g in by_class.items() if len(g) >= self.k}
        return by_class

    def _check(self) -> None:
        if not self._by_class:
            raise ValueError("no labelled training samples (every label is -1, or the split is empty)")
        if self.kind == "pk":
            p = self.batch_size // self.k
            if len(self._by_class) < p:
                raise ValueError(
                    f"a P x K batch needs P={p} distinct classes but the training data has {len(self._by_class)} "
                    f"usable classes; lower data.batch_size or raise data.samples_per_class."
                )
        if self.steps_per_epoch < 1:
            n = sum(len(v) for v in self._by_class.values())
            raise ValueError(f"{n} training samples do not fill one batch of {self.batch_size}; lower data.batch_size")

    @property
    def num_classes(self) -> int:
        return len(self._by_class)

    def epoch(self, epoch: int) -> np.ndarray:
        """``[steps_per_epoch, batch_size]`` global sample indices."""
        batches: list[np.ndarray] = []
        for pass_no in range(1_000_000):
            rng = np.random.default_rng([self.seed, epoch, pass_no])
            batches.extend(self._pass(rng))
            if len(batches) >= self.steps_per_epoch:
                return np.stack(batches[: self.steps_per_epoch])
        raise AssertionError("unreachable: every pass yields at least one batch")

    def _pass(self, rng: np.random.Generator) -> list[np.ndarray]:
        if self.kind == "pk":
            return self._pk_pass(rng)
        if self.kind == "pid_shuffle":
            return self._pid_pass(rng)
        pool = np.concatenate([self._capped(g, rng) for g in self._by_class.values()])
        pool = rng.permutation(pool)
        n = len(pool) // self.batch_size
        return list(pool[: n * self.batch_size].reshape(n, self.batch_size)) or [
            rng.choice(pool, self.batch_size, replace=True)
        ]

    def _capped(self, group: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        group = rng.permutation(group)
        return group[: self.max_per_class] if self.max_per_class else group

    def _pk_pass(self, rng: np.random.Generator) -> list[np.ndarray]:
        chunks: list[np.ndarray] = []  # per class: its chunks, K samples each
        for group in self._by_class.values():
            group = self._capped(group, rng)
            if len(group) % self.k:  # top up the last chunk with repeats of this class
                extra = rng.choice(group, self.k - len(group) % self.k, replace=len(group) < self.k)
                group = np.concatenate([group, extra])
            chunks.append(group.reshape(-1, self.k))
        return _draw_batches(chunks, self.batch_size // self.k, rng)


    def _pid_pass(self, rng: np.random.Generator) -> list[np.ndarray]:
        classes = np.fromiter(self._by_class, dtype=np.int64)
        p = self.batch_size // self.k
        if len(classes) < p:
            classes = np.tile(classes, -(-p // len(classes)))
        slots = rng.permutation(classes)[: len(classes) // p * p]
        picks = [self._k_samples(self._by_class[int(c)], rng) for c in slots]
        return list(np.concatenate(picks).reshape(-1, self.batch_size))

    def _k_samples(self, group: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """K samples of a class: its samples repeated to at least K, shuffled, the first K."""
        return rng.permutation(np.tile(group, -(-self.k // len(group))))[: self.k]


def _draw_batches(chunks: list[np.ndarray], p: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Batches of ``p`` chunks of distinct classes, classes drawn in proportion to their chunks left."""
    left = np.array([len(c) for c in chunks], dtype=np.float64)
    taken = np.zeros(len(chunks), dtype=np.int64)
    batches = []
    while np.count_nonzero(left) >= p:
        classes = rng.choice(len(chunks), p, replace=False, p=left / left.sum())
        batches.append(np.concatenate([chunks[c][taken[c]] for c in classes]))
        taken[classes] += 1
        left[classes] -= 1
    return batches


def augmentation_seeds(seed: int, epoch: int, step: int, batch_size: int) -> np.ndarray:
    base = mix_seed(seed, epoch, step)
    return np.array([mix_seed(base, i) for i in range(batch_size)], dtype=np.int64)


class RankBatches(Sampler[list[tuple[int, int]]]):  # plan: a BatchPlan or a TripletPlan
    """This rank's slice of each global batch, as ``(index, augmentation seed)`` pairs.

    Set ``epoch`` (and ``start_step`` when resuming) before iterating; a DataLoader
    with persistent workers iterates this sampler afresh for every epoch.
    """

    def __init__(self, plan: BatchPlan | TripletPlan, rank: int, world_size: int) -> None:
        if plan.batch_size % world_size:
            raise ValueError(f"the global batch ({plan.batch_size}) must divide evenly over {world_size} ranks")
        self.plan, self.rank, self.world_size = plan, rank, world_size
        self.local = plan.batch_size // world_size
        self.epoch = 0
        self.start_step = 0

    def set_position(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return self.plan.steps_per_epoch - self.start_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batches = self.plan.epoch(self.epoch)
        lo, hi = self.rank * self.local, (self.rank + 1) * self.local
        for step in range(self.start_step, len(batches)):
            seeds = augmentation_seeds(self.plan.seed, self.epoch, step, self.plan.batch_size)
            yield list(zip(batches[step, lo:hi].tolist(), seeds[lo:hi].tolist()))


class TripletPlan:
    """Global batches of (anchor, positive, negative) triples across two modalities.

    The sketch-retrieval recipe: anchors are samples of one modality (sketches), each
    paired with a random sample of the other modality (photos) of the same class and
    one of a different class. A batch of B holds B/3 triples as
    ``[a1, p1, n1, a2, p2, n2, ...]``; the labels keep the loss label-based (anchor and
    positive share a class, the negative has its own). An epoch visits each anchor
    about once; everything is drawn from ``(seed, epoch)`` like ``BatchPlan``.
    """

    def __init__(self, labels: np.ndarray, modalities: np.ndarray, batch_size: int, anchor: str, positive: str,
                 *, seed: int = 0, steps_per_epoch: int = 0) -> None:
        if batch_size % 3:
            raise ValueError(f"a triplet batch holds whole triples: data.batch_size ({batch_size}) must divide by 3")
        self.labels, self.batch_size, self.seed = np.asarray(labels), batch_size, seed
        valid = self.labels >= 0
        self.anchors = np.flatnonzero(valid & (modalities == anchor))
        gallery = np.flatnonzero(valid & (modalities == positive))
        if not len(self.anchors) or not len(gallery):
            found = ", ".join(sorted(set(modalities.tolist())))
            raise ValueError(f"triplets need samples of modality '{anchor}' (anchors) and '{positive}' (positives); "
                             f"the training data has: {found}")
        order = np.argsort(self.labels[gallery], kind="stable")
        self.gallery = gallery[order]
        classes, starts, counts = np.unique(self.labels[self.gallery], return_index=True, return_counts=True)
        self._slice = {int(c): (s, n) for c, s, n in zip(classes, starts, counts)}
        self.anchors = self.anchors[np.isin(self.labels[self.anchors], classes)]  # anchors need a positive
        if len(classes) < 2:
            raise ValueError("triplets need positives of at least two classes (one for negatives)")
        self.steps_per_epoch = steps_per_epoch or max(len(self.anchors) // (batch_size // 3), 1)

    @property
    def num_classes(self) -> int:
        return len(self._slice)

    def epoch(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch, 7])
        per = self.batch_size // 3
        need = self.steps_per_epoch * per
        anchors = np.concatenate([rng.permutation(self.anchors) for _ in range(-(-need // len(self.anchors)))])[:need]
        positives = np.array([self._draw(int(self.labels[a]), rng) for a in anchors])
        negatives = np.array([self._draw_other(int(self.labels[a]), rng) for a in anchors])
        triples = np.stack([anchors, positives, negatives], axis=1)  # need x 3
        return triples.reshape(self.steps_per_epoch, self.batch_size)

    def _draw(self, cls: int, rng: np.random.Generator) -> int:
        start, count = self._slice[cls]
        return int(self.gallery[start + rng.integers(count)])

    def _draw_other(self, cls: int, rng: np.random.Generator) -> int:
        while True:
            pick = int(self.gallery[rng.integers(len(self.gallery))])
            if self.labels[pick] != cls:
                return pick

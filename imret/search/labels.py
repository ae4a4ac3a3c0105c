"""Which database items are each query's positives: class slices of a label-ordered database."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def positives_per_query(query_labels: np.ndarray, database_labels: np.ndarray, exclude_self: bool) -> np.ndarray:
    classes, counts = np.unique(database_labels, return_counts=True)
    pos = np.searchsorted(classes, query_labels)
    pos = np.clip(pos, 0, max(len(classes) - 1, 0))
    found = (classes[pos] == query_labels) if len(classes) else np.zeros(len(query_labels), bool)
    return np.where(found, counts[pos], 0).astype(np.int64) - int(exclude_self)


@dataclass
class LabelIndex:
    """A database ordered by label, so that each class's items are one slice of ``order``."""

    order: np.ndarray  # label order -> database row
    inverse: np.ndarray  # database row -> position in label order
    classes: np.ndarray
    starts: np.ndarray
    counts: np.ndarray

    @classmethod
    def build(cls, labels: np.ndarray) -> LabelIndex:
        order = np.argsort(labels, kind="stable")
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        classes, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
        return cls(order, inverse, classes, starts, counts)

    def slices(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Start (in label order) and size of each label's slice; size 0 for labels not present."""
        if not len(self.classes):
            return np.zeros(len(labels), np.int64), np.zeros(len(labels), np.int64)
        ci = np.searchsorted(self.classes, labels).clip(0, len(self.classes) - 1)
        found = self.classes[ci] == labels
        return np.where(found, self.starts[ci], 0).astype(np.int64), np.where(found, self.counts[ci], 0).astype(np.int64)

"""What every clustering method returns, and what a learning method is given."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Clustering:
    labels: np.ndarray  # int64 per sample: its cluster, 0..clusters-1 (every sample has one)
    density: np.ndarray  # float32 per sample
    selected: np.ndarray  # bool per sample: confident enough to train on
    info: dict[str, Any] = field(default_factory=dict)  # how the graph was built, timings


@dataclass
class Known:
    """What a learning method trains on: labelled features, and where to keep its files."""

    features: np.ndarray  # (m, d) float32: the labelled splits, then the samples selected so far
    labels: np.ndarray  # (m,) int64: true labels, then the frozen pseudo-labels
    workdir: Path  # the method's checkpoint and log go here (runs/<exp>/cluster/<method>/)

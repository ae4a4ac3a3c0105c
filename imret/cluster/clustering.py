"""What every clustering method returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Clustering:
    labels: np.ndarray  # int64 per sample: its cluster, 0..clusters-1 (every sample has one)
    density: np.ndarray  # float32 per sample
    selected: np.ndarray  # bool per sample: confident enough to train on
    info: dict[str, Any] = field(default_factory=dict)  # how the graph was built, timings


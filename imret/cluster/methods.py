"""The pseudo-labelling methods, by the name ``cluster.method`` gives them.

A method is a function ``(features, ClusterConfig, Known | None) -> Clustering``. A
method that learns (``LEARNS``) is given ``Known``: the features and labels it trains
on, and a directory for its checkpoint and log; the others are given None. Methods are
named as ``module:function`` and imported only when one runs, so checking a config
does not load a method's dependencies.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

import numpy as np

from imret.cluster.clustering import Clustering, Known
from imret.config import ClusterConfig

DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
Method = Callable[[np.ndarray, ClusterConfig, Known | None], Clustering]
METHODS: dict[str, str] = {
    "density": "imret.cluster.density:density_peaks",
    "hilander": "imret.cluster.hilander:hilander",
}
LEARNS: frozenset[str] = frozenset({"hilander"})  # methods that are given Known


def get_method(name: str) -> Method:
    """The method called ``name``; ValueError listing the known ones."""
    if name not in METHODS:
        raise ValueError(f"cluster.method: unknown method '{name}'; the known methods are "
                         f"{', '.join(sorted(METHODS))} (imret.cluster.methods.METHODS)")
    module, _, attr = METHODS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def check(params: ClusterConfig) -> None:
    """User errors in the cluster section, each with what to change."""
    if params.method not in METHODS:
        get_method(params.method)  # raises, naming the known methods
    if not params.splits:
        raise ValueError("cluster.splits is empty: name the unlabelled split(s) whose features to pseudo-label")
    both = sorted(set(params.splits) & set(params.labelled))
    if both:
        raise ValueError(f"cluster.splits and cluster.labelled both name {', '.join(both)}: a split is either "
                         "kept with its true labels or pseudo-labelled, not both")
    if min(params.k, params.min_size, params.levels) < 1 or min(params.exact_below, params.recall_sample) < 0:
        raise ValueError(f"cluster: k ({params.k}), min_size ({params.min_size}) and levels ({params.levels}) "
                         f"must be at least 1, "
                         f"exact_below ({params.exact_below}) and recall_sample ({params.recall_sample}) "
                         "at least 0")
    for name in ("tau", "thresh"):
        value = getattr(params, name)
        if not -1.0 <= value <= 1.0:
            raise ValueError(f"cluster.{name} = {value} is not a cosine similarity: choose a value in [-1, 1] "
                             "(features are L2-normalised, so similarities and densities lie there)")
    if params.method == "hilander":
        check_hilander(params)


def check_hilander(params: ClusterConfig) -> None:
    """Hi-LANDER's own rules: tau is a probability, the training sets pair up, the layers exist."""
    h = params.hilander
    if not 0.0 <= params.tau <= 1.0:
        raise ValueError(f"cluster.tau = {params.tau}: for hilander, tau is a probability (keep an edge when "
                         "P(same class) > tau; PSS uses 0.9): choose a value in [0, 1]")
    if len(h.train_k) != len(h.train_levels) or not h.train_k:
        raise ValueError(f"cluster.hilander.train_k {h.train_k} and train_levels {h.train_levels} must be equally "
                         "long and not empty: one set of training graphs per k (PSS: [10, 5, 3] and [2, 3, 4])")
    if min(h.train_k) < 2 or min(h.train_levels) < 1:
        raise ValueError(f"cluster.hilander.train_k {h.train_k} needs every k >= 2 (a node and a neighbour) and "
                         f"train_levels {h.train_levels} every value >= 1")
    if h.num_conv > 4 or h.momentum >= 1:
        raise ValueError(f"cluster.hilander: num_conv ({h.num_conv}) must be 1 to 4 (the layers LANDER defines) "
                         f"and momentum ({h.momentum}) below 1")
    if not DEVICE.match(h.device):
        raise ValueError(f"cluster.hilander.device = {h.device!r}: choose auto, cpu, cuda or cuda:N")
    if params.index != "hnsw":
        raise ValueError(f"cluster.index = {params.index}: hilander's approximate k-NN (above cluster.exact_below "
                         "points) is HNSW only; set cluster.index: hnsw")

"""Drive the DGL Hi-LANDER example (dmlc/dgl examples/pytorch/hilander) from our scripts.

Runs only in the DGL environment (a separate virtualenv: dgl 2.1.0, torch 2.2.1 on CPU,
torchdata 0.7.1, numpy < 2, pandas < 2.3), and only for bench/hilander_reference.py;
imret and its tests never import it, and DGL is not a dependency of imret. Two things live here:

1. Shims that let the example import on a current stack, without changing it on disk:
   - ``np.long`` (removed in numpy 1.24) is used for empty index arrays: alias it to int;
   - ``utils/evaluate.py`` imports ``clustering_benchmark`` (an extra report we do not
     use) and PSS's test script imports ``seaborn`` and ``matplotlib``: empty stand-ins;
   - ``utils/__init__.py`` star-imports ``evaluate`` before ``misc``, and ``evaluate``
     needs ``TextColors``/``Timer`` from ``misc``: we create the package object, load
     ``misc`` into it, then run the package's own ``__init__`` in it.
2. The loops of PSS/train_subg_inat.py and PSS/test_subg_inat.py as functions. The
   scripts parse argv and read pickles at import time, so they cannot be called; these
   functions make the same calls to the example's LanderDataset, LANDER, decode,
   build_next_level and stop_iterating, in the same order (line numbers cited below).
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import types
from collections.abc import Callable
from typing import Any

import numpy as np


def _stub(name: str, **attrs: Any) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules.setdefault(name, module)


def load_hilander(example_dir: str) -> dict[str, Any]:
    """The example's modules by name: ``utils``, ``models``, ``dataset`` (after the shims)."""
    if not hasattr(np, "long"):
        np.long = int  # type: ignore[attr-defined]
    _stub("clustering_benchmark", ClusteringBenchmark=object)
    _stub("seaborn")
    _stub("matplotlib", pyplot=types.ModuleType("matplotlib.pyplot"))
    sys.modules.setdefault("matplotlib.pyplot", sys.modules["matplotlib"].pyplot)
    example_dir = os.path.abspath(example_dir)
    if example_dir not in sys.path:
        sys.path.insert(0, example_dir)
    _load_utils(os.path.join(example_dir, "utils"))
    return {name: importlib.import_module(name) for name in ("utils", "models", "dataset")}


def _load_utils(utils_dir: str) -> None:
    if "utils" in sys.modules and hasattr(sys.modules["utils"], "decode"):
        return
    package = types.ModuleType("utils")
    package.__path__ = [utils_dir]  # type: ignore[attr-defined]
    package.__package__ = "utils"
    package.__file__ = os.path.join(utils_dir, "__init__.py")
    sys.modules["utils"] = package
    misc = importlib.import_module("utils.misc")
    package.__dict__.update({k: v for k, v in vars(misc).items() if not k.startswith("_")})
    with open(package.__file__) as f:
        exec(compile(f.read(), package.__file__, "exec"), package.__dict__)


# ----------------------------------------------------------------------------- the loops


def make_lander(feature_dim: int, p: dict[str, Any]) -> Any:
    """LANDER as both PSS scripts construct it (train_subg_inat.py:141-151)."""
    from models import LANDER

    return LANDER(feature_dim=feature_dim, nhid=p["hidden"], num_conv=p["num_conv"], dropout=p.get("dropout", 0.0),
                  use_GAT=p["gat"], K=p.get("gat_k", 1), balance=p.get("balance", False),
                  use_cluster_feat=p.get("use_cluster_feat", False), use_focal_loss=p.get("use_focal_loss", False))


def training_graphs(features: np.ndarray, labels: np.ndarray, knn_k: list[int], levels: list[int]) -> tuple[list, list]:
    """train_subg_inat.py:79-98: one LanderDataset per (k, levels); all their graphs in order."""
    from dataset import LanderDataset

    gs, ks = [], []
    for k, lvl in zip(knn_k, levels):
        data = LanderDataset(features=features, labels=labels, k=k, levels=lvl, faiss_gpu=False)
        gs += list(data.gs)
        ks += [k] * len(data.gs)
    return gs, ks


def _loader(g: Any, k: int, num_conv: int, batch_size: int, shuffle: bool) -> Any:
    """train_subg_inat.py:116-129 (and test_subg_inat.py:148-159 with shuffle off)."""
    import dgl
    import torch

    sampler = dgl.dataloading.MultiLayerNeighborSampler([k - 1] * (num_conv + 1))
    return dgl.dataloading.DataLoader(g, torch.arange(g.num_nodes()), sampler, batch_size=batch_size,
                                      shuffle=shuffle, drop_last=False, num_workers=0)


def train(model: Any, gs: list, ks: list, p: dict[str, Any], shuffle: bool = True,
          on_step: Callable[[int, Any, Any, tuple[float, float, float]], None] | None = None,
          on_epoch: Callable[[int, Any], None] | None = None) -> list[list[float]]:
    """train_subg_inat.py:152-227: the epoch loop; returns each epoch's mean (loss, den, conn).

    ``on_step(graph index, seed nodes, output block, losses)`` sees each step after the loss
    (whose balancing has marked the block's edges it kept), ``on_epoch(epoch, optimizer)``
    each epoch's end; neither draws anything, so watching a run does not change it.
    """
    import torch

    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=p["lr"], momentum=p["momentum"], weight_decay=p["weight_decay"])
    loaders = [_loader(g, k, p["num_conv"], p["batch_size"], shuffle) for g, k in zip(gs, ks)]
    rounds = len(loaders[0])
    iters = [iter(loader) for loader in loaders]
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=p["epochs"] * rounds * len(loaders), eta_min=1e-5)
    history = []
    for epoch in range(p["epochs"]):
        losses = []
        for _ in range(rounds):
            for i in range(len(loaders)):
                try:
                    _, seeds, blocks = next(iters[i])
                except StopIteration:  # the script's bare except: a fresh loader, reshuffled
                    iters[i] = iter(_loader(gs[i], ks[i], p["num_conv"], p["batch_size"], shuffle))
                    _, seeds, blocks = next(iters[i])
                opt.zero_grad()
                out = model(blocks)
                loss, den, conn = model.compute_loss(out)
                losses.append((loss.item(), den, conn))
                if on_step is not None:
                    on_step(i, seeds, out, losses[-1])
                loss.backward()
                opt.step()
                sched.step()
        history.append(np.mean(np.array(losses), 0).tolist())
        if on_epoch is not None:
            on_epoch(epoch, opt)
    return history


def predict(model: Any, g: Any, k: int, num_conv: int, batch_size: int) -> None:
    """test_subg_inat.py:186-204: fills g's pred_den and prob_conn, minibatch by minibatch."""
    import dgl
    import torch

    g.ndata["pred_den"] = torch.zeros(g.num_nodes())
    g.edata["prob_conn"] = torch.zeros((g.num_edges(), 2))
    model.eval()
    for _, _, blocks in _loader(g, k, num_conv, batch_size, shuffle=False):
        with torch.no_grad():
            out = model(blocks)
        g.ndata["pred_den"][out.dstdata[dgl.NID]] = out.dstdata["pred_den"]
        g.edata["prob_conn"][out.edata["global_eid"]] = out.edata["prob_conn"]


def cluster(model: Any, features: np.ndarray, labels: np.ndarray, p: dict[str, Any]) -> dict[str, Any]:
    """test_subg_inat.py:130-290 (mode selectbydensity) on the unlabelled features.

    One change: where the next level would have at most k nodes, the script's
    LanderDataset builds no graph and ``dataset.gs[0]`` raises IndexError; we stop there.
    """
    from dataset import LanderDataset
    from utils import build_next_level, decode, stop_iterating

    k = p["test_k"]
    global_features = features.copy()
    g = LanderDataset(features=features, labels=labels, k=k, levels=1, faiss_gpu=False).gs[0]
    ids, global_edges, global_peaks = np.arange(g.num_nodes()), ([], []), np.array([], dtype=np.int64)
    edges_before, added_before, n_global = 0, math.inf, g.num_nodes()
    out: dict[str, Any] = {"nodes": [], "edges_added": []}
    for level in range(p["test_levels"]):
        out["nodes"].append(g.num_nodes())
        predict(model, g, k, p["num_conv"], p.get("test_batch_size", 4096))
        _, peaks, global_edges, global_labels, global_peaks = decode(
            g, p["tau"], "prob", False, ids, global_edges, n_global, global_peaks)
        if level == 0:
            out["density"] = g.ndata["pred_den"].numpy().copy()
        ids = ids[peaks]
        added = len(global_edges[0]) - edges_before
        out["edges_added"].append(added)
        if stop_iterating(level, p["test_levels"], p["early_stop"], added, added_before, k):
            break
        edges_before, added_before = len(global_edges[0]), added
        features, labels, cluster_features = build_next_level(
            features, labels, peaks, global_features, global_labels, global_peaks)
        data = LanderDataset(features=features, labels=labels, k=k, levels=1, faiss_gpu=False,
                             cluster_features=cluster_features)
        if not data.gs:
            out["stopped"] = "fewer peaks than k"
            break
        g = data.gs[0]
    out["labels"] = np.asarray(global_labels)
    # test_subg_inat.py:275-281: selection on the level-0 density, compared in float64.
    out["selected"] = out["density"].astype(float) > p["thresh"]
    return out

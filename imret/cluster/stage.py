"""The cluster stage: pseudo-labels for the cluster-finetune loop.

Iteration k of the loop fine-tunes on the labelled split(s) plus the confidently
pseudo-labelled samples of the unlabelled split(s). This stage clusters the
unlabelled features with ``cluster.method`` (``imret.cluster.methods``) and writes
``runs/<exp>/cluster/labels.npz`` (the pseudo-label sidecar, rebuilt from scratch
every time, so an earlier iteration's selections never carry over),
``cluster/results.json`` and TensorBoard scalars. See docs/clustering.md.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from imret.checkpoint import latest_step
from imret.cluster.clustering import Clustering
from imret.cluster.methods import check, get_method
from imret.config import ExperimentConfig
from imret.data.labels import LABELLED, Sidecar, build_sidecar, save_sidecar
from imret.data.shards import ShardSplit
from imret.distributed import DistInfo
from imret.features import load_features
from imret.metrics import quality
from imret.rundir import RunDir, atomic_write_json
from imret.tb import make_board


def cluster_stage(cfg: ExperimentConfig, run: RunDir, info: DistInfo) -> dict[str, Any]:
    """The stage (one process): cluster, write the sidecar and the report."""
    if not info.is_main:  # a single-process stage; extra ranks (if any) have nothing to do
        return {}
    params = cfg.cluster
    check(params)
    started = time.perf_counter()
    embeddings, keys, truth = load_unlabelled(run, params.splits)
    result = get_method(params.method)(embeddings, params, None)
    labelled_keys, labelled_labels = load_labelled(cfg.data.root, params.labelled)
    sidecar = build_sidecar(labelled_keys, labelled_labels, keys, result.labels, result.selected)
    save_sidecar(run.cluster / "labels.npz", sidecar.keys, sidecar.labels, sidecar.mask)
    results = summarise(result, sidecar, truth)
    results["seconds"] = round(time.perf_counter() - started, 3)
    results["meta"] = _meta(cfg, result.info)
    atomic_write_json(run.cluster / "results.json", results)
    _to_tensorboard(run, info, results)
    _print_report(cfg, run, results)
    return {k: v for k, v in results.items() if k != "meta"}


def load_unlabelled(run: RunDir, splits: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features, keys and held-out labels (-1: unknown) of the splits to cluster, concatenated."""
    parts = [load_features(run, split) for split in splits]
    return (np.concatenate([p.embeddings for p in parts]), np.concatenate([p.keys for p in parts]),
            np.concatenate([p.labels for p in parts]).astype(np.int64))


def load_labelled(root: str, splits: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Keys and true labels of the labelled splits, read from their shards' indices."""
    readers = [ShardSplit(root, split) for split in splits]
    if not readers:
        return np.array([], dtype=str), np.array([], dtype=np.int64)
    return np.concatenate([r.keys for r in readers]), np.concatenate([r.labels for r in readers])


def summarise(result: Clustering, sidecar: Sidecar, truth: np.ndarray) -> dict[str, Any]:
    """Counts, and quality against the held-out labels where the clustered samples have them.

    Plain names score the selected samples with their pseudo-labels (what training will
    see); names ending in ``_all`` score every clustered sample's cluster, before selection.
    """
    n, chosen = len(result.labels), result.selected
    out: dict[str, Any] = {
        "samples": n, "clusters": sidecar.clusters, "clusters_all": int(result.labels.max(initial=-1)) + 1,
        "selected": int(chosen.sum()), "selected_fraction": float(chosen.mean()) if n else 0.0,
        "unselected": int(n - chosen.sum()), "labelled": int((sidecar.mask == LABELLED).sum()),
        "labelled_classes": sidecar.classes,
    }
    if result.info.get("recall") is not None:
        out["knn_recall"] = result.info["recall"]
    known = truth >= 0
    if known.any():
        out["truth_classes"] = int(len(np.unique(truth[known])))
        out.update({f"{k}_all": v for k, v in quality(result.labels[known], truth[known]).items()})
        pseudo = sidecar.labels[len(sidecar.labels) - n:]
        if (chosen & known).any():
            out.update(quality(pseudo[chosen & known], truth[chosen & known]))
    return out


def _meta(cfg: ExperimentConfig, info: dict[str, Any]) -> dict[str, Any]:
    c = cfg.cluster
    return {"experiment": cfg.name, "config_digest": cfg.digest(), "method": c.method, "k": c.k, "tau": c.tau,
            "thresh": c.thresh, "min_size": c.min_size, "levels": c.levels, "splits": c.splits, "labelled": c.labelled,
            "index": info.get("method"), "device": info.get("device"), "index_params": info.get("params", {}),
            "timings_s": {k: round(v, 3) for k, v in info.items() if k.endswith("_s")},
            "sidecar": "rebuilt from scratch; earlier selections are not carried over"}


def _to_tensorboard(run: RunDir, info: DistInfo, results: dict[str, Any]) -> None:
    board = make_board(info, run.tb)
    numbers = {k: float(v) for k, v in results.items() if isinstance(v, (int, float))}
    board.scalars(numbers, latest_step(run), prefix="cluster/")
    board.close()


def _print_report(cfg: ExperimentConfig, run: RunDir, r: dict[str, Any]) -> None:
    m = r["meta"]
    recall = f", recall@{m['k']} {r['knn_recall']:.3f}" if "knn_recall" in r else ""
    print(f"cluster: {cfg.name}: {r['samples']} samples of {'+'.join(m['splits'])}, k={m['k']} "
          f"({m['index']} k-NN on {m['device']}{recall}), tau {m['tau']:.4g}, thresh {m['thresh']:.4g}")
    print(f"  selected {r['selected']} ({100 * r['selected_fraction']:.1f}%) in {r['clusters']} pseudo-classes "
          f"(of {r['clusters_all']} clusters); {r['unselected']} unselected")
    for suffix, what in (("", "selected"), ("_all", "all")):
        if f"pairwise_f{suffix}" in r:
            print(f"  {what:<9} pairwise F {r['pairwise_f' + suffix]:.4f}  BCubed F {r['bcubed_f' + suffix]:.4f}  "
                  f"NMI {r['nmi' + suffix]:.4f}")
    print(f"  sidecar   {run.cluster / 'labels.npz'} ({r['labelled']} labelled samples in "
          f"{r['labelled_classes']} classes, mask 0; selected mask 1; unselected mask 2) in {r['seconds']:.1f} s")


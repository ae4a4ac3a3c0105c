"""The cluster stage: pseudo-labels for the cluster-finetune loop.

Iteration k of the loop fine-tunes on the labelled split(s) plus the confidently
pseudo-labelled samples of the unlabelled split(s). This stage clusters the
unlabelled features with ``cluster.method`` (``imret.cluster.methods``) and writes
``runs/<exp>/cluster/labels.npz`` (the pseudo-label sidecar), ``cluster/results.json``
and TensorBoard scalars. As in PSS the masks are cumulative (``cluster.cumulative``):
samples the previous iteration's sidecar (``data.pseudo_labels``) selected keep their
pseudo-labels, frozen (mask 3), and only the rest is clustered again. The report scores
every subset of the unlabelled data (``imret.cluster.subsets``). See docs/clustering.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from imret.checkpoint import latest_step
from imret.cluster.clustering import Clustering, Known
from imret.cluster.methods import LEARNS, check, get_method
from imret.cluster.subsets import flat, subset_report
from imret.config import ExperimentConfig
from imret.data.labels import (FROZEN, LABELLED, Sidecar, build_sidecar, earlier_labels, frozen_labels, load_sidecar,
                               resolve_sidecar, save_sidecar)
from imret.data.shards import ShardSplit
from imret.distributed import DistInfo
from imret.features import is_complete, load_features
from imret.metrics import quality
from imret.rundir import RunDir, atomic_write_json
from imret.tb import make_board


@dataclass
class Unlabelled:
    embeddings: np.ndarray
    keys: np.ndarray
    truth: np.ndarray  # held-out labels, -1: unknown
    split_of: np.ndarray  # the cluster split each sample comes from


def cluster_stage(cfg: ExperimentConfig, run: RunDir, info: DistInfo) -> dict[str, Any]:
    """The stage (one process): cluster, write the sidecar and the report."""
    if not info.is_main:  # a single-process stage; extra ranks (if any) have nothing to do
        return {}
    params = cfg.cluster
    check(params)
    started = time.perf_counter()
    u = load_unlabelled(run, params.splits)
    labelled_keys, labelled_labels = load_labelled(cfg.data.root, params.labelled)
    earlier = earlier_labels(previous_sidecar(cfg), u.keys)
    todo = earlier < 0  # only what no earlier iteration selected is clustered (again)
    known = build_known(run, cfg, u, earlier, labelled_labels) if params.method in LEARNS else None
    result = run_method(params.method, u.embeddings[todo], cfg, known)
    clusters, selected = spread(result, todo)
    sidecar = build_sidecar(labelled_keys, labelled_labels, u.keys, clusters, selected, earlier)
    save_sidecar(run.cluster / "labels.npz", sidecar.keys, sidecar.labels, sidecar.mask)
    n_lab = len(labelled_keys)
    results = summarise(result, sidecar, u.truth[todo], sidecar.labels[n_lab:][todo])
    results["subsets"] = subset_report(u.split_of, params.splits, sidecar.mask[n_lab:], sidecar.labels[n_lab:],
                                       clusters, u.truth)
    results.update(flat(results["subsets"]))
    results["seconds"] = round(time.perf_counter() - started, 3)
    results["meta"] = _meta(cfg, result.info)
    atomic_write_json(run.cluster / "results.json", results)
    _to_tensorboard(run, info, results)
    _print_report(cfg, run, results)
    return {k: v for k, v in results.items() if k not in ("meta", "subsets")}


def load_unlabelled(run: RunDir, splits: list[str]) -> Unlabelled:
    """Features, keys, held-out labels (-1: unknown) and split names of the splits to cluster, concatenated."""
    parts = [load_features(run, split) for split in splits]
    return Unlabelled(np.concatenate([p.embeddings for p in parts]), np.concatenate([p.keys for p in parts]),
                      np.concatenate([p.labels for p in parts]).astype(np.int64),
                      np.concatenate([np.full(len(p.keys), s, dtype=object) for s, p in zip(splits, parts)]))


def previous_sidecar(cfg: ExperimentConfig) -> dict[str, np.ndarray] | None:
    """The sidecar this iteration trained with (``data.pseudo_labels``), when selections are cumulative."""
    if not cfg.cluster.cumulative or not cfg.data.pseudo_labels:
        return None
    return load_sidecar(resolve_sidecar(cfg.data.pseudo_labels, cfg.run.root))


def build_known(run: RunDir, cfg: ExperimentConfig, u: Unlabelled, earlier: np.ndarray,
                labelled_labels: np.ndarray) -> Known:
    """What a learning method trains on: the labelled splits' features with their true labels
    (renumbered 0..C-1 as in the sidecar), then the earlier selections with their frozen labels."""
    missing = [s for s in cfg.cluster.labelled if not is_complete(run, s)]
    if missing:
        raise ValueError(f"cluster.method {cfg.cluster.method} learns from the cluster.labelled split(s) "
                         f"{', '.join(missing)}, but {run.root.name} has no features for them: add them to "
                         "extract.splits and run the extract stage again")
    parts = [load_features(run, s) for s in cfg.cluster.labelled]
    features = [p.embeddings for p in parts]
    classes, true = np.unique(np.concatenate([p.labels for p in parts] or [np.zeros(0, np.int64)]),
                              return_inverse=True)
    if len(classes) != len(np.unique(labelled_labels)):
        raise ValueError(f"the features of {', '.join(cfg.cluster.labelled)} in {run.root.name} have "
                         f"{len(classes)} classes, their shards {len(np.unique(labelled_labels))}: the features "
                         "are stale; run the extract stage again (--restart extract)")
    frozen, _ = frozen_labels(earlier, len(classes))
    held = frozen >= 0
    workdir = run.cluster / cfg.cluster.method
    workdir.mkdir(parents=True, exist_ok=True)
    return Known(np.concatenate(features + [u.embeddings[held]]).astype(np.float32),
                 np.concatenate([true.astype(np.int64), frozen[held]]), workdir)


def run_method(name: str, features: np.ndarray, cfg: ExperimentConfig, known: Known | None) -> Clustering:
    """The method on what is left to cluster. With fewer than two samples left (earlier iterations selected
    the rest) there is nothing to group: each stays its own cluster, unselected, and no method runs."""
    n = len(features)
    if n < 2:
        return Clustering(np.arange(n, dtype=np.int64), np.zeros(n, np.float32), np.zeros(n, bool),
                          {"method": "none (fewer than 2 samples left to cluster)"})
    return get_method(name)(features, cfg.cluster, known)


def spread(result: Clustering, todo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The method's clusters and selection put back in place among all unlabelled samples (-1 / False elsewhere)."""
    clusters = np.full(len(todo), -1, np.int64)
    selected = np.zeros(len(todo), bool)
    clusters[todo], selected[todo] = result.labels, result.selected
    return clusters, selected


def load_labelled(root: str, splits: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Keys and true labels of the labelled splits, read from their shards' indices."""
    readers = [ShardSplit(root, split) for split in splits]
    if not readers:
        return np.array([], dtype=str), np.array([], dtype=np.int64)
    return np.concatenate([r.keys for r in readers]), np.concatenate([r.labels for r in readers])


def summarise(result: Clustering, sidecar: Sidecar, truth: np.ndarray, pseudo: np.ndarray) -> dict[str, Any]:
    """Counts, and quality against the held-out labels where the clustered samples have them.

    Plain names score the samples selected now with their pseudo-labels; names ending in
    ``_all`` score every sample clustered now by its cluster, before selection. ``truth``
    and ``pseudo`` (their sidecar labels) are for the samples clustered now;
    ``pseudo_labelled`` counts the frozen ones too.
    """
    n, chosen = len(result.labels), result.selected
    out: dict[str, Any] = {
        "samples": n, "clusters": sidecar.clusters, "clusters_all": int(result.labels.max(initial=-1)) + 1,
        "selected": int(chosen.sum()), "selected_fraction": float(chosen.mean()) if n else 0.0,
        "unselected": int(n - chosen.sum()), "labelled": int((sidecar.mask == LABELLED).sum()),
        "labelled_classes": sidecar.classes, "frozen": int((sidecar.mask == FROZEN).sum()),
        "frozen_classes": sidecar.frozen_classes, "unlabelled": int((sidecar.mask != LABELLED).sum()),
    }
    carried = out["frozen"] + out["selected"]
    out["pseudo_labelled"] = carried
    out["pseudo_labelled_fraction"] = carried / out["unlabelled"] if out["unlabelled"] else 0.0
    if result.info.get("recall") is not None:
        out["knn_recall"] = result.info["recall"]
    known = truth >= 0
    if known.any():
        out["truth_classes"] = int(len(np.unique(truth[known])))
        out.update({f"{k}_all": v for k, v in quality(result.labels[known], truth[known]).items()})
        if (chosen & known).any():
            out.update(quality(pseudo[chosen & known], truth[chosen & known]))
    return out


def _meta(cfg: ExperimentConfig, info: dict[str, Any]) -> dict[str, Any]:
    c = cfg.cluster
    return {"experiment": cfg.name, "config_digest": cfg.digest(), "method": c.method, "k": c.k, "tau": c.tau,
            "thresh": c.thresh, "min_size": c.min_size, "levels": c.levels, "splits": c.splits, "labelled": c.labelled,
            "index": info.get("method"), "device": info.get("device"), "index_params": info.get("params", {}),
            "timings_s": {k: round(v, 3) for k, v in info.items() if k.endswith("_s")},
            "cumulative": c.cumulative, "previous_sidecar": str(resolve_sidecar(cfg.data.pseudo_labels, cfg.run.root))
            if c.cumulative and cfg.data.pseudo_labels else None,
            "sidecar": ("cumulative: earlier selections kept with frozen labels (mask 3), the rest clustered again"
                        if c.cumulative else "rebuilt from scratch; earlier selections are not carried over")}


def _to_tensorboard(run: RunDir, info: DistInfo, results: dict[str, Any]) -> None:
    board = make_board(info, run.tb)
    numbers = {k: float(v) for k, v in results.items() if isinstance(v, (int, float))}
    board.scalars(numbers, latest_step(run), prefix="cluster/")
    board.close()


def _print_report(cfg: ExperimentConfig, run: RunDir, r: dict[str, Any]) -> None:
    m = r["meta"]
    recall = f", recall@{m['k']} {r['knn_recall']:.3f}" if "knn_recall" in r else ""
    print(f"cluster: {cfg.name}: {r['samples']} samples of {'+'.join(m['splits'])} clustered "
          f"({r['frozen']} kept from earlier iterations), k={m['k']} "
          f"({m['index']} k-NN on {m['device']}{recall}), tau {m['tau']:.4g}, thresh {m['thresh']:.4g}")
    print(f"  selected {r['selected']} ({100 * r['selected_fraction']:.1f}%) in {r['clusters']} pseudo-classes "
          f"(of {r['clusters_all']} clusters); {r['unselected']} unselected; pseudo-labelled in all "
          f"{r['pseudo_labelled']} of {r['unlabelled']} ({100 * r['pseudo_labelled_fraction']:.1f}%)")
    for name, s in r["subsets"].items():
        if "pairwise_f" in s:
            print(f"  {name:<10} {s['scored']:>7} scored  pairwise F {s['pairwise_f']:.4f}  "
                  f"BCubed F {s['bcubed_f']:.4f}  NMI {s['nmi']:.4f}")
    print(f"  sidecar   {run.cluster / 'labels.npz'} ({r['labelled']} labelled samples in "
          f"{r['labelled_classes']} classes, mask 0; selected now mask 1; unselected mask 2; "
          f"kept from earlier mask 3) in {r['seconds']:.1f} s")

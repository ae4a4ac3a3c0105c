"""Pseudo-label sidecars: labels for a split without rewriting its shards.

A sidecar is an ``.npz`` with three aligned arrays:

- ``keys``   the sample keys it speaks for (str),
- ``labels`` the label to train with (int64; -1 means "do not train on it"),
- ``mask``   int8, the cluster-finetune loop's meaning: 0 = a labelled sample (its
  true label, renumbered 0..C-1), 1 = selected pseudo-labelled (cluster id + C),
  2 = not selected (label -1).

Samples the sidecar does not mention keep their shard label.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imret.rundir import atomic_write_npz

LABELLED, SELECTED, UNSELECTED = 0, 1, 2


def save_sidecar(path: str | Path, keys: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> None:
    if not len(keys) == len(labels) == len(mask):
        raise ValueError(f"sidecar arrays differ in length: {len(keys)} keys, {len(labels)} labels, {len(mask)} mask")
    atomic_write_npz(Path(path), keys=np.asarray(keys, dtype=str), labels=np.asarray(labels, dtype=np.int64),
                     mask=np.asarray(mask, dtype=np.int8))


def resolve_sidecar(source: str, runs_root: str | Path) -> Path:
    """``data.pseudo_labels``: an .npz path, or the name of a run whose cluster stage wrote one."""
    path = Path(source)
    if path.suffix == ".npz" or path.exists():
        return path
    return Path(runs_root) / source / "cluster" / "labels.npz"


def load_sidecar(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"pseudo-label sidecar {path} does not exist; run the cluster stage that writes it, "
                         "or fix data.pseudo_labels")
    with np.load(path) as z:
        missing = {"keys", "labels", "mask"} - set(z.files)
        if missing:
            raise ValueError(f"pseudo-label sidecar {path} lacks {', '.join(sorted(missing))}")
        return {k: z[k] for k in ("keys", "labels", "mask")}


def apply_sidecar(keys: np.ndarray, labels: np.ndarray, sidecar: dict[str, np.ndarray]) -> np.ndarray:
    """``labels`` with the sidecar's labels put in for the keys it names."""
    out = labels.copy()
    position = {k: i for i, k in enumerate(keys.tolist())}
    for key, label in zip(sidecar["keys"].tolist(), sidecar["labels"].tolist()):
        i = position.get(key)
        if i is not None:
            out[i] = label
    return out


@dataclass
class Sidecar:
    keys: np.ndarray
    labels: np.ndarray  # 0..C-1 labelled, C..C+K-1 selected, -1 not selected
    mask: np.ndarray  # LABELLED, SELECTED or UNSELECTED
    classes: int  # C: labelled classes
    clusters: int  # K: pseudo-classes (selected clusters)


def build_sidecar(labelled_keys: np.ndarray, labelled_labels: np.ndarray, keys: np.ndarray,
                  clusters: np.ndarray, selected: np.ndarray) -> Sidecar:
    """The seed's pseudo-label semantics, built from scratch (earlier selections are not consulted).

    Labelled samples keep their true label renumbered 0..C-1 in sorted order of the
    original labels (mask 0); selected samples get their cluster renumbered 0..K-1 over
    the selected clusters, plus C (mask 1); every other clustered sample gets -1 (mask 2).
    """
    if len(labelled_labels) and int(labelled_labels.min()) < 0:
        raise ValueError("a cluster.labelled split has samples without a label (-1); list only labelled "
                         "splits there and unlabelled ones in cluster.splits")
    classes, true = np.unique(labelled_labels, return_inverse=True)
    picked, pseudo_sel = np.unique(clusters[selected], return_inverse=True)
    pseudo = np.full(len(keys), -1, np.int64)
    pseudo[selected] = pseudo_sel + len(classes)
    all_keys = np.concatenate([np.asarray(labelled_keys, dtype=str), np.asarray(keys, dtype=str)])
    _check_unique(all_keys)
    mask = np.concatenate([np.full(len(labelled_keys), LABELLED), np.where(selected, SELECTED, UNSELECTED)])
    return Sidecar(all_keys, np.concatenate([true.astype(np.int64), pseudo]), mask.astype(np.int8),
                   len(classes), len(picked))


def _check_unique(keys: np.ndarray) -> None:
    values, counts = np.unique(keys, return_counts=True)
    if (counts > 1).any():
        dup = values[counts > 1]
        raise ValueError(f"{len(dup)} sample key(s) occur more than once among cluster.labelled and cluster.splits "
                         f"(e.g. {', '.join(dup[:3].tolist())}); a sidecar maps each key to one label, so "
                         "list each split once and do not pseudo-label a split that is also labelled")


"""Pseudo-label sidecars: labels for a split without rewriting its shards.

A sidecar is an ``.npz`` with three aligned arrays:

- ``keys``   the sample keys it speaks for (str),
- ``labels`` the label to train with (int64; -1 means "do not train on it"),
- ``mask``   int8, the cluster-finetune loop's meaning: 0 = a labelled sample (its
  true label, renumbered 0..C-1), 1 = selected pseudo-labelled at this iteration
  (cluster id + C, after the earlier pseudo-classes), 2 = not selected (label -1),
  3 = selected at an earlier iteration, its pseudo-label frozen (PSS turns these into
  mask 0; imret keeps them apart so that training still knows which classes are real).

Samples the sidecar does not mention keep their shard label.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imret.rundir import atomic_write_npz

LABELLED, SELECTED, UNSELECTED, FROZEN = 0, 1, 2, 3


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
    labels: np.ndarray  # 0..C-1 labelled, C..C+F-1 frozen, C+F..C+F+K-1 selected now, -1 not selected
    mask: np.ndarray  # LABELLED, SELECTED, UNSELECTED or FROZEN
    classes: int  # C: labelled classes
    clusters: int  # K: pseudo-classes selected at this iteration
    frozen_classes: int = 0  # F: pseudo-classes carried over from earlier iterations


def earlier_labels(previous: dict[str, np.ndarray] | None, keys: np.ndarray) -> np.ndarray:
    """Per key, the pseudo-label an earlier iteration selected it with (mask 1 or 3 there), else -1.

    Keys that the previous sidecar held as labelled (mask 0) or did not select stay -1:
    they are clustered again (or are labelled now, which the caller decides).
    """
    out = np.full(len(keys), -1, np.int64)
    if previous is None or not len(keys):
        return out
    chosen = np.isin(previous["mask"], (SELECTED, FROZEN)) & (previous["labels"] >= 0)
    label_of = dict(zip(previous["keys"][chosen].tolist(), previous["labels"][chosen].tolist()))
    for i, key in enumerate(np.asarray(keys, dtype=str).tolist()):
        out[i] = label_of.get(key, -1)
    return out


def frozen_labels(earlier: np.ndarray, classes: int) -> tuple[np.ndarray, int]:
    """Earlier pseudo-labels renumbered to C..C+F-1 (-1 stays -1), and F.

    Earlier iterations numbered their pseudo-classes C, C+1, ... contiguously, so with the
    same labelled classes this is the identity; it only moves labels if C changed.
    """
    held = earlier >= 0
    kinds, index = np.unique(earlier[held], return_inverse=True)
    out = np.full(len(earlier), -1, np.int64)
    out[held] = index + classes
    return out, len(kinds)


def build_sidecar(labelled_keys: np.ndarray, labelled_labels: np.ndarray, keys: np.ndarray,
                  clusters: np.ndarray, selected: np.ndarray, earlier: np.ndarray | None = None) -> Sidecar:
    """The seed's pseudo-label semantics, cumulative over iterations when ``earlier`` is given.

    Labelled samples keep their true label renumbered 0..C-1 in sorted order of the
    original labels (mask 0). Samples an earlier iteration selected (``earlier`` >= 0)
    keep that pseudo-label, renumbered C..C+F-1 (mask 3); their ``clusters``/``selected``
    entries are ignored. Samples selected now get their cluster renumbered over the
    selected clusters, plus C+F (mask 1); every other clustered sample gets -1 (mask 2).
    """
    if len(labelled_labels) and int(labelled_labels.min()) < 0:
        raise ValueError("a cluster.labelled split has samples without a label (-1); list only labelled "
                         "splits there and unlabelled ones in cluster.splits")
    classes, true = np.unique(labelled_labels, return_inverse=True)
    earlier = np.full(len(keys), -1, np.int64) if earlier is None else np.asarray(earlier, np.int64)
    frozen, n_frozen = frozen_labels(earlier, len(classes))
    is_frozen = frozen >= 0
    selected = np.asarray(selected, bool) & ~is_frozen
    picked, pseudo_sel = np.unique(clusters[selected], return_inverse=True)
    pseudo = frozen.copy()
    pseudo[selected] = pseudo_sel + len(classes) + n_frozen
    all_keys = np.concatenate([np.asarray(labelled_keys, dtype=str), np.asarray(keys, dtype=str)])
    _check_unique(all_keys)
    mask_u = np.where(is_frozen, FROZEN, np.where(selected, SELECTED, UNSELECTED))
    mask = np.concatenate([np.full(len(labelled_keys), LABELLED), mask_u])
    return Sidecar(all_keys, np.concatenate([true.astype(np.int64), pseudo]), mask.astype(np.int8),
                   len(classes), len(picked), n_frozen)


def _check_unique(keys: np.ndarray) -> None:
    values, counts = np.unique(keys, return_counts=True)
    if (counts > 1).any():
        dup = values[counts > 1]
        raise ValueError(f"{len(dup)} sample key(s) occur more than once among cluster.labelled and cluster.splits "
                         f"(e.g. {', '.join(dup[:3].tolist())}); a sidecar maps each key to one label, so "
                         "list each split once and do not pseudo-label a split that is also labelled")


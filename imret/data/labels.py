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

from pathlib import Path

import numpy as np

from imret.rundir import atomic_write_bytes

LABELLED, SELECTED, UNSELECTED = 0, 1, 2


def save_sidecar(path: str | Path, keys: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> None:
    if not len(keys) == len(labels) == len(mask):
        raise ValueError(f"sidecar arrays differ in length: {len(keys)} keys, {len(labels)} labels, {len(mask)} mask")
    import io

    buf = io.BytesIO()
    np.savez(buf, keys=np.asarray(keys, dtype=str), labels=np.asarray(labels, dtype=np.int64),
             mask=np.asarray(mask, dtype=np.int8))
    atomic_write_bytes(Path(path), buf.getvalue())


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

"""Meta-class codes of randomized ensembles for image retrieval (REIR).

Branch e of an ensemble of E branches classifies images into M meta-classes; the
real training classes are mapped onto the meta-classes at random, differently per
branch. Class c's code is the column ``codes[:, c]``: its meta-class in each branch,
an E-digit number in base M. Two classes with the same code can never be told apart
by the ensemble's training signal, so the ``fixed`` mode makes every code unique;
``random`` accepts whatever one draw gives (the seed's ablation).

Each branch's mapping is balanced as the seed's is: every meta-class receives
floor(C / M) or ceil(C / M) classes, the extra ones going to a random subset of
meta-classes. Everything is drawn from ``numpy.random.default_rng([seed, ...])``, so
the same (seed, C, E, M, mode) gives the same codes on every rank and in every run;
the loss also keeps them as a buffer, so a checkpoint carries the codes it was
trained with (the seed's ``--load_ids``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

MODES = ("fixed", "random")
FULL_REDRAWS = 10  # like the seed: redraw the whole table a few times before repairing it
REPAIR_SWAPS = 100_000


def draw_codes(num_classes: int, branches: int, meta_class_size: int, mode: str = "fixed",
               seed: int = 0) -> np.ndarray:
    """``branches x num_classes`` meta-class ids in ``[0, meta_class_size)``."""
    check_codes_args(num_classes, branches, meta_class_size, mode)
    for attempt in range(FULL_REDRAWS if mode == "fixed" else 1):
        rng = np.random.default_rng([seed, num_classes, branches, meta_class_size, attempt])
        codes = np.stack([_balanced_row(num_classes, meta_class_size, rng) for _ in range(branches)])
        if mode == "random" or _all_unique(codes):
            return codes
    return _repair(codes, rng)


def check_codes_args(num_classes: int, branches: int, meta_class_size: int, mode: str) -> None:
    """ValueError for settings that cannot give the codes asked for."""
    if mode not in MODES:
        raise ValueError(f"codes: '{mode}' is not a mode; use 'fixed' (every class gets a unique code) or 'random'")
    if branches < 1 or meta_class_size < 2:
        raise ValueError(f"an ensemble needs branches >= 1 and meta_class_size >= 2, got branches={branches}, "
                         f"meta_class_size={meta_class_size}")
    if num_classes < meta_class_size:
        raise ValueError(
            f"meta_class_size ({meta_class_size}) is larger than the number of training classes ({num_classes}): "
            f"some meta-classes would never be a target. Lower meta_class_size below {num_classes + 1}."
        )
    if mode == "fixed" and meta_class_size ** branches < num_classes:
        raise ValueError(
            f"codes=fixed gives every class a unique code of {branches} digits in base {meta_class_size}, but there "
            f"are only {meta_class_size}^{branches} = {meta_class_size ** branches} codes for {num_classes} classes. "
            f"Raise branches or meta_class_size, or use codes=random."
        )


def _balanced_row(num_classes: int, meta_class_size: int, rng: np.random.Generator) -> np.ndarray:
    whole, extra = divmod(num_classes, meta_class_size)
    row = np.concatenate([np.tile(np.arange(meta_class_size), whole),
                          rng.choice(meta_class_size, extra, replace=False)])
    return rng.permutation(row).astype(np.int64)


def _duplicates(codes: np.ndarray) -> np.ndarray:
    """Classes whose code an earlier class already has."""
    _, first = np.unique(codes.T, axis=0, return_index=True)
    mask = np.ones(codes.shape[1], dtype=bool)
    mask[first] = False
    return np.flatnonzero(mask)


def _all_unique(codes: np.ndarray) -> bool:
    return len(_duplicates(codes)) == 0


def _repair(codes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Swap two classes' digits in one branch until every code is unique.

    A swap keeps every branch balanced, which a fresh code for the duplicate would not.
    Only small tables (few branches, few meta-classes) ever get here.
    """
    codes = codes.copy()
    for _ in range(REPAIR_SWAPS):
        dups = _duplicates(codes)
        if not len(dups):
            return codes
        c, other = int(rng.choice(dups)), int(rng.integers(codes.shape[1]))
        e = int(rng.integers(codes.shape[0]))
        codes[e, c], codes[e, other] = codes[e, other], codes[e, c]
    raise ValueError(f"could not give {codes.shape[1]} classes unique codes with {codes.shape[0]} branches of "
                     f"{int(codes.max()) + 1} meta-classes; raise branches or meta_class_size, or use codes=random")


def meta_labels(codes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``len(labels) x branches``: each sample's meta-class in every branch."""
    return codes[:, labels].T


def export_codes(run_dir: str | Path, which: str = "last") -> Path:
    """Write the codes a run's checkpoint was trained with to ``<run>/train/codes.npy`` (branches x classes).

    The codes travel inside every checkpoint (the loss's buffer); this file is a copy
    for inspection and for tools outside imret.
    """
    from imret import checkpoint as ckpt_lib
    from imret.rundir import RunDir

    run = RunDir(Path(run_dir))
    path = ckpt_lib.find(run, which)
    state = ckpt_lib.load_state(path)["criterion"]
    keys = [k for k in state if k.endswith("codes")]
    if not keys:
        raise ValueError(f"{path} holds no meta-class codes: was this run trained with the meta_ce loss?")
    out = run.ckpt.parent / "codes.npy"
    np.save(out, state[keys[0]].cpu().numpy())
    return out

"""The open-world report: clustering quality per subset of the unlabelled data, as PSS prints it.

PSS's ``test_subg_inat.py`` scores its pseudo-labels separately on U_in, U_out, all of
U, the newly selected and the not-selected samples. This module computes the same view
for the cluster stage, with one subset per ``cluster.splits`` entry (U_in, U_out, ...):

- ``<split>`` and ``all``: the samples that carry a pseudo-label after this iteration
  (selected now, or frozen from earlier), scored by that label, as PSS does;
- ``selected``: selected at this iteration (mask 1), by their new pseudo-label;
- ``frozen``: carried over from earlier iterations (mask 3), by their frozen label;
- ``unselected``: not selected (mask 2), by this iteration's cluster (PSS scores their
  label -1, one big cluster; the clusters say more about what was left out);
- ``clustered``: every sample clustered at this iteration, by its cluster.

Only samples whose held-out label is known (>= 0) are scored.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from imret.data.labels import FROZEN, SELECTED, UNSELECTED
from imret.metrics import quality

METRICS = ("pairwise_f", "bcubed_f", "nmi")
NAMED = ("all", "selected", "frozen", "unselected", "clustered")  # subsets that are not splits


def subset_name(split: str) -> str:
    """A split's entry; a split that shares a name with a fixed subset is prefixed, so neither hides the other."""
    return f"split_{split}" if split in NAMED else split


def subset_masks(split_of: np.ndarray, splits: list[str], mask: np.ndarray) -> dict[str, tuple[np.ndarray, bool]]:
    """Per subset: its members, and whether they are scored by pseudo-label (True) or by cluster (False)."""
    out = {subset_name(s): (split_of == s, True) for s in splits}
    out.update({"all": (np.ones(len(mask), bool), True), "selected": (mask == SELECTED, True),
                "frozen": (mask == FROZEN, True), "unselected": (mask == UNSELECTED, False),
                "clustered": (mask != FROZEN, False)})
    return out


def subset_report(split_of: np.ndarray, splits: list[str], mask: np.ndarray, pseudo: np.ndarray,
                  clusters: np.ndarray, truth: np.ndarray) -> dict[str, dict[str, Any]]:
    """``{subset: {samples, pseudo_labelled, pseudo_labelled_fraction, scored, pairwise_f, bcubed_f, nmi}}``.

    ``mask``, ``pseudo``, ``clusters`` (-1 where not clustered now) and ``truth`` are per
    unlabelled sample, in the order of ``split_of``.
    """
    report: dict[str, dict[str, Any]] = {}
    for name, (members, by_pseudo) in subset_masks(split_of, splits, mask).items():
        n = int(members.sum())
        carried = int((members & (pseudo >= 0)).sum())
        entry: dict[str, Any] = {"samples": n, "pseudo_labelled": carried,
                                 "pseudo_labelled_fraction": carried / n if n else 0.0}
        scored = members & (truth >= 0) & ((pseudo >= 0) if by_pseudo else (clusters >= 0))
        entry["scored"] = int(scored.sum())
        if scored.any():
            q = quality((pseudo if by_pseudo else clusters)[scored], truth[scored])
            entry.update({m: q[m] for m in METRICS})
        report[name] = entry
    return report


def flat(report: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``<subset>/<figure>`` keys for results.json's flat part (and so TensorBoard and tools/gather.py)."""
    return {f"{name}/{key}": value for name, entry in report.items() for key, value in entry.items()
            if key in METRICS or key in ("samples", "pseudo_labelled_fraction")}

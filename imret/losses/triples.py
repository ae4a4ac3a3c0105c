"""The (anchor, positive, negative) layout of a triplet batch, for the losses that read it.

``data.sampler: triplet`` lays a global batch out as ``[a1, p1, n1, a2, p2, n2, ...]``
(``imret.data.sampler.TripletPlan``), and the trainer gathers the ranks' slices back into
that order, so the criterion sees whole triples. A loss that works on each triple's
(anchor, positive) and (anchor, negative) pairs, as the sketch seed's do, takes them
from here; the labels confirm the layout, so a batch drawn by another sampler is a
clear error rather than a silently wrong loss.
"""

from __future__ import annotations

import torch

ROLES = ("anchor", "positive", "negative")


def role_rows(embeddings: torch.Tensor, labels: torch.Tensor, role: str, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The embeddings and labels of one role of every triple."""
    if role not in ROLES:
        raise ValueError(f"{loss}: unknown triplet role '{role}'; roles are {', '.join(ROLES)}")
    if len(labels) % 3:
        raise ValueError(f"{loss} reads (anchor, positive, negative) triples, but the batch holds {len(labels)} "
                         "items, not a multiple of 3; use data.sampler: triplet")
    k = ROLES.index(role)
    return embeddings[k::3], labels[k::3]


def triples(embeddings: torch.Tensor, labels: torch.Tensor, loss: str) -> tuple[torch.Tensor, ...]:
    """Anchors, positives and negatives, checked: each positive shares its anchor's label, each negative not."""
    (a, la), (p, lp), (n, ln) = (role_rows(embeddings, labels, r, loss) for r in ROLES)
    if not bool((la == lp).all()) or bool((la == ln).any()):
        raise ValueError(f"{loss}: the batch is not laid out as (anchor, positive, negative) triples (a positive "
                         "of another class or a negative of the same class); use data.sampler: triplet")
    return a, p, n

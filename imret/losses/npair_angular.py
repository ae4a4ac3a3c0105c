"""The N-pair angular loss, as the CBIR seed computed it (anchor/positive pairs, with its L2 term)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def consecutive_pairs(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(anchor, positive) rows: each class's occurrences paired in batch order (1st with 2nd, 3rd with 4th, ...).

    On a class-contiguous P x K batch with even K, as imret's ``pk`` sampler draws them, the
    pairs are rows (0, 1), (2, 3), ...: the seed's ``reshape([-1, 2, D])``. An odd last
    occurrence of a class is left out.
    """
    order = torch.sort(labels, stable=True).indices
    sorted_labels = labels[order]
    starts = torch.ones_like(sorted_labels, dtype=torch.bool)
    starts[1:] = sorted_labels[1:] != sorted_labels[:-1]
    position = torch.arange(len(labels), device=labels.device)
    first = torch.cummax(torch.where(starts, position, torch.zeros_like(position)), dim=0).values
    rank = position - first  # 0-based occurrence number within the class
    has_next = torch.zeros_like(starts)
    has_next[:-1] = ~starts[1:]
    keep = (rank % 2 == 0) & has_next
    anchors, positives = order[keep], order[keep.nonzero().squeeze(1) + 1]
    by_row = torch.argsort(anchors)
    return anchors[by_row], positives[by_row]


class NPairAngularLoss(nn.Module):
    """Angular loss in its N-pair form (Wang et al., ICCV 2017), exactly as the CBIR seed's ``ranking/angular.py``.

    The batch is read as (anchor, positive) pairs of one class each. With t = tan(alpha)^2,
    anchor a's logits over the N pairs are ``2 (1 + t) x_a . x_p(a)`` for its own pair and
    ``4 t (x_a + x_p(a)) . x_p(j)`` for every other pair j: the other anchors' positives are
    its negatives. The loss is the softmax cross-entropy of each anchor against the pairs of
    its class (target spread evenly when a class holds several pairs), averaged over the
    anchors, plus ``0.25 * l2_reg * (mean ||x_a||^2 + mean ||x_p||^2)`` (the seed's
    ``with_l2reg``, 0.002). pytorch-metric-learning's ``AngularLoss`` (the ``angular`` loss)
    takes every positive pair and every batch negative instead.

    Checked against the seed's own code in ``tests/test_seed_losses.py``.
    """

    def __init__(self, alpha: float = 45.0, l2_reg: float = 0.002) -> None:
        super().__init__()
        if not 0 < alpha < 90:
            raise ValueError(f"npair_angular: alpha is an angle in degrees in (0, 90), got {alpha}")
        self.alpha, self.l2_reg = alpha, l2_reg
        self.sq_tan = math.tan(math.radians(alpha)) ** 2

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        a_rows, p_rows = consecutive_pairs(labels)
        if not len(a_rows):
            raise ValueError("npair_angular: the batch holds no (anchor, positive) pair; draw P x K batches with "
                             "data.samples_per_class: 2 (the seed's K)")
        xa, xp, pids = embeddings[a_rows], embeddings[p_rows], labels[a_rows]
        logits = 4.0 * self.sq_tan * (xa + xp) @ xp.T
        own = 2.0 * (1.0 + self.sq_tan) * (xa * xp).sum(dim=1)
        logits = logits - torch.diag_embed(logits.diagonal()) + torch.diag_embed(own)
        targets = (pids[:, None] == pids[None, :]).to(logits.dtype)
        targets = targets / targets.sum(dim=1, keepdim=True)
        xent = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
        reg = 0.25 * self.l2_reg * ((xa * xa).sum(dim=1).mean() + (xp * xp).sum(dim=1).mean())
        return xent + reg

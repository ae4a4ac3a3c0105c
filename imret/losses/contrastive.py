"""Contrastive loss over every pair of the batch."""

from __future__ import annotations

import torch
import torch.nn as nn


class ContrastiveLoss(nn.Module):
    """Contrastive loss (Hadsell, Chopra & LeCun, 2006), computed by pytorch-metric-learning.

    On Euclidean distances d between L2-normalised embeddings: positive pairs pay
    ``relu(d - pos_margin)``, negative pairs ``relu(neg_margin - d)``; each part is
    averaged over its pairs with a non-zero loss, and the two averages are summed
    (PML's ``ContrastiveLoss`` with its default reducer).
    """

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0) -> None:
        super().__init__()
        from pytorch_metric_learning import losses

        self.impl = losses.ContrastiveLoss(pos_margin=pos_margin, neg_margin=neg_margin)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.impl(embeddings, labels)

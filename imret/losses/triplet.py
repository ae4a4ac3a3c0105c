"""Triplet loss with semi-hard mining, by pytorch-metric-learning."""

from __future__ import annotations

import torch
import torch.nn as nn


class TripletLoss(nn.Module):
    """Triplet margin loss over mined triplets (Schroff et al., FaceNet, 2015).

    For anchor a, positive p and negative n with Euclidean distances d between
    L2-normalised embeddings: ``relu(d(a, p) - d(a, n) + margin)``, averaged over the
    triplets with a non-zero loss. ``mining="semihard"`` keeps the negatives farther
    than the positive but within the margin (d(a,p) < d(a,n) < d(a,p) + margin);
    ``"hard"`` those closer than the positive; ``"all"`` every triplet of the batch.
    Margins of the CBIR seed: 0.2 and 0.5.
    """

    def __init__(self, margin: float = 0.2, mining: str = "semihard") -> None:
        super().__init__()
        from pytorch_metric_learning import losses, miners

        if mining not in ("semihard", "hard", "all"):
            raise ValueError(f"mining must be semihard, hard or all, got {mining!r}")
        self.miner = miners.TripletMarginMiner(margin=margin, type_of_triplets=mining)
        self.impl = losses.TripletMarginLoss(margin=margin)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.impl(embeddings, labels, self.miner(embeddings, labels))

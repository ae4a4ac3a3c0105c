"""The squared contrastive loss (Hadsell et al.) on raw features, as the sketch seed computed it."""

from __future__ import annotations

import torch
import torch.nn as nn

from imret.losses.triples import triples


class PairContrastiveLoss(nn.Module):
    """``0.5 * [y d^2 + (1 - y) relu(margin - sqrt(d^2 + 1e-9))^2]`` with d the Euclidean distance.

    The sketch seed's ``utils/contrastive_loss.py``, on whatever embeddings the model gives
    (the seed's are raw average-pooled features, not normalised).

    - ``pairs: triplet`` (the seed's): on each (anchor, positive, negative) triple of a
      ``data.sampler: triplet`` batch, the pair (anchor, positive) with y = 1 and the pair
      (anchor, negative) with y = 0; the loss is the SUM of the two batch means, as the
      seed adds ``con(q, p, 1) + con(q, n, 0)``.
    - ``pairs: all``: every pair (i < j) of the batch, y from the labels, one mean.

    pytorch-metric-learning's ``ContrastiveLoss`` (the ``contrastive`` loss) is the
    non-squared form averaged over the non-zero pairs.
    """

    def __init__(self, margin: float = 0.3, pairs: str = "all", eps: float = 1e-9) -> None:
        super().__init__()
        if pairs not in ("all", "triplet"):
            raise ValueError(f"pair_contrastive: pairs must be 'all' or 'triplet', got '{pairs}'")
        self.margin, self.pairs, self.eps = margin, pairs, eps

    def pair_loss(self, x: torch.Tensor, y: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
        d2 = (y - x).pow(2).sum(dim=1)
        same = same.to(d2.dtype)
        apart = torch.relu(self.margin - (d2 + self.eps).sqrt()).pow(2)
        return 0.5 * (same * d2 + (1 - same) * apart)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.pairs == "triplet":
            a, p, n = triples(embeddings, labels, "pair_contrastive")
            ones = torch.ones(len(a), dtype=torch.bool, device=a.device)
            return self.pair_loss(a, p, ones).mean() + self.pair_loss(a, n, ~ones).mean()
        i, j = torch.triu_indices(len(labels), len(labels), offset=1, device=labels.device)
        return self.pair_loss(embeddings[i], embeddings[j], labels[i] == labels[j]).mean()

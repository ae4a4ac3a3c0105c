"""Cosine-embedding loss over every pair of the batch, or over each triple's two pairs."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from imret.losses.triples import triples


class CosineEmbeddingLoss(nn.Module):
    """torch's cosine-embedding loss: a positive pair pays ``1 - cos``, a negative pair ``max(0, cos - margin)``.

    - ``pairs: all`` (default): every pair (i < j) of the batch, positive when the labels
      agree; the mean over all pairs.
    - ``pairs: triplet`` (the sketch seed's): on each (anchor, positive, negative) triple of
      a ``data.sampler: triplet`` batch, (anchor, positive) as a positive pair and
      (anchor, negative) as a negative one; the loss is the SUM of the two batch means, as
      the seed adds ``cos(q, p, +1) + cos(q, n, -1)``.

    The cosine ignores the embeddings' norms, so raw and L2-normalised features give the
    same value. The sketch seed used margins 0.5 and 0.3.
    """

    def __init__(self, margin: float = 0.5, pairs: str = "all") -> None:
        super().__init__()
        if pairs not in ("all", "triplet"):
            raise ValueError(f"cosine_embedding: pairs must be 'all' or 'triplet', got '{pairs}'")
        self.margin, self.pairs = margin, pairs

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.pairs == "triplet":
            a, p, n = triples(embeddings, labels, "cosine_embedding")
            ones = torch.ones(len(a), device=a.device)
            return (F.cosine_embedding_loss(a, p, ones, margin=self.margin)
                    + F.cosine_embedding_loss(a, n, -ones, margin=self.margin))
        i, j = torch.triu_indices(len(labels), len(labels), offset=1, device=labels.device)
        target = torch.where(labels[i] == labels[j], 1, -1)
        return F.cosine_embedding_loss(embeddings[i], embeddings[j], target, margin=self.margin)

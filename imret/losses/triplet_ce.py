"""Cross-entropy on chosen roles of (anchor, positive, negative) triples, as the sketch seed trained."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from imret.losses.triples import role_rows


class TripletCrossEntropy(nn.Module):
    """A linear classifier (weight and bias, no scale) over the embedding, trained on some roles of each triple.

    The sketch seed classifies the query and the positive, not the negative, into the
    dataset's categories and adds the two batch means: ``CE(q) + CE(p)``. Its classifier is
    the backbone's own timm head created with ``num_classes=125``; timm drops the pretrained
    1000-class weights when the class count differs, so that head starts fresh, a linear
    layer on the average-pooled features: this loss's ``fc`` on the raw pooled embedding
    (``model.embed_dim: 0`` without normalisation). ``dropout``: rexnet's head applies 0.2
    before its linear layer; the EfficientNet scripts call the classifier directly (none).

    ``roles``: which members of each triple are classified (the loss is the sum of one
    batch mean per role). Needs a ``data.sampler: triplet`` batch.
    """

    def __init__(self, embed_dim: int, num_classes: int, roles: list[str] | tuple[str, ...] = ("anchor", "positive"),
                 dropout: float = 0.0) -> None:
        super().__init__()
        if not roles:
            raise ValueError("triplet_ce: roles must name at least one of anchor, positive, negative")
        self.roles, self.num_classes = list(roles), num_classes
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(embed_dim, num_classes)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"triplet_ce: labels must lie in [0, {self.num_classes}), "
                             f"got [{int(labels.min())}, {int(labels.max())}]; set the loss's num_classes")
        total = embeddings.new_zeros(())
        for role in self.roles:
            rows, targets = role_rows(embeddings, labels, role, "triplet_ce")
            total = total + F.cross_entropy(self.fc(self.drop(rows)), targets)
        return total

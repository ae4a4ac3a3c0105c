"""Angular loss, by pytorch-metric-learning."""

from __future__ import annotations

import torch
import torch.nn as nn


class AngularLoss(nn.Module):
    """Angular loss (Wang et al., ICCV 2017): constrains the angle at the negative of each
    (anchor, positive, negative) triangle to at most ``alpha`` degrees, in the
    log-sum-exp form over every negative of each positive pair (PML's AngularLoss).
    The CBIR seed used alpha = 30 and 45 degrees.
    """

    def __init__(self, alpha: float = 40.0) -> None:
        super().__init__()
        from pytorch_metric_learning import losses

        self.impl = losses.AngularLoss(alpha=alpha)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.impl(embeddings, labels)

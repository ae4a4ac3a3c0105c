"""Models: timm backbones with GeM pooling and embedding heads, and randomized ensembles (REIR)."""

from __future__ import annotations

import torch.nn as nn

from imret.config import ModelConfig
from imret.models.embedding import EmbeddingNet
from imret.models.ensemble import EnsembleNet


def build_model(cfg: ModelConfig) -> EmbeddingNet | EnsembleNet:
    """An EmbeddingNet, or an EnsembleNet when ``model.ensemble.branches`` > 0."""
    model = EnsembleNet(cfg) if cfg.ensemble.branches else EmbeddingNet(cfg)
    if cfg.batchnorm == "sync":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # GPU only; checked at training start
    return model

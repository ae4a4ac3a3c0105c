"""Models: timm backbones with GeM pooling and embedding heads."""

from __future__ import annotations

import torch.nn as nn

from imret.config import ModelConfig
from imret.models.embedding import EmbeddingNet


def build_model(cfg: ModelConfig) -> EmbeddingNet:
    model = EmbeddingNet(cfg)
    if cfg.batchnorm == "sync":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # GPU only; checked at training start
    return model

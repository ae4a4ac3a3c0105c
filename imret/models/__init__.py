"""Models: timm backbones with GeM pooling and embedding heads, and randomized ensembles (REIR)."""

from __future__ import annotations

import difflib

import torch.nn as nn

from imret.config import ModelConfig
from imret.models.embedding import EmbeddingNet
from imret.models.ensemble import EnsembleNet, check_ensemble_config


def build_model(cfg: ModelConfig) -> EmbeddingNet | EnsembleNet:
    """An EmbeddingNet, or an EnsembleNet when ``model.ensemble.branches`` > 0."""
    model = EnsembleNet(cfg) if cfg.ensemble.branches else EmbeddingNet(cfg)
    if cfg.batchnorm == "sync":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # GPU only; checked at training start
    return model


def check(cfg: ModelConfig) -> None:
    """ValueError for a model section that cannot be built: an unknown timm model, a bad ensemble."""
    import timm

    if cfg.ensemble.branches:
        try:
            check_ensemble_config(cfg)
        except ValueError as err:
            raise ValueError(f"model.ensemble: {err}") from None
    if not timm.is_model(cfg.backbone):
        close = difflib.get_close_matches(cfg.backbone, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Closest: {', '.join(close)}." if close else ""
        raise ValueError(f"model.backbone: timm has no model '{cfg.backbone}'.{hint}")

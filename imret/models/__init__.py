"""Models: timm backbones with GeM pooling and embedding heads, randomized ensembles (REIR), cached weights."""

from __future__ import annotations

import difflib

import torch.nn as nn

from imret.config import ModelConfig
from imret.models.embedding import EmbeddingNet
from imret.models.ensemble import EnsembleNet, check_ensemble_config
from imret.models.weights import freeze, weights_name


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
    arch = cfg.backbone.split(".", 1)[0]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Closest: {', '.join(close)}." if close else ""
        raise ValueError(f"model.backbone: timm has no model '{arch}'.{hint}")
    if "." in cfg.backbone or cfg.pretrained:
        weights_name(cfg.backbone)  # ValueError for a tag timm does not know
    if cfg.freeze:
        _check_freeze(cfg)


def _check_freeze(cfg: ModelConfig) -> None:
    """The frozen names exist: the backbone is built on the meta device (no memory, no weights)."""
    import timm
    import torch

    with torch.device("meta"):
        backbone = timm.create_model(cfg.backbone, pretrained=False, num_classes=0, global_pool="",
                                     **cfg.backbone_kwargs)
    freeze(backbone, cfg.freeze)

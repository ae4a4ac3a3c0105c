"""An embedding network: timm backbone -> pooling -> linear head -> L2 normalisation."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from imret.config import ModelConfig
from imret.models.pooling import Pool, l2_normalize
from imret.models.weights import freeze, load_pretrained, weights_name


def create_backbone(cfg: ModelConfig) -> nn.Module:
    """A timm model without classifier and pooling; weights only from the local cache or a local file.

    timm is never asked for ``pretrained=True``: that would download inside a job.
    """
    import timm

    model = timm.create_model(cfg.backbone, pretrained=False, num_classes=0, global_pool="", **cfg.backbone_kwargs)
    if cfg.pretrained:
        load_pretrained(model, weights_name(cfg.backbone), cfg.weights_dir)
    if cfg.pretrained_path:
        load_local_weights(model, cfg.pretrained_path)
    if cfg.bn_momentum:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = cfg.bn_momentum
    freeze(model, cfg.freeze)
    return model


def load_local_weights(model: nn.Module, path: str) -> None:
    """Load a .safetensors file or a torch state dict (weights_only) into ``model``, ignoring heads."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"model.pretrained_path: {path} does not exist (imret never downloads weights)")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError(f"model.pretrained_path: no tensor in {path} matches the backbone's parameters; "
                         "is it a checkpoint of the same timm model?")
    model.load_state_dict(usable, strict=False)


class FrozenBatchNorm(nn.Module):
    """``model.batchnorm: frozen`` or ``frozen_stats``: BatchNorm keeps its running statistics.

    Call ``freeze_batchnorm`` once every layer exists: ``train()`` then leaves the
    BatchNorm layers in eval mode, so they normalise with (and never update) their
    running statistics. ``frozen`` also stops their scale and shift from training;
    ``frozen_stats`` trains them, as the PSS seed does (it puts every BatchNorm2d in
    eval mode and keeps its affine parameters in the optimizer).
    """

    frozen_bn = False

    def freeze_batchnorm(self, mode: str) -> None:
        """``mode``: the ``model.batchnorm`` setting; other values than the two frozen ones change nothing."""
        self.frozen_bn = mode in ("frozen", "frozen_stats")
        for module in self._batchnorms() if mode == "frozen" else []:
            for p in module.parameters():
                p.requires_grad_(False)

    def _batchnorms(self) -> list[nn.Module]:
        return [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def train(self, mode: bool = True) -> FrozenBatchNorm:
        super().train(mode)
        for module in self._batchnorms() if self.frozen_bn else []:
            module.eval()
        return self


class EmbeddingNet(FrozenBatchNorm):
    """Maps images to L2-normalised embeddings (raw ones with ``model.normalize: false``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.backbone = create_backbone(cfg)
        self.pool_kind = cfg.pool
        self.pool = Pool(cfg.pool, cfg.gem_p, cfg.gem_learnable) if cfg.pool != "token" else None
        self.normalize = cfg.normalize  # false: raw features to the losses (the sketch seed's)
        self.feature_dim = int(self.backbone.num_features)
        self.head = nn.Linear(self.feature_dim, cfg.embed_dim) if cfg.embed_dim else nn.Identity()
        if cfg.head_init == "orthogonal" and cfg.embed_dim:
            nn.init.orthogonal_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self.embed_dim = cfg.embed_dim or self.feature_dim
        self.freeze_batchnorm(cfg.batchnorm)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features as B x C x N (positions last), whatever layout timm returns."""
        x = self.backbone.forward_features(images)
        if x.ndim == 4:
            if getattr(self.backbone, "output_fmt", "NCHW") == "NHWC":
                x = x.permute(0, 3, 1, 2)
            return x.flatten(2)
        if x.ndim == 3:  # transformer tokens B x L x C
            return x.transpose(1, 2)
        raise ValueError(f"unexpected feature shape {tuple(x.shape)} from {type(self.backbone).__name__}")

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        x = self.features(images)
        if self.pool is None:
            return x[:, :, 0]
        prefix = int(getattr(self.backbone, "num_prefix_tokens", 0))  # class/register tokens of a ViT
        return self.pool(x[:, :, prefix:])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.head(self.pooled(images))
        return l2_normalize(out) if self.normalize else out

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters trained with the head learning-rate multiplier (head and pooling)."""
        return list(self.head.parameters()) + (list(self.pool.parameters()) if self.pool is not None else [])

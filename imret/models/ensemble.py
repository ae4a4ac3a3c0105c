"""Randomized ensembles for image retrieval (REIR): E branches on one ResNet trunk.

The lower stages of a timm ResNet, up to ``share_type``, are computed once; the
stages above it are replicated E times, and each branch ends in global pooling and a
linear classifier over M meta-classes (``imret.losses.meta_ce`` supplies the
targets).

Batched branches. The E copies of the replicated stages are not a Python loop of E
modules: they are packed into one module of the same structure whose convolutions
have E times the channels and E times the groups, and whose BatchNorms have E times
the channels. Channels are laid out branch-major (channel ``e * C + c`` is branch e's
channel c), the input at the branch point is repeated E times along the channels, and
then

- a grouped convolution with ``groups = g * E`` sees, for branch e, exactly branch e's
  input channels and applies exactly branch e's filters (its weight is the E copies'
  weights stacked along the output channels);
- BatchNorm normalises each channel on its own, so BatchNorm over E * C channels is E
  independent BatchNorms, running statistics included;
- ReLU, pooling, the residual addition and the blocks' wiring act channel by channel.

So one call of the packed module computes exactly what E separate copies compute
(``tests/test_reir.py`` checks outputs, gradients and running statistics against a
loop over E independently initialised copies). The E linear heads are one stacked
weight (E x M x F) applied with an einsum.

Output. In ``train()`` mode the model returns the raw logits, ``B x E x M``, for the
loss. In ``eval()`` mode it returns the retrieval embedding: every branch's logits
L2-normalised, concatenated and scaled by 1/sqrt(E). The embedding has unit norm and
the inner product of two embeddings is the mean over branches of the per-branch
cosine similarities, so the FAISS inner-product search applies unchanged.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from imret.config import ModelConfig
from imret.models.embedding import FrozenBatchNorm, create_backbone
from imret.models.pooling import Pool

STEM = ("conv1", "bn1", "act1", "maxpool")
STAGES = STEM + ("layer1", "layer2", "layer3", "layer4")
SHARE_TYPES = ("none", "maxpool", "layer1", "layer2", "layer3", "layer4")
# Leaves that act on each channel separately: safe on branch-major packed channels.
CHANNELWISE = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Identity, nn.MaxPool2d, nn.AvgPool2d)


def check_ensemble_config(cfg: ModelConfig) -> None:
    """ValueError for an ensemble config that cannot be built (cheap: builds nothing)."""
    ens = cfg.ensemble
    if ens.branches < 1 or ens.meta_class_size < 2:
        raise ValueError(f"model.ensemble: branches must be >= 1 and meta_class_size >= 2, got "
                         f"branches={ens.branches}, meta_class_size={ens.meta_class_size}")
    if cfg.embed_dim not in (0, ens.branches * ens.meta_class_size):
        raise ValueError(
            f"model.embed_dim ({cfg.embed_dim}) must be 0 or branches x meta_class_size = "
            f"{ens.branches * ens.meta_class_size} for an ensemble: its embedding is every branch's "
            f"{ens.meta_class_size} normalised outputs, concatenated. Set model.embed_dim to either."
        )
    if cfg.pool == "token":
        raise ValueError("model.pool=token: an ensemble of ResNet branches pools feature maps; "
                         "use avg (the seed's), gem or max")
    import timm

    if cfg.freeze:
        raise ValueError("model.freeze: an ensemble's replicated stages are rebuilt for its branches, which would "
                         "not keep them frozen; leave model.freeze empty for an ensemble")
    if cfg.backbone.split(".", 1)[0] not in timm.list_models(module="resnet"):  # a weights tag may follow
        raise ValueError(f"model.ensemble needs a ResNet-family backbone from timm (resnet18, resnet34, resnet50, "
                         f"resnext50_32x4d, ...); '{cfg.backbone}' is not one")


def split_at(backbone: nn.Module, share_type: str) -> tuple[nn.Sequential, nn.Sequential]:
    """(shared, replicated) stages of a timm ResNet; ``none`` shares nothing, ``layerK`` up to layerK."""
    if share_type not in SHARE_TYPES:
        raise ValueError(f"model.ensemble.share_type: '{share_type}' is not one of {', '.join(SHARE_TYPES)}")
    cut = 0 if share_type == "none" else STAGES.index(share_type) + 1
    stages = [(name, getattr(backbone, name)) for name in STAGES]
    return nn.Sequential(OrderedDict(stages[:cut])), nn.Sequential(OrderedDict(stages[cut:]))


# ----------------------------------------------------------------------------- packing E copies into one module


def pack_branches(template: nn.Module, branches: int,
                  make_copy: Callable[[int], nn.Module] | None = None) -> nn.Module:
    """One module computing ``branches`` copies of ``template`` on branch-major packed channels.

    ``make_copy(e)`` gives branch e's weights (a module shaped like ``template``); without
    it every branch starts as ``template``. Copies are made one at a time, so building
    needs the packed module plus one copy, not E copies.
    """
    packed = copy.deepcopy(template)
    for name, leaf in list(packed.named_modules()):
        if type(leaf) is nn.Conv2d:
            _replace(packed, name, _grouped_conv(leaf, branches))
        elif type(leaf) is nn.BatchNorm2d:
            _replace(packed, name, _wide_batchnorm(leaf, branches))
        elif not list(leaf.children()) and not isinstance(leaf, (*CHANNELWISE, nn.Sequential)):
            raise ValueError(
                f"cannot batch the ensemble branches: layer '{name}' ({type(leaf).__name__}) mixes channels or "
                f"samples in a way the grouped packing does not reproduce. Use a plain ResNet (resnet18/34/50, "
                f"resnext50_32x4d) or share this layer (model.ensemble.share_type)."
            )
    for e in range(branches):
        _load_branch(packed, make_copy(e) if make_copy else template, e, branches)
    return packed


def unpack_branch(packed: nn.Module, template: nn.Module, e: int, branches: int) -> nn.Module:
    """Branch e of a packed module as a plain module shaped like ``template`` (for inspection and tests)."""
    out = copy.deepcopy(template)
    packed_leaves = dict(packed.named_modules())
    with torch.no_grad():
        for name, leaf in out.named_modules():
            if type(leaf) in (nn.Conv2d, nn.BatchNorm2d):
                src = packed_leaves[name]
                for key, value in leaf.state_dict().items():
                    value.copy_(_slot(src.state_dict()[key], e, branches))
    return out


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _grouped_conv(conv: nn.Conv2d, branches: int) -> nn.Conv2d:
    return nn.Conv2d(conv.in_channels * branches, conv.out_channels * branches, conv.kernel_size, conv.stride,
                     conv.padding, conv.dilation, conv.groups * branches, conv.bias is not None, conv.padding_mode,
                     device=conv.weight.device, dtype=conv.weight.dtype)


def _wide_batchnorm(bn: nn.BatchNorm2d, branches: int) -> nn.BatchNorm2d:
    like = bn.weight if bn.weight is not None else bn.running_mean
    return nn.BatchNorm2d(bn.num_features * branches, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                          device=like.device if like is not None else None,
                          dtype=like.dtype if like is not None else None)


def _slot(tensor: torch.Tensor, e: int, branches: int) -> torch.Tensor:
    """Branch e's part of a packed tensor (all of it for a scalar such as num_batches_tracked)."""
    if tensor.ndim == 0:
        return tensor
    return tensor.view(branches, tensor.shape[0] // branches, *tensor.shape[1:])[e]


def _load_branch(packed: nn.Module, source: nn.Module, e: int, branches: int) -> None:
    source_leaves = dict(source.named_modules())
    with torch.no_grad():
        for name, leaf in packed.named_modules():
            if type(leaf) not in (nn.Conv2d, nn.BatchNorm2d):
                continue
            own = source_leaves[name].state_dict()
            for key, value in leaf.state_dict().items():  # state_dict tensors share storage with the module
                _slot(value, e, branches).copy_(own[key])


def random_copy(template: nn.Module) -> nn.Module:
    """A copy of ``template`` with timm's ResNet initialisation drawn afresh (``with_random``)."""
    fresh = copy.deepcopy(template)
    for module in fresh.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            module.reset_parameters()  # weight 1, bias 0, running statistics reset
    for module in fresh.modules():
        if hasattr(module, "zero_init_last"):  # timm zeroes each block's last BatchNorm weight
            module.zero_init_last()
    return fresh


# ----------------------------------------------------------------------------- the model


class EnsembleNet(FrozenBatchNorm):
    """A shared ResNet trunk and E packed branches, each ending in a linear layer over M meta-classes."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        check_ensemble_config(cfg)
        ens = cfg.ensemble
        self.num_branches, self.meta_class_size = ens.branches, ens.meta_class_size
        backbone = create_backbone(cfg)  # pretrained weights, if any, land in the trunk and in every copy
        self.feature_dim = int(backbone.num_features)
        self.shared, template = split_at(backbone, ens.share_type)
        make_copy = (lambda e: random_copy(template)) if ens.with_random else None
        self.branches = pack_branches(template, ens.branches, make_copy)
        self.replicated = len(template) > 0
        self.pool = Pool(cfg.pool, cfg.gem_p, cfg.gem_learnable)
        self.head_weight = nn.Parameter(torch.empty(ens.branches, ens.meta_class_size, self.feature_dim))
        self.head_bias = nn.Parameter(torch.empty(ens.branches, ens.meta_class_size))
        self._init_heads()
        self.embed_dim = ens.branches * ens.meta_class_size
        self.freeze_batchnorm(cfg.batchnorm)

    def _init_heads(self) -> None:
        """Each branch's head as nn.Linear initialises it (fan-in = F, not E x M x F)."""
        bound = 1.0 / math.sqrt(self.feature_dim)
        for e in range(self.num_branches):
            nn.init.kaiming_uniform_(self.head_weight.data[e], a=math.sqrt(5))
        nn.init.uniform_(self.head_bias, -bound, bound)

    def branch_features(self, images: torch.Tensor) -> torch.Tensor:
        """Every branch's pooled features, ``B x E x F``."""
        x = self.shared(images)
        if not self.replicated:  # share_type=layer4: the branches differ only in their heads
            pooled = self.pool(x.flatten(2))
            return pooled.unsqueeze(1).expand(-1, self.num_branches, -1)
        x = self.branches(_repeat_channels(x, self.num_branches))
        pooled = self.pool(x.flatten(2))  # B x E*F, branch-major
        return pooled.view(pooled.shape[0], self.num_branches, self.feature_dim)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """``B x E x M``: each branch's linear layer on its own features."""
        features = self.branch_features(images)
        return torch.einsum("bef,emf->bem", features, self.head_weight) + self.head_bias

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.logits(images)
        return logits if self.training else ensemble_embedding(logits)

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters trained with the head learning-rate multiplier (the linear heads and pooling)."""
        return [self.head_weight, self.head_bias, *self.pool.parameters()]


def ensemble_embedding(logits: torch.Tensor) -> torch.Tensor:
    """``B x E x M`` logits -> ``B x E*M`` unit vectors whose inner products are mean per-branch cosines."""
    branches = logits.shape[1]
    unit = F.normalize(logits.float(), dim=-1)  # float32: a norm in bfloat16 is good to ~3 digits
    return unit.flatten(1) / math.sqrt(branches)


def _repeat_channels(x: torch.Tensor, branches: int) -> torch.Tensor:
    """``B x C x H x W`` -> ``B x E*C x H x W``, branch-major, keeping a channels-last layout."""
    out = x.repeat(1, branches, 1, 1)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out

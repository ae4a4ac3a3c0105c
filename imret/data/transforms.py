"""Training and evaluation transforms, built by timm from the backbone's data config.

The backbone's timm name, with its weights' tag (``resnet50.tv_in1k``), decides the
defaults: mean, std, interpolation and the evaluation crop fraction. The config can
override each of them, to match a seed that preprocessed otherwise (the PSS seed:
bilinear everywhere, evaluation 256 -> 224 or 256 -> 227).

timm builds the random-resized-crop augmentations and the shorter-side evaluation
transform. The seeds' plainer pipelines (a resize, then a random or centre crop, a flip,
a squash to a square) are built here from torchvision's steps, in the seeds' order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from imret.config import DataConfig


def norm_config(data: DataConfig, backbone: str) -> dict[str, Any]:
    """Mean, std, interpolation and crop fraction: the backbone's own unless the config says otherwise."""
    import timm

    pretrained = timm.models.get_pretrained_cfg(backbone)
    base = {
        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "interpolation": "bilinear", "crop_pct": 0.875,
    }
    if pretrained is not None:
        base.update(mean=pretrained.mean, std=pretrained.std, interpolation=pretrained.interpolation or "bilinear",
                    crop_pct=pretrained.crop_pct or 0.875)
    if data.mean:
        base["mean"] = tuple(data.mean)
    if data.std:
        base["std"] = tuple(data.std)
    if data.interpolation:
        base["interpolation"] = data.interpolation
    base["crop_pct"] = eval_crop_pct(data, base["crop_pct"])
    return base


def eval_crop_pct(data: DataConfig, default: float) -> float:
    """The crop fraction timm's evaluation transform gets: it resizes the short side to
    ``floor(image_size / crop_pct)``, then centre-crops ``image_size``.

    ``data.eval_resize`` asks for a resize to exactly that many pixels; the fraction is
    taken half a pixel beyond it, so that float rounding in timm's division cannot land
    one pixel short (227 / (227 / 256) is not always 256.0 in floating point).
    """
    if data.eval_resize:
        return data.image_size / (data.eval_resize + 0.5)
    return data.eval_crop_pct or default


def train_transform(data: DataConfig, backbone: str) -> Callable:
    from timm.data import create_transform

    norm = norm_config(data, backbone)
    if data.augment == "none":
        return eval_transform(data, backbone)
    if data.augment in RESIZE_FIRST:
        return resize_then_crop(data, norm, data.augment)
    return create_transform(
        data.image_size,
        is_training=True,
        scale=tuple(data.crop_scale),
        hflip=0.5 if data.augment in ("crop_flip", "autoaugment") else 0.0,
        color_jitter=0.0,
        auto_augment="original" if data.augment == "autoaugment" else None,
        interpolation=norm["interpolation"],
        mean=norm["mean"],
        std=norm["std"],
    )


def eval_transform(data: DataConfig, backbone: str) -> Callable:
    from timm.data import create_transform

    norm = norm_config(data, backbone)
    if data.resize == "squash":
        return resize_then_crop(data, norm, "none")
    return create_transform(
        data.image_size, is_training=False, interpolation=norm["interpolation"],
        mean=norm["mean"], std=norm["std"], crop_pct=norm["crop_pct"],
    )


RESIZE_FIRST = ("resize_random_crop", "resize_random_crop_flip", "flip")


def resize_then_crop(data: DataConfig, norm: dict[str, Any], augment: str) -> Callable:
    """Resize (shorter side, or ``squash`` to a square) to the evaluation size, crop ``image_size`` (at random
    for ``resize_random_crop*``, else centred), flip for ``*_flip`` and ``flip``, then normalise.

    The size is timm's evaluation size, floor(image_size / crop_pct), so ``eval_resize`` and
    ``eval_crop_pct`` set it (REIR: Resize(256) + RandomCrop(256); CBIR: a 256 squash + RandomCrop(224)).
    """
    import torchvision.transforms as T

    size = math.floor(data.image_size / norm["crop_pct"])
    interpolation = T.InterpolationMode(norm["interpolation"])
    steps: list[Callable] = [T.Resize((size, size) if data.resize == "squash" else size, interpolation=interpolation)]
    steps.append(T.RandomCrop(data.image_size) if augment.startswith("resize_random_crop") else
                 T.CenterCrop(data.image_size))
    if augment in ("resize_random_crop_flip", "flip"):
        steps.append(T.RandomHorizontalFlip(0.5))
    steps += [T.ToTensor(), T.Normalize(norm["mean"], norm["std"])]
    return T.Compose(steps)

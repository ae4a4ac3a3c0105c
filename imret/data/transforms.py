"""Training and evaluation transforms, built by timm from the backbone's data config.

The backbone's timm name, with its weights' tag (``resnet50.tv_in1k``), decides the
defaults: mean, std, interpolation and the evaluation crop fraction. The config can
override each of them, to match a seed that preprocessed otherwise (the PSS seed:
bilinear everywhere, evaluation 256 -> 224 or 256 -> 227).
"""

from __future__ import annotations

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
    return create_transform(
        data.image_size, is_training=False, interpolation=norm["interpolation"],
        mean=norm["mean"], std=norm["std"], crop_pct=norm["crop_pct"],
    )

"""Metric-learning losses, one per file, each called as ``loss(embeddings, labels)``.

``LOSSES`` maps the names used in ``loss.terms`` to classes (imported late). A loss
may take ``embed_dim`` and ``num_classes`` in its constructor (classifier-based
losses); the trainer passes those, so they are not config parameters.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any

import torch
import torch.nn as nn

LOSSES: dict[str, str] = {
    "contrastive": "imret.losses.contrastive:ContrastiveLoss",
    "smooth_ap": "imret.losses.smooth_ap:SmoothAPLoss",
}
INJECTED = ("embed_dim", "num_classes")  # supplied by the trainer, not by the config


def loss_class(name: str) -> type[nn.Module]:
    if name not in LOSSES:
        close = difflib.get_close_matches(name, LOSSES, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ValueError(f"unknown loss '{name}'; {hint}known losses: {', '.join(sorted(LOSSES))}")
    module, _, attr = LOSSES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def loss_parameters(name: str) -> list[str]:
    sig = inspect.signature(loss_class(name).__init__)
    return [p for p in sig.parameters if p not in ("self",) + INJECTED]


def check_term(name: str, params: dict[str, Any]) -> None:
    """Raise ValueError for an unknown loss or a parameter its constructor does not take."""
    valid = loss_parameters(name)
    for key in params:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ValueError(f"loss '{name}' has no parameter '{key}'; {hint}its parameters: {', '.join(valid) or '(none)'}")


def build_loss(name: str, params: dict[str, Any], embed_dim: int, num_classes: int) -> nn.Module:
    cls = loss_class(name)
    sig = inspect.signature(cls.__init__).parameters
    injected = {k: v for k, v in (("embed_dim", embed_dim), ("num_classes", num_classes)) if k in sig}
    return cls(**params, **injected)


class Criterion(nn.Module):
    """The weighted sum of the configured loss terms; also reports each term."""

    def __init__(self, terms: list[tuple[str, float, nn.Module]]) -> None:
        super().__init__()
        self.names = [name for name, _, _ in terms]
        self.weights = [weight for _, weight, _ in terms]
        self.losses = nn.ModuleList(module for _, _, module in terms)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts = {}
        total = embeddings.new_zeros(())
        for name, weight, loss in zip(self.names, self.weights, self.losses):
            value = loss(embeddings, labels)
            parts[name] = value.detach()
            total = total + weight * value
        return total, parts


def build_criterion(terms: list[Any], embed_dim: int, num_classes: int) -> Criterion:
    """``terms``: config LossTerm objects (name, weight, params)."""
    built = [(t.name, t.weight, build_loss(t.name, t.params, embed_dim, num_classes)) for t in terms]
    return Criterion(built)

"""Metric-learning losses, one per file, each called as ``loss(embeddings, labels)``.

``LOSSES`` maps the names used in ``loss.terms`` to classes (imported late). A term
may also name any ``nn.Module`` subclass as ``"package.module:ClassName"`` (a loss of
your own, importable on the cluster). A loss may take ``embed_dim``, ``num_classes``
and ``labelled_classes`` in its constructor (classifier-based losses); the trainer
passes those.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any

import torch
import torch.nn as nn

LOSSES: dict[str, str] = {
    "smooth_ap": "imret.losses.smooth_ap:SmoothAPLoss",
    "contrastive": "imret.losses.contrastive:ContrastiveLoss",
    "triplet": "imret.losses.triplet:TripletLoss",
    "angular": "imret.losses.angular:AngularLoss",
    "cosine_embedding": "imret.losses.cosine_embedding:CosineEmbeddingLoss",
    "ce": "imret.losses.classifier:CrossEntropyLoss",
    "ams": "imret.losses.classifier:AMSoftmaxLoss",
    "meta_ce": "imret.losses.meta_ce:MetaClassCrossEntropy",
    # the seeds' own arithmetic (docs/seeds.md): TF's semi-hard triplet and the N-pair angular
    # loss of the CBIR seed, the sketch seed's squared contrastive and its classifier on triples
    "tf_semihard": "imret.losses.tf_semihard:TFSemiHardTripletLoss",
    "npair_angular": "imret.losses.npair_angular:NPairAngularLoss",
    "pair_contrastive": "imret.losses.pair_contrastive:PairContrastiveLoss",
    "triplet_ce": "imret.losses.triplet_ce:TripletCrossEntropy",
}
# Supplied by the trainer from the model and the data. num_classes may also be set in the
# config (e.g. 1024 classifier classes, more than the labelled data has); labelled_classes
# too, where pseudo-labels are not in play.
INJECTED = ("embed_dim", "num_classes", "labelled_classes")
SETTABLE = ("num_classes", "labelled_classes")


def loss_class(name: str) -> type[nn.Module]:
    if ":" in name and name not in LOSSES:
        return _imported_loss(name)
    if name not in LOSSES:
        close = difflib.get_close_matches(name, LOSSES, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ValueError(f"unknown loss '{name}'; {hint}known losses: {', '.join(sorted(LOSSES))}")
    module, _, attr = LOSSES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def _imported_loss(target: str) -> type[nn.Module]:
    module, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"loss '{target}' cannot be imported: {err}") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"loss '{target}' is not an nn.Module class")
    return cls


def loss_parameters(name: str) -> list[str]:
    sig = inspect.signature(loss_class(name).__init__)
    return [p for p in sig.parameters if p != "self" and (p not in INJECTED or p in SETTABLE)]


def check_term(name: str, params: dict[str, Any]) -> None:
    """Raise ValueError for an unknown loss or a parameter its constructor does not take."""
    valid = loss_parameters(name)
    for key in params:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ValueError(f"loss '{name}' has no parameter '{key}'; {hint}its parameters: {', '.join(valid) or '(none)'}")


def build_loss(name: str, params: dict[str, Any], embed_dim: int, num_classes: int,
               labelled_classes: int = 0) -> nn.Module:
    cls = loss_class(name)
    sig = inspect.signature(cls.__init__).parameters
    supplied = {"embed_dim": embed_dim, "num_classes": num_classes, "labelled_classes": labelled_classes or num_classes}
    injected = {k: v for k, v in supplied.items() if k in sig and k not in params}
    if "num_classes" in params and params["num_classes"] < num_classes:
        raise ValueError(f"loss '{name}': num_classes={params['num_classes']} but the training labels "
                         f"reach {num_classes - 1}; raise it or leave it unset")
    return cls(**params, **injected)


class Criterion(nn.Module):
    """The weighted sum of the configured loss terms; also reports each term."""

    def __init__(self, terms: list[tuple[str, float, nn.Module]]) -> None:
        super().__init__()
        names = [name for name, _, _ in terms]
        self.names = [f"{n}_{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]
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


def build_criterion(terms: list[Any], embed_dim: int, num_classes: int, labelled_classes: int = 0) -> Criterion:
    """``terms``: config LossTerm objects (name, weight, params)."""
    built = [(t.name, t.weight, build_loss(t.name, t.params, embed_dim, num_classes, labelled_classes))
             for t in terms]
    return Criterion(built)

"""Cross-entropy over random meta-classes, one classifier per ensemble branch (REIR).

The ensemble model (``imret.models.ensemble.EnsembleNet``) returns, in training mode,
its branches' raw logits as ``B x E x M``. This loss maps each sample's class to its
meta-class in every branch with the run's codes (``imret.reir.draw_codes``) and adds
the branches' cross-entropies. Like every imret loss it also takes ``B x D``
embeddings, read as E blocks of M (D = E x M).

``branches`` and ``meta_class_size`` should be given, equal to ``model.ensemble``'s.
Left at 0, M is the seed's 12 (or the number of classes, if fewer) and E is
``embed_dim / M``; a 3-D input whose shape disagrees is an error at the first step.

The codes are drawn at construction from ``(seed, num_classes, branches,
meta_class_size, codes)`` and kept as a buffer, so a checkpoint holds the codes its
weights were trained with and a resumed run uses them, not a fresh draw.

Reduction: ``sum`` (default) adds the E per-branch cross-entropies, each a mean over
the batch; this is the issue's definition and gives every branch the gradient it would
get alone. ``mean`` also averages over the branches, which is what the seed's
``nn.CrossEntropyLoss`` on ``B x M x E`` logits computes; the two differ by the factor
E, which Adam all but cancels and SGD does not.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from imret.reir import draw_codes

SEED_META_CLASS_SIZE = 12  # the seed's default for CUB and Cars


class MetaClassCrossEntropy(nn.Module):
    def __init__(self, embed_dim: int, num_classes: int, branches: int = 0, meta_class_size: int = 0,
                 codes: str = "fixed", seed: int = 0, reduction: str = "sum") -> None:
        super().__init__()
        meta_class_size = meta_class_size or max(2, min(SEED_META_CLASS_SIZE, num_classes))
        branches = branches or embed_dim // meta_class_size
        _check_shape_args(embed_dim, branches, meta_class_size, reduction)
        self.branches, self.meta_class_size, self.reduction = branches, meta_class_size, reduction
        table = draw_codes(num_classes, branches, meta_class_size, codes, seed)
        self.register_buffer("codes", torch.from_numpy(table))  # E x C, saved with the criterion

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.ndim == 2 and logits.shape[1] == self.branches * self.meta_class_size:
            logits = logits.reshape(len(logits), self.branches, self.meta_class_size)
        self._check_logits(logits)
        num_classes = self.codes.shape[1]
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"meta_ce: labels must lie in [0, {num_classes}) (the classes the codes were drawn "
                             f"for), got [{int(labels.min())}, {int(labels.max())}]")
        targets = self.codes[:, labels].T  # B x E
        per_branch = F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1), reduction="none")
        per_branch = per_branch.view(targets.shape).mean(dim=0)  # E: each branch's mean over the batch
        return per_branch.sum() if self.reduction == "sum" else per_branch.mean()

    def _check_logits(self, logits: torch.Tensor) -> None:
        expected = (self.branches, self.meta_class_size)
        if logits.ndim != 3 or tuple(logits.shape[1:]) != expected:
            raise ValueError(
                f"meta_ce expects the ensemble's training output B x {expected[0]} x {expected[1]} (branches x "
                f"meta-classes), got {tuple(logits.shape)}. Its params.branches and params.meta_class_size must "
                f"equal model.ensemble.branches and model.ensemble.meta_class_size, and the model must be an ensemble."
            )

    def extra_repr(self) -> str:
        return (f"branches={self.branches}, meta_class_size={self.meta_class_size}, "
                f"classes={self.codes.shape[1]}, reduction={self.reduction}")


def _check_shape_args(embed_dim: int, branches: int, meta_class_size: int, reduction: str) -> None:
    if reduction not in ("sum", "mean"):
        raise ValueError(f"meta_ce: reduction must be 'sum' (over branches) or 'mean', got '{reduction}'")
    if branches < 1:
        raise ValueError(f"meta_ce: the model's embedding ({embed_dim} dimensions) holds no branch of "
                         f"{meta_class_size} meta-classes; set params.branches and params.meta_class_size to "
                         f"model.ensemble.branches and model.ensemble.meta_class_size (e.g. 48 and 12)")
    if embed_dim != branches * meta_class_size:
        raise ValueError(
            f"meta_ce: params.branches ({branches}) x params.meta_class_size ({meta_class_size}) = "
            f"{branches * meta_class_size}, but the model's embedding has {embed_dim} dimensions. The loss must "
            f"use the model's model.ensemble.branches and model.ensemble.meta_class_size (and the model must be "
            f"an ensemble: model.ensemble.branches > 0)."
        )

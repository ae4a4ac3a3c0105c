"""Classification losses on the embedding: cross-entropy and additive-margin softmax (CosFace).

Both own their classifier weights, so like every imret loss they are called as
``loss(embeddings, labels)``. With cosine logits, logit_c = s * cos(theta_c), where
theta_c is the angle between the L2-normalised embedding and class c's normalised
weight; additive-margin softmax subtracts m from the true class's cosine before
scaling (Wang et al., 2018). The PSS seed used m = 0.3, s = 30 on a plain linear
layer with bias rather than on cosines (``cosine=False``).

Fine-tuning with pseudo-labels: labels < ``labelled_classes`` are real classes and
labels >= it are pseudo-classes (the cluster stage's convention). ``heads=1`` trains
one classifier over real + pseudo classes; ``heads=2`` trains two, each sample through
the head of its kind, each over its own classes.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class CosineClassifier(nn.Module):
    """Cosine similarities between embeddings and class weights."""

    def __init__(self, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embed_dim))
        nn.init.normal_(self.weight, std=0.01)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return F.normalize(embeddings, dim=-1) @ F.normalize(self.weight, dim=-1).T


class _ClassifierLoss(nn.Module):
    def __init__(self, embed_dim: int, num_classes: int, scale: float, margin: float, cosine: bool,
                 heads: int, labelled_classes: int) -> None:
        super().__init__()
        if heads not in (1, 2):
            raise ValueError(f"heads must be 1 or 2, got {heads}")
        self.scale, self.margin, self.cosine, self.num_classes = scale, margin, cosine, num_classes
        split = labelled_classes if heads == 2 else num_classes
        if heads == 2 and not 0 < split < num_classes:
            raise ValueError(f"two heads need 0 < labelled_classes ({split}) < num_classes ({num_classes})")
        sizes = [split, num_classes - split] if heads == 2 else [num_classes]
        self.offsets = [0, split] if heads == 2 else [0]
        self.heads = nn.ModuleList(self._head(embed_dim, n) for n in sizes)

    def _head(self, embed_dim: int, n: int) -> nn.Module:
        return CosineClassifier(embed_dim, n) if self.cosine else nn.Linear(embed_dim, n)

    def logits(self, head: int, embeddings: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        out = self.heads[head](embeddings)
        if self.margin and labels is not None:
            out = out - self.margin * F.one_hot(labels, out.shape[1]).to(out.dtype)
        return self.scale * out

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes}) for this classifier, "
                             f"got [{int(labels.min())}, {int(labels.max())}]; set the loss's num_classes")
        total = embeddings.new_zeros(())
        for head, start in enumerate(self.offsets):
            end = self.offsets[head + 1] if head + 1 < len(self.offsets) else self.num_classes
            mine = (labels >= start) & (labels < end)
            if mine.any():
                local = labels[mine] - start
                ce = F.cross_entropy(self.logits(head, embeddings[mine], local), local, reduction="sum")
                total = total + ce
            else:  # keep every parameter in the graph, so DDP's gradient reduction stays in step
                total = total + 0.0 * sum(p.sum() for p in self.heads[head].parameters())
        return total / len(labels)


class CrossEntropyLoss(_ClassifierLoss):
    """Softmax cross-entropy over a classifier on the embedding.

    ``cosine=True`` (default) uses normalised weights and ``scale`` (a normalised
    softmax; L2-normalised embeddings need the scale to reach confident logits);
    ``cosine=False`` is a plain linear layer with bias and ``scale=1``.
    """

    def __init__(self, embed_dim: int, num_classes: int, scale: float = 16.0, cosine: bool = True,
                 heads: int = 1, labelled_classes: int = 0) -> None:
        super().__init__(embed_dim, num_classes, scale if cosine else 1.0, 0.0, cosine, heads, labelled_classes)


class AMSoftmaxLoss(_ClassifierLoss):
    """Additive-margin softmax (CosFace): cross-entropy over s * (cos(theta) - m * [true class]).

    ``cosine=False`` is the PSS seed's head instead: a plain ``Linear`` with bias on the
    (L2-normalised) embedding, and cross-entropy over s * (logit - m * [true class]).
    """

    def __init__(self, embed_dim: int, num_classes: int, margin: float = 0.3, scale: float = 30.0,
                 cosine: bool = True, heads: int = 1, labelled_classes: int = 0) -> None:
        super().__init__(embed_dim, num_classes, scale, margin, cosine, heads, labelled_classes)

"""TensorFlow's semi-hard triplet loss, as the CBIR seed computed it (squared distances)."""

from __future__ import annotations

import torch
import torch.nn as nn


def squared_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """||a||^2 + ||b||^2 - 2 a.b, clamped at 0, with a zero diagonal (TF's ``pairwise_distance(squared=True)``)."""
    sq = (embeddings * embeddings).sum(dim=1)
    d = (sq[:, None] + sq[None, :] - 2.0 * embeddings @ embeddings.T).clamp(min=0.0)
    return d * (1.0 - torch.eye(len(d), dtype=d.dtype, device=d.device))


class TFSemiHardTripletLoss(nn.Module):
    """The semi-hard triplet loss of TensorFlow (tf.contrib, later TF-Addons), on SQUARED distances.

    The CBIR seed (tanakafer/tfr) trains with its own copy of tf.contrib's
    ``triplet_semihard_loss`` (``ranking/semi_hard_triplet.py``), whose distance is the
    squared Euclidean one; it equals TF-Addons' ``triplet_semihard_loss`` with
    ``distance_metric="squared-L2"``, not TF-Addons' default (non-squared) "L2".

    For every ordered positive pair (a, p), p != a, with D the squared distance: the
    negative n* is the closest negative with D(a, n) > D(a, p) (strictly farther), or, when
    there is none, the farthest negative of a (0 when a has no negative at all). The pair
    pays ``max(D(a, p) - D(a, n*) + margin, 0)``, and the loss is the mean over ALL positive
    pairs, zeros included (the seed's ``tf.reduce_mean``). pytorch-metric-learning's miner +
    ``TripletMarginLoss`` (the ``triplet`` loss) differs: non-squared distances, every
    semi-hard triplet rather than one negative per pair, and a mean over non-zero terms.

    A batch without any positive pair is an error here (the seed's mean of nothing is NaN).
    ``tests/test_seed_losses.py`` checks this loss against the seed's own code
    (``tests/data/tf_semihard_reference.npz``, made by ``bench/make_tf_semihard_reference.py``).
    """

    def __init__(self, margin: float = 1.0) -> None:
        super().__init__()
        self.margin = margin

    def per_pair(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of every positive pair, in row-major (anchor, positive) order, as the seed returns it."""
        d = squared_distances(embeddings)
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        negative = ~same
        # each anchor's negative distances, ascending, with +inf where there is no negative
        sorted_neg, _ = torch.where(negative, d, torch.full_like(d, float("inf"))).sort(dim=1)
        count = negative.sum(dim=1, keepdim=True)
        first_farther = torch.searchsorted(sorted_neg.detach(), d.detach().contiguous(), right=True)  # [a, p]
        has_farther = first_farther < count
        outside = sorted_neg.gather(1, first_farther.clamp(max=len(d) - 1))
        farthest = sorted_neg.gather(1, (count - 1).clamp(min=0))  # [a, 1]
        farthest = torch.where(count > 0, farthest, torch.zeros_like(farthest))
        chosen = torch.where(has_farther, outside, farthest.expand_as(d))
        loss = (d - chosen + self.margin).clamp(min=0.0)
        return loss[same & ~eye]

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        losses = self.per_pair(embeddings, labels)
        if not len(losses):
            raise ValueError("tf_semihard: the batch holds no positive pair (every label appears once); "
                             "draw P x K batches with data.samples_per_class >= 2")
        return losses.mean()

"""Smooth-AP (Brown, Xie, Kalogeiton & Zisserman, ECCV 2020)."""

from __future__ import annotations

import torch
import torch.nn as nn


def clamped_sigmoid(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """sigmoid(x / temperature) with the exponent clamped to [-50, 50], as in the original code."""
    return 1.0 / (1.0 + torch.exp(torch.clamp(-x / temperature, min=-50.0, max=50.0)))


class SmoothAPLoss(nn.Module):
    """1 - mean over queries of a smoothed average precision, computed from labels.

    For a query q and a positive i of q (the positives of q include q itself, as in
    the original implementation), with cosine similarities s:

        R_all(q, i) = 1 + sum_{j != i}            sigmoid((s_qj - s_qi) / tau)
        R_pos(q, i) = 1 + sum_{j != i, j pos q}   sigmoid((s_qj - s_qi) / tau)
        AP_q        = mean over positives i of R_pos(q, i) / R_all(q, i)

    Every sample of the batch is a query. Unlike the original, which assumes the batch
    is laid out class by class with equal counts, this takes the positives from the
    labels, so any batch order and any number of samples per class works; on a
    class-contiguous, equal-count batch it equals the original to float tolerance.

    pytorch-metric-learning's ``SmoothAPLoss`` is not used: its 2.9.0 release reshapes
    the batch as if it held as many classes as samples per class, which groups the
    samples wrongly whenever P != K (e.g. 96 classes x 4 samples).

    Memory is O(B^3) for a batch of B (the pairwise differences for every query); a
    global batch of 384 needs about 0.25 GB per copy in float32.
    """

    def __init__(self, temperature: float = 0.01) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sim = embeddings @ embeddings.T  # embeddings are L2-normalised: cosine similarity
        positive = (labels[:, None] == labels[None, :]).to(sim.dtype)  # [q, j]
        n = sim.shape[0]
        # diff[q, i, j] = s_qj - s_qi
        diff = sim[:, None, :] - sim[:, :, None]
        not_self = 1.0 - torch.eye(n, dtype=sim.dtype, device=sim.device)  # [i, j]: j != i
        sg = clamped_sigmoid(diff, self.temperature) * not_self[None]
        r_all = 1.0 + sg.sum(dim=-1)  # [q, i]
        r_pos = 1.0 + (sg * positive[:, None, :]).sum(dim=-1)  # [q, i]
        ap = (positive * r_pos / r_all).sum(dim=-1) / positive.sum(dim=-1)
        return 1.0 - ap.mean()

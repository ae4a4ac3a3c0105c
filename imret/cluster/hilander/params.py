"""Hi-LANDER's settings in one flat record, as the model, training and inference read them.

The config splits them: ``cluster.hilander`` (``HilanderConfig``) holds the training
settings, and the inference settings are ``cluster.k``, ``tau``, ``thresh`` and
``levels``, shared with the density method. ``LanderParams.from_config`` joins the two.
The record also carries the reference's options that PSS leaves at their defaults
(more convs or heads, the non-attention layer, cluster features, focal loss), so the
parity tests can check them against the DGL code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from imret.config import ClusterConfig


@dataclass
class LanderParams:
    """Settings; the defaults are PSS's recipe (PSS/train.sh lines 29-34 and 37-44)."""

    knn_k: tuple[int, ...] = (10, 5, 3)  # training graphs: one k per set ...
    levels: tuple[int, ...] = (2, 3, 4)  # ... and its number of levels (ground-truth decode)
    hidden: int = 512
    num_conv: int = 1
    dropout: float = 0.0
    gat: bool = True
    gat_k: int = 1  # attention heads
    balance: bool = True  # equal numbers of positive and negative edges in the edge loss
    use_cluster_feat: bool = False
    use_focal_loss: bool = False
    epochs: int = 1000
    batch_size: int = 4096  # seed nodes per training step (all their in-edges come along)
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-5
    eta_min: float = 1e-5  # floor of the cosine schedule
    test_k: int = 10
    test_levels: int = 10
    tau: float = 0.9  # keep an edge when P(same class) > tau (the reference tests P(other) < 1 - tau)
    thresh: float = 0.8  # select nodes whose level-0 predicted density exceeds this
    early_stop: bool = True
    knn: str = "exact"  # "exact" (the reference's IndexFlatIP) or "hnsw" (approximate, for scale)
    chunk: int = 65536  # destination rows per inference chunk (bounds memory, not results)
    seed: int = 0
    device: str = "auto"  # "auto": CUDA when available, else CPU
    log_every: int = 0  # print the epoch's losses every this many epochs (0: quiet)

    @classmethod
    def from_config(cls, params: ClusterConfig, points: int = 0) -> LanderParams:
        """The cluster section's settings; the k-NN is exact below ``cluster.exact_below`` points."""
        h = params.hilander
        return cls(knn_k=tuple(h.train_k), levels=tuple(h.train_levels), hidden=h.hidden, num_conv=h.num_conv,
                   balance=h.balance, epochs=h.epochs, batch_size=h.batch_size, lr=h.lr, momentum=h.momentum,
                   weight_decay=h.weight_decay, eta_min=h.eta_min, test_k=params.k, test_levels=params.levels,
                   tau=params.tau, thresh=params.thresh, early_stop=h.early_stop,
                   knn="exact" if points < params.exact_below else "hnsw", seed=h.seed, device=h.device)


def resolve_device(name: str) -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)

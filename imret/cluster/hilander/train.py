"""Training LANDER on labelled features, as PSS's train_subg_inat.py does.

The loss is the density MSE over a minibatch's seed nodes plus the cross-entropy of
their in-edges whose source is denser by ground truth, with the reference's balancing
of positive and negative edges (the example's models/lander.py:138-187). Each step takes the next minibatch
of each training graph in turn; an epoch is as many rounds as the first graph has
minibatches; SGD with momentum and weight decay, the learning rate on a cosine from
``lr`` to ``eta_min`` stepped every minibatch (train_subg_inat.py:157-217). Unlike the
reference, everything random (initialisation, shuffling, balancing) follows
``LanderParams.seed``. The checkpoint is a plain state dict, read back with
``torch.load(weights_only=True)``; the log is one JSON line per epoch.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import torch.nn.functional as F

from imret.cluster.hilander.decode import build_training_graphs
from imret.cluster.hilander.model import GraphTensors, Lander, forward_batch, to_tensors
from imret.cluster.hilander.params import LanderParams, resolve_device


def balance_mask(mask: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Drops random edges of the larger class (positive/negative) among ``mask`` until both are equal."""
    flat, labels = mask.flatten().clone(), labels.flatten()
    pos = torch.nonzero(flat & (labels == 1)).flatten()
    neg = torch.nonzero(flat & (labels == 0)).flatten()
    more, fewer = (pos, neg) if len(pos) > len(neg) else (neg, pos)
    if len(more) > len(fewer):
        drop = rng.choice(len(more), len(more) - len(fewer), replace=False)
        flat[more[torch.from_numpy(drop).to(more.device)]] = False
    return flat.view(mask.shape)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """The reference's focal loss: mean of -(1 - p)^gamma log p, p the true class's probability (alpha 1)."""
    p = logits.softmax(1).gather(1, target[:, None])
    return (-(1 - p) ** gamma * p.log()).mean()


def lander_loss(logits: torch.Tensor, density: torch.Tensor, true_density: torch.Tensor, edge_labels: torch.Tensor,
                mask: torch.Tensor, focal: bool = False) -> tuple[torch.Tensor, float, float]:
    """Density MSE plus the edge loss on ``mask`` (edges from a truly denser source)."""
    loss_den = F.mse_loss(density, true_density)
    if not bool(mask.any()):  # a batch may have no denser-source edge at all
        return loss_den, loss_den.item(), 0.0
    chosen, target = logits[mask], edge_labels[mask]
    loss_conn = focal_loss(chosen, target) if focal else F.cross_entropy(chosen, target)
    return loss_den + loss_conn, loss_den.item(), loss_conn.item()


def batch_loss(model: Lander, g: GraphTensors, seeds: np.ndarray, params: LanderParams,
               rng: np.random.Generator) -> tuple[torch.Tensor, float, float]:
    """The loss of one minibatch of seed nodes of a training graph."""
    assert g.density is not None and g.edge_labels is not None
    logits, dens = forward_batch(model, g, seeds)
    out = torch.from_numpy(seeds).to(g.x.device)
    true_den, nbr = g.density[out], g.nbr[out]
    mask = g.valid[out] & (g.density[nbr] > true_den[:, None])
    labels = g.edge_labels[out]
    if params.balance:
        mask = balance_mask(mask, labels, rng)
    return lander_loss(logits, dens, true_den, labels, mask, params.use_focal_loss)


# ----------------------------------------------------------------------------- training


class SeedStream:
    """Shuffled batches of a graph's nodes; reshuffled when exhausted (a fresh DataLoader)."""

    def __init__(self, n: int, batch: int, rng: np.random.Generator) -> None:
        self.n, self.batch, self.rng = n, batch, rng
        self.queue: list[np.ndarray] = []

    def __len__(self) -> int:
        """Batches per pass over the nodes."""
        return math.ceil(self.n / self.batch)

    def next(self) -> np.ndarray:
        """The next batch of node ids."""
        if not self.queue:
            order = self.rng.permutation(self.n)
            self.queue = [order[s:s + self.batch] for s in range(0, self.n, self.batch)][::-1]
        return self.queue.pop()


def make_model(feature_dim: int, params: LanderParams) -> Lander:
    """A freshly initialised LANDER, seeded by ``params.seed``."""
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(params.seed)
        return Lander(feature_dim, params.hidden, params.num_conv, params.dropout, params.gat, params.gat_k,
                      params.use_cluster_feat)


def train_hilander(features: np.ndarray, labels: np.ndarray, params: LanderParams, model: Lander | None = None,
                   log_path: Path | None = None) -> tuple[Lander, dict[str, Any]]:
    """Trains LANDER on labelled features; one JSON line per epoch goes to ``log_path`` when given."""
    started = time.perf_counter()
    device = resolve_device(params.device)
    graphs, _ = build_training_graphs(features, labels, params.knn_k, params.levels, params.knn)
    if not graphs:
        raise ValueError(f"hilander: {len(features)} labelled points make no training graph: every set needs more "
                         f"than k points (cluster.hilander.train_k = {list(params.knn_k)}); label more points "
                         "or lower train_k")
    model = (model if model is not None else make_model(features.shape[1], params)).to(device).train()
    tensors = [to_tensors(model, g, device) for g in graphs]
    log: dict[str, Any] = {"graph_nodes": [g.n for g in graphs], "graphs_s": time.perf_counter() - started,
                           "device": str(device)}
    if log_path is None:
        log.update(fit(model, tensors, params))
    else:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w") as stream:
            log.update(fit(model, tensors, params, stream))
    log["train_s"] = time.perf_counter() - started
    return model.eval(), log


def fit(model: Lander, tensors: list[GraphTensors], params: LanderParams,
        stream: TextIO | None = None) -> dict[str, Any]:
    """The SGD loop; returns each epoch's mean (loss, density loss, edge loss) and the step count."""
    rng = np.random.default_rng(params.seed)
    streams = [SeedStream(len(g.nbr), params.batch_size, rng) for g in tensors]
    rounds = len(streams[0])
    opt = torch.optim.SGD(model.parameters(), lr=params.lr, momentum=params.momentum,
                          weight_decay=params.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=params.epochs * rounds * len(streams),
                                                       eta_min=params.eta_min)
    epochs = []
    for epoch in range(params.epochs):
        losses = [_step(model, g, s.next(), params, rng, opt, sched) for _ in range(rounds)
                  for g, s in zip(tensors, streams)]
        epochs.append(np.mean(np.array(losses), 0).tolist())
        _log_epoch(epoch, epochs[-1], params, stream)
    return {"epochs": epochs, "steps": params.epochs * rounds * len(streams)}


def _log_epoch(epoch: int, losses: list[float], params: LanderParams, stream: TextIO | None) -> None:
    if stream is not None:
        stream.write(json.dumps({"epoch": epoch + 1, "loss": losses[0], "density": losses[1], "edge": losses[2]})
                     + "\n")
        stream.flush()
    if params.log_every and (epoch + 1) % params.log_every == 0:
        print(f"epoch {epoch + 1}: loss {losses[0]:.4f} den {losses[1]:.4f} conn {losses[2]:.4f}")


def _step(model: Lander, g: GraphTensors, seeds: np.ndarray, params: LanderParams, rng: np.random.Generator,
          opt: torch.optim.Optimizer, sched: Any) -> tuple[float, float, float]:
    """One SGD step on one minibatch; its (loss, density loss, edge loss)."""
    opt.zero_grad()
    loss, den, conn = batch_loss(model, g, seeds, params, rng)
    loss.backward()
    opt.step()
    sched.step()
    return loss.item(), den, conn



def save_model(model: Lander, path: Path) -> None:
    """The state dict, written to a temporary file and renamed (no half-written checkpoint)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    tmp.replace(path)


def load_model(path: Path, feature_dim: int, params: LanderParams) -> Lander:
    """A LANDER built from ``params`` with the weights of ``path`` (tensors only: weights_only=True)."""
    model = make_model(feature_dim, params)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()

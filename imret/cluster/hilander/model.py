"""LANDER, the network of Hi-LANDER, over dense ``(n, k)`` neighbour tables instead of DGL graphs.

Each graph conv is DGL's ``GATConv`` with one head by default (a bias-free projection,
attention scores ``attn_l``/``attn_r``, LeakyReLU 0.2, a softmax over the in-edges, a
neighbour sum and a bias), then the reference's second bias, the mean over heads, ReLU
and dropout (graphconv.py:40-63). The edge classifier reads src_mlp(source) +
dst_mlp(destination) (the example's models/lander.py:47-69), and a node's predicted density is the mean over
its in-edges of similarity x (P(same) - P(other)) (models/lander.py:71-74). Weighted neighbour
sums are ``embedding_bag`` calls, which build no (edges x hidden) message tensor, as
DGL's fused kernels do not. Module names are the reference's, so its state dicts load.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from imret.cluster.hilander.graphs import LevelGraph


@dataclass
class Hop:
    """One graph-conv step: destination rows and their in-neighbours, as rows of the input."""

    dst: torch.Tensor  # (m,) long
    nbr: torch.Tensor  # (m, k) long (invalid columns point anywhere valid; their weight is 0)
    valid: torch.Tensor  # (m, k) bool
    affine: torch.Tensor  # (m, k) float: weights of the non-attention layer


def neighbour_sum(weights: torch.Tensor, nbr: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """sum_c weights[i, c] * values[nbr[i, c]] without materialising the (m, k, F) messages."""
    return F.embedding_bag(nbr, values, per_sample_weights=weights.to(values.dtype), mode="sum")


def masked_softmax(scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax over each row's valid columns (dim 1); rows without any give zeros (no messages)."""
    scores = scores.masked_fill(~valid, float("-inf"))
    top = scores.amax(1, keepdim=True).detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.exp(scores - top)
    total = e.sum(1, keepdim=True)
    return e / torch.where(total > 0, total, torch.ones_like(total))


class GATLayer(nn.Module):
    """Graph attention (Velickovic et al.), DGL's GATConv with its defaults: no residual, bias."""

    def __init__(self, in_dim: int, out_dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.out_dim = heads, out_dim
        self.fc = nn.Linear(in_dim, out_dim * heads, bias=False)
        self.attn_l = nn.Parameter(torch.empty(1, heads, out_dim))
        self.attn_r = nn.Parameter(torch.empty(1, heads, out_dim))
        self.bias = nn.Parameter(torch.zeros(heads * out_dim))
        gain = nn.init.calculate_gain("relu")
        for weight in (self.fc.weight, self.attn_l, self.attn_r):
            nn.init.xavier_normal_(weight, gain=gain)

    def project(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, attention score as a source): computed once per input row, shared by all chunks."""
        z = self.fc(h).view(-1, self.heads, self.out_dim)
        return z, (z * self.attn_l).sum(-1)

    def aggregate(self, z: torch.Tensor, el: torch.Tensor, hop: Hop) -> torch.Tensor:
        """Attention-weighted sum of the in-neighbours' projections, plus GATConv's bias: (m, heads, out)."""
        er = (z[hop.dst] * self.attn_r).sum(-1)  # (m, H): score as a destination
        scores = F.leaky_relu(el[hop.nbr] + er[:, None, :], 0.2)  # (m, k, H)
        alpha = masked_softmax(scores, hop.valid[..., None])
        out = torch.stack([neighbour_sum(alpha[..., h], hop.nbr, z[:, h].contiguous())
                           for h in range(self.heads)], 1)
        return out + self.bias.view(self.heads, self.out_dim)

    def forward(self, h: torch.Tensor, hop: Hop) -> torch.Tensor:
        """The layer on the destinations of ``hop``."""
        return self.aggregate(*self.project(h), hop)


class MeanAggLayer(nn.Module):
    """The reference's non-attention layer: [own features, similarity-weighted neighbour mean] -> Linear."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Linear(in_dim * 2, out_dim)

    def forward(self, h: torch.Tensor, hop: Hop) -> torch.Tensor:
        """[own features, similarity-weighted neighbour sum] of each destination, through the Linear."""
        agg = neighbour_sum(hop.affine * hop.valid, hop.nbr, h)
        return self.mlp(torch.cat([h[hop.dst], agg], -1))


class GraphConv(nn.Module):
    """A layer, the mean over heads of (output + bias) for attention, then ReLU and dropout."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float, gat: bool, heads: int) -> None:
        super().__init__()
        self.gat, self.dropout = gat, dropout
        self.gcn_layer: nn.Module = GATLayer(in_dim, out_dim, heads) if gat else MeanAggLayer(in_dim, out_dim)
        if gat:
            self.bias = nn.Parameter(torch.zeros(heads, out_dim))

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        """The wrapper's bias and mean over heads (attention only), ReLU, dropout."""
        if self.gat:
            out = (out + self.bias).mean(1)
        return F.dropout(F.relu(out), self.dropout, training=self.training)

    def forward(self, h: torch.Tensor, hop: Hop) -> torch.Tensor:
        """The layer, then ``finish``."""
        return self.finish(self.gcn_layer(h, hop))


class Lander(nn.Module):
    """LANDER: graph convs, then an edge classifier on src_mlp(source) + dst_mlp(destination).

    Module names match the reference's, so its checkpoints load with ``load_state_dict``.
    """

    def __init__(self, feature_dim: int, hidden: int = 512, num_conv: int = 1, dropout: float = 0.0,
                 gat: bool = True, gat_k: int = 1, use_cluster_feat: bool = False) -> None:
        super().__init__()
        if not 1 <= num_conv <= 4:
            raise ValueError(f"num_conv = {num_conv}: the reference defines 1 to 4 graph convs")
        half = hidden // 2
        # Layer widths as the reference: hidden, hidden, hidden/2, hidden/2.
        dims = [feature_dim * (2 if use_cluster_feat else 1), hidden, hidden, half, half]
        self.use_cluster_feat = use_cluster_feat
        self.conv = nn.ModuleList(GraphConv(dims[i], dims[i + 1], dropout, gat, gat_k) for i in range(num_conv))
        self.src_mlp = nn.Linear(dims[num_conv], half)
        self.dst_mlp = nn.Linear(dims[num_conv], half)
        self.classifier_conn = nn.Sequential(nn.PReLU(half), nn.Linear(half, half), nn.PReLU(half),
                                             nn.Linear(half, 2))

    def inputs(self, features: torch.Tensor, cluster_features: torch.Tensor) -> torch.Tensor:
        """The first conv's input: the features, with the cluster features beside them when used."""
        return torch.cat([features, cluster_features], 1) if self.use_cluster_feat else features

    def embed(self, x: torch.Tensor, hops: list[Hop]) -> torch.Tensor:
        """The graph convs, one hop each."""
        for conv, hop in zip(self.conv, hops):
            x = conv(x, hop)
        return x

    def edge_logits(self, h: torch.Tensor, dst: torch.Tensor, nbr: torch.Tensor) -> torch.Tensor:
        """(m, k, 2) logits of 'other class' / 'same class' for the edges nbr -> dst."""
        pair = self.src_mlp(h)[nbr] + self.dst_mlp(h)[dst][:, None, :]
        # PReLU reads dim 1 as channels, so the classifier sees one row per edge.
        return self.classifier_conn(pair.flatten(0, 1)).view(*nbr.shape, 2)


def predicted_density(probs: torch.Tensor, raw_affine: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over in-edges of similarity * (P(same) - P(other)); 0 without in-edges (DGL's mean)."""
    msg = torch.where(valid, raw_affine * (probs[..., 1] - probs[..., 0]), torch.zeros_like(raw_affine))
    return msg.sum(1) / valid.sum(1).clamp_min(1).to(msg.dtype)


# ----------------------------------------------------------------------------- graph tensors


@dataclass
class GraphTensors:
    """A LevelGraph's arrays on the model's device."""

    x: torch.Tensor  # model inputs (n, d or 2d)
    nbr: torch.Tensor  # nbr_safe
    valid: torch.Tensor
    raw_affine: torch.Tensor
    affine: torch.Tensor
    nbr_np: np.ndarray  # nbr_safe and valid, for planning minibatches on the host
    valid_np: np.ndarray
    density: torch.Tensor | None = None
    edge_labels: torch.Tensor | None = None


def to_tensors(model: Lander, graph: LevelGraph, device: torch.device) -> GraphTensors:
    """The graph's tables on ``device``, with the model's inputs (and the training targets when labelled)."""
    def put(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    x = model.inputs(put(graph.features), put(graph.cluster_features))
    out = GraphTensors(x, put(graph.nbr_safe), put(graph.valid), put(graph.raw_affine), put(graph.affine),
                       graph.nbr_safe, graph.valid)
    if graph.labels is not None and graph.density is not None:
        out.density, out.edge_labels = put(graph.density), put(graph.edge_labels())
    return out


def plan_batch(g: GraphTensors, seeds: np.ndarray, num_conv: int) -> tuple[np.ndarray, list[Hop], Hop]:
    """Rows to read, the conv hops, and the seeds' edges among the last conv's rows.

    The loss needs the seeds and their in-neighbours after the last conv; each conv
    needs its destinations' in-neighbours one hop further out (DGL's neighbour sampler
    with fanout k - 1 takes every in-edge of a k-NN graph, so this is what it samples).
    """
    device = g.nbr.device
    sets = [np.unique(np.concatenate([seeds, g.nbr_np[seeds][g.valid_np[seeds]]]))]
    for _ in range(num_conv):
        sets.append(np.unique(np.concatenate([sets[-1], g.nbr_np[sets[-1]][g.valid_np[sets[-1]]]])))
    sets.reverse()  # sets[0] is read from the inputs, sets[-1] is the last conv's output
    hops = [_hop(g, outer, inner, device) for outer, inner in zip(sets[:-1], sets[1:])]
    last = _hop(g, sets[-1], seeds, device)
    return sets[0], hops, last


def _hop(g: GraphTensors, rows_in: np.ndarray, rows_out: np.ndarray, device: torch.device) -> Hop:
    def local(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.searchsorted(rows_in, a)).to(device)

    out = torch.from_numpy(rows_out).to(device)
    return Hop(local(rows_out), local(g.nbr_np[rows_out]), g.valid[out], g.affine[out])


def forward_batch(model: Lander, g: GraphTensors, seeds: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(edge logits (s, k, 2), predicted density (s,)) for the seeds' in-edges."""
    rows, hops, last = plan_batch(g, seeds, len(model.conv))
    h = model.embed(g.x[torch.from_numpy(rows).to(g.x.device)], hops)
    logits = model.edge_logits(h, last.dst, last.nbr)
    out = torch.from_numpy(seeds).to(g.x.device)
    return logits, predicted_density(logits.softmax(-1), g.raw_affine[out], g.valid[out])


@torch.no_grad()
def predict(model: Lander, g: GraphTensors, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """(edge probabilities (n, k, 2), predicted density (n,)) of a whole graph, layer by layer."""
    n = len(g.nbr)
    h = g.x
    for conv in model.conv:
        h = _conv_all(conv, h, g, chunk)
    src, dst = model.src_mlp(h), model.dst_mlp(h)
    probs, dens = [], []
    for s in range(0, n, chunk):
        rows = slice(s, min(n, s + chunk))
        pair = src[g.nbr[rows]] + dst[rows][:, None, :]
        p = model.classifier_conn(pair.flatten(0, 1)).view(*pair.shape[:2], 2).softmax(-1)
        probs.append(p)
        dens.append(predicted_density(p, g.raw_affine[rows], g.valid[rows]))
    return torch.cat(probs), torch.cat(dens)


def _conv_all(conv: GraphConv, h: torch.Tensor, g: GraphTensors, chunk: int) -> torch.Tensor:
    """One conv over every node, ``chunk`` destinations at a time (the projection computed once)."""
    layer = conv.gcn_layer
    shared = layer.project(h) if isinstance(layer, GATLayer) else None
    outs = []
    for s in range(0, len(g.nbr), chunk):
        rows = torch.arange(s, min(len(g.nbr), s + chunk), device=h.device)
        hop = Hop(rows, g.nbr[rows], g.valid[rows], g.affine[rows])
        outs.append(conv.finish(layer.aggregate(*shared, hop) if shared is not None else layer(h, hop)))
    return torch.cat(outs)


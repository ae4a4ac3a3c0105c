"""Global pooling of backbone feature maps into one vector per image."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class GeM(nn.Module):
    """Generalised-mean pooling (Radenovic et al.): (mean x^p)^(1/p) over positions.

    p = 1 is average pooling and p -> inf approaches max pooling; p is learnable by
    default. Inputs are clamped to ``eps`` first because fractional powers of
    negative numbers are undefined.
    """

    def __init__(self, p: float = 3.0, learnable: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=learnable)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: B x C x N (N positions) -> B x C."""
        return x.clamp(min=self.eps).pow(self.p).mean(dim=-1).pow(1.0 / self.p)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.3f}, learnable={self.p.requires_grad}"


class Pool(nn.Module):
    """Pools B x C x N features; ``token`` picks the class token of a transformer."""

    def __init__(self, kind: str, p: float = 3.0, learnable: bool = True) -> None:
        super().__init__()
        self.kind = kind
        self.gem = GeM(p, learnable) if kind == "gem" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gem is not None:
            return self.gem(x)
        if self.kind == "avg":
            return x.mean(dim=-1)
        if self.kind == "max":
            return x.amax(dim=-1)
        raise AssertionError(f"pool {self.kind} is applied to tokens, not here")


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)

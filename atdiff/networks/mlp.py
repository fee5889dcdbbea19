"""A time-conditioned MLP for low-dimensional data (toy problems)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .embeddings import sinusoidal_embedding

__all__ = ["MLP"]


class MLP(nn.Module):
    """``net(x, t) -> (B, dim)`` for ``x`` ``(B, dim)`` and times ``t`` ``(B,)``.

    The sinusoidal time embedding passes through a small MLP and is added to every hidden layer (as in
    the UNet's residual blocks). SiLU activations; the output layer starts at zero so an untrained model
    predicts 0. Declares ``prediction = "eps"`` (times of order 1..1000, e.g. ``VPDiscrete`` steps); wrap it in
    :class:`atdiff.precond.DiffusionModel` for another parametrisation or process.
    """

    prediction = "eps"
    learned_variance = False

    def __init__(self, dim: int, hidden: int = 256, depth: int = 3, time_dim: int = 64) -> None:
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 1:
            raise ValueError(f"dim, hidden, depth: expected >= 1, got {dim}, {hidden}, {depth}")
        self.dim, self.time_dim = dim, time_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(dim, hidden)
        self.hidden = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth - 1))
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x: expected shape (B, {self.dim}), got {tuple(x.shape)}")
        emb = self.time_mlp(sinusoidal_embedding(t, self.time_dim).to(x.dtype))
        h = torch.nn.functional.silu(self.inp(x) + emb)
        for layer in self.hidden:
            h = torch.nn.functional.silu(layer(h) + emb)
        return self.out(h)

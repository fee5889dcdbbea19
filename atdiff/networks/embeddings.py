"""Time embeddings."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["sinusoidal_embedding"]


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Transformer-style embedding of times ``t`` ``(B,)`` into ``(B, dim)``: ``[cos(t f_k), sin(t f_k)]`` with
    frequencies ``f_k = max_period^(-k / (dim/2))``. Odd ``dim`` is zero-padded."""
    if t.ndim != 1:
        raise ValueError(f"t: expected shape (B,), got {tuple(t.shape)}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb

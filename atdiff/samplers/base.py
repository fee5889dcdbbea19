"""Plumbing shared by every sampler: the result type, validated entry, seeded noise, the step loop."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..processes import Process, check_finite
from .grids import check_grid

__all__ = ["SampleResult", "prepare", "randn_like", "step_pairs"]


class SampleResult(NamedTuple):
    """What a sampler returns: the final sample ``x`` ``(B, ...)`` and the number of network evaluations."""

    x: Tensor
    nfe: int


def prepare(x_T: Tensor, process: Process, grid: Tensor, dtype: torch.dtype | None = None
            ) -> tuple[Tensor, Tensor]:
    """Validate the sampler inputs; return ``x_T`` (cast to ``dtype`` if given) and the float64 grid."""
    check_finite(x_T, "x_T")
    if x_T.ndim < 1 or x_T.shape[0] < 1:
        raise ValueError(f"x_T: expected shape (B, ...) with B >= 1, got {tuple(x_T.shape)}")
    grid = check_grid(grid, process)
    return (x_T if dtype is None else x_T.to(dtype)), grid


def randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise of ``x``'s shape, dtype and device, drawn from ``generator`` if given."""
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def step_pairs(grid: Tensor, x: Tensor, progress: bool, desc: str) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Yield ``(i, t, s)`` for consecutive grid times as scalar tensors on ``x``'s device (float64)."""
    grid = grid.to(x.device)
    for i in tqdm(range(len(grid) - 1), desc=desc, disable=not progress, leave=False):
        yield i, grid[i], grid[i + 1]


def report(callback: Callable[[dict], None] | None, **info) -> None:
    """Call ``callback`` with the step's information (a dict), if a callback was given."""
    if callback is not None:
        callback(info)

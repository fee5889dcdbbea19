"""Ancestral (DDPM) sampling on an explicit grid."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..param import predict
from ..processes import Process, expand_like
from .base import SampleResult, prepare, randn_like, report, step_pairs

__all__ = ["sample_ddpm", "VARIANCES"]

VARIANCES = ("small", "large")


def sample_ddpm(model: Callable, x_T: Tensor, process: Process, grid: Tensor, *,
                variance: str = "small", clip_x0: float | None = None,
                generator: torch.Generator | None = None, callback: Callable[[dict], None] | None = None,
                progress: bool = False, dtype: torch.dtype | None = None) -> SampleResult:
    """Ancestral sampling: ``x_s ~ N(mu_tilde(x_t, x0_hat), var)`` for each step ``t -> s`` of ``grid``.

    ``variance="small"`` uses the posterior variance ``sigma_ts^2 sigma_s^2 / sigma_t^2`` (DDPM's
    ``beta_tilde``); ``"large"`` uses the forward transition variance ``sigma_ts^2`` (DDPM's ``beta_t``).
    The last step to ``s = t_min`` adds no noise. ``clip_x0`` clamps the predicted ``x0`` (e.g. 1.0 for images).

    Shapes: ``x_T`` ``(B, ...)``; ``grid`` ``(N + 1,)`` decreasing. Returns ``SampleResult(x, nfe=N)``.
    """
    if variance not in VARIANCES:
        raise ValueError(f"variance: expected one of {VARIANCES}, got {variance!r}")
    x, grid = prepare(x_T, process, grid, dtype)
    nfe = 0
    for i, t, s in step_pairs(grid, x, progress, "ddpm"):
        x0 = predict(model, x, t.to(x.dtype), process, "x0")
        nfe += 1
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        mean, var = process.posterior(x, x0, t, s)
        if i < len(grid) - 2:
            if variance == "large":
                var = expand_like(process.transition(s, t)[1] ** 2, x)
            x = mean + var.sqrt() * randn_like(x, generator)
        else:
            x = mean
        report(callback, i=i, t=t, s=s, x=x, x0=x0)
    return SampleResult(x, nfe)

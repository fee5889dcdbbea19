"""Exact Gaussian laws of DDIM / DDPM chains for diagonal linear eps-models, batched over models.

The diagonal special case of :mod:`theory.linear`'s general affine chains: every coordinate stays an independent
Gaussian, so one step is ``m <- k m``, ``v <- k^2 v + w`` with ``k``, ``w`` read off the library's own ``ddim_step``
/ ``process.posterior``. C5 runs hundreds of chains of up to 50 steps, for which the general version is too slow;
C5 compares the two on every run.
"""

from __future__ import annotations

import torch
from torch import Tensor

from atdiff.param import convert
from atdiff.processes import Process
from atdiff.samplers import ddim_step


def chain_step_maps(a: Tensor, process: Process, t: Tensor, s: Tensor, sampler: str) -> tuple[Tensor, Tensor]:
    """Per-coordinate map of one sampler step ``t -> s`` for the eps-model ``a * x``: ``x_s = k x + sqrt(w) z``.

    ``a`` ``(n, d)`` (``n`` models side by side). DDIM (eta = 0) through ``atdiff.samplers.ddim_step``; DDPM
    ("small" variance) through ``process.posterior`` at the predicted ``x0``, as ``sample_ddpm`` does. The map is
    linear (no bias), so evaluating at ``x = 1`` gives ``k``. Returns ``k``, ``w`` of shape ``(n, d)``.
    """
    x = torch.ones_like(a)
    if sampler == "ddim":
        k, _ = ddim_step(x, a * x, process, t, s, eta=0.0)
        return k, torch.zeros_like(k)
    if sampler == "ddpm":
        x0 = convert(a * x, x, t, process, "eps", "x0")
        mean, var = process.posterior(x, x0, t, s)
        return mean, var.expand_as(mean)
    raise ValueError(f"sampler: expected 'ddim' or 'ddpm', got {sampler!r}")


def linear_chain_marginal(slopes: Tensor, grid: Tensor, process: Process, sampler: str) -> tuple[Tensor, Tensor]:
    """Exact law of the sampler output for ``x_T ~ N(0, I)`` and the eps-model ``slopes[i] * x`` at ``grid[i]``.

    ``slopes`` ``(N, n, d)`` for a grid of ``N + 1`` times; the chain keeps every coordinate Gaussian and
    independent: ``m <- k m``, ``v <- k^2 v + w``. Returns the mean and variance ``(n, d)`` (the mean stays 0).
    """
    mean = torch.zeros_like(slopes[0])
    var = torch.ones_like(slopes[0])
    for i in range(len(grid) - 1):
        k, w = chain_step_maps(slopes[i], process, grid[i], grid[i + 1], sampler)
        mean, var = k * mean, k**2 * var + w
    return mean, var



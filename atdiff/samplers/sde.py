"""Reverse-time SDE: Euler-Maruyama predictor with an optional Langevin corrector (Song et al. 2021).

In the EDM coordinates ``y = x / alpha(t)`` (see :mod:`atdiff.samplers.edm`) the forward SDE of every
Gaussian path is driftless, ``dy = dW_u`` in the variance ``u = sigma^2 = (sigma(t) / alpha(t))^2`` (for VP
this is the VP SDE ``dx = -beta x / 2 dt + sqrt(beta) dW`` divided by ``alpha``; for VE it is the VE SDE). Its
reverse is ``dy = -score(y) du + dW_u``, and one Euler-Maruyama step from ``sigma_t`` to ``sigma_s`` is::

    y_s = y_t + (sigma_t^2 - sigma_s^2) score + sqrt(sigma_t^2 - sigma_s^2) z,   score = -eps_hat / sigma_t

The last step adds no noise (Song et al.'s final denoising). The Langevin corrector at level ``sigma``:
``y <- y + e score + sqrt(2 e) z`` with ``e = 2 (snr ||z|| / ||score||)^2``, the norms averaged over the
batch (Song et al.'s reference rule; per-sample norms blow up in low dimension where ``||score||`` of a
sample near a mode is close to 0). The averages skip non-finite rows, so one bad sample cannot spread to the
batch. The rule is invariant to the coordinate scaling by ``alpha``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..processes import Process
from ..validate import check_real
from .base import GridModel, SampleResult, grid_table, prepare, randn_like, report, step_pairs

__all__ = ["sample_sde", "sample_pc", "langevin_step"]


def _finite_mean(v: Tensor) -> Tensor:
    """The mean of the finite entries of ``v`` (no host sync; 0 if there are none)."""
    ok = torch.isfinite(v)
    return torch.where(ok, v, 0.0).sum() / ok.sum().clamp_min(1)


def langevin_step(y: Tensor, score: Tensor, noise: Tensor, snr: float) -> Tensor:
    """One Langevin step ``y + e score + sqrt(2 e) noise`` with
    ``e = 2 (snr mean ||noise|| / mean ||score||)^2`` (per-sample norms averaged over the finite rows of the
    batch: a non-finite row stays non-finite and leaves the others unchanged). Shapes ``(B, ...)``."""
    score_norm = _finite_mean(score.flatten(1).norm(dim=1)).clamp_min(1e-20)
    step = 2 * (snr * _finite_mean(noise.flatten(1).norm(dim=1)) / score_norm) ** 2
    return y + step * score + (2 * step).sqrt() * noise


def sample_sde(model: Callable, x_T: Tensor, process: Process, grid: Tensor, *, corrector_steps: int = 0,
               snr: float = 0.16, cond: Mapping[str, Any] | None = None, generator: torch.Generator | None = None,
               callback: Callable[[dict], None] | None = None, progress: bool = False,
               dtype: torch.dtype | None = None, check_finite: bool = True) -> SampleResult:
    """Euler-Maruyama on the reverse SDE along ``grid`` (see the module docstring); with
    ``corrector_steps = M > 0``, ``M`` Langevin corrector steps (signal-to-noise ratio ``snr``) at each grid
    time before its predictor step (predictor-corrector). ``cond``, ``callback``, ``check_finite`` as in
    :func:`~atdiff.samplers.ancestral.sample_ddpm` (one callback per grid step, after its predictor).

    Shapes: ``x_T`` ``(B, ...)``; ``grid`` ``(N + 1,)`` decreasing. Returns
    ``SampleResult(x, nfe=N (1 + M))``.
    """
    if isinstance(corrector_steps, bool) or not isinstance(corrector_steps, int) or corrector_steps < 0:
        raise ValueError(f"corrector_steps: expected an integer >= 0, got {corrector_steps!r}")
    snr = check_real(snr, "snr", 0.0, open_min=True)
    x, grid = prepare(x_T, process, grid, dtype, model)
    table = grid_table(process, grid)
    evaluate = GridModel(model, process, grid, "eps", cond, sampler="sample_pc" if corrector_steps else "sample_sde",
                         check=check_finite)
    times = evaluate.times

    def score_at(y: Tensor, i: int) -> Tensor:
        return evaluate.at(table.alpha[i] * y, i)[0] * (-1.0 / table.edm[i])

    y = x / table.alpha[0]
    for i, _, _ in step_pairs(grid, x, progress, "pc" if corrector_steps else "sde"):
        for _ in range(corrector_steps):
            y = langevin_step(y, score_at(y, i), randn_like(y, generator), snr)
        score = score_at(y, i)
        x0 = y + table.edm[i] ** 2 * score if callback is not None else None
        du = table.edm[i] ** 2 - table.edm[i + 1] ** 2
        y = y + du * score
        if i < len(grid) - 2:
            y = y + math.sqrt(du) * randn_like(y, generator)
        evaluate.check_step(i)
        report(callback, i=i, t=times[i], s=times[i + 1], x=table.alpha[i + 1] * y, x0=x0, nfe=evaluate.nfe)
    return SampleResult(table.alpha[-1] * y, evaluate.nfe)


def sample_pc(model: Callable, x_T: Tensor, process: Process, grid: Tensor, *, corrector_steps: int = 1,
              snr: float = 0.16, **opts) -> SampleResult:
    """Predictor-corrector: :func:`sample_sde` with ``corrector_steps = 1`` by default."""
    return sample_sde(model, x_T, process, grid, corrector_steps=corrector_steps, snr=snr, **opts)

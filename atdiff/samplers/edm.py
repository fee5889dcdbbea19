"""EDM samplers (Karras et al. 2022, Algorithm 2): Euler and Heun with optional stochastic churn, any process.

The samplers work in the EDM coordinates ``y = x / alpha(t)``, ``sigma = sigma(t) / alpha(t)`` (see
:func:`~atdiff.samplers.grids.edm_sigma`), where every Gaussian path is ``y = x0 + sigma eps`` and the
probability-flow ODE is ``dy / dsigma = eps_hat(alpha y, t(sigma))``. For :class:`~atdiff.processes.VE`
``alpha = 1`` and this is EDM exactly; for VP processes it is EDM's treatment of VP models (the network still
sees ``x = alpha y`` at its own time ``t``). The grid holds process times; for EDM's Karras schedule use
:func:`~atdiff.samplers.grids.karras_time_grid`. The model is asked for ``eps``, which in these coordinates is
the ODE's derivative ``(y - D(y)) / sigma``.
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
from .grids import edm_sigma, edm_time

__all__ = ["sample_euler", "sample_heun", "churn_gamma"]


def churn_gamma(sigma: float, n_steps: int, S_churn: float, S_min: float, S_max: float) -> float:
    """EDM's churn ``gamma = min(S_churn / N, sqrt(2) - 1)`` for ``S_min <= sigma <= S_max``, else 0."""
    if S_churn > 0 and S_min <= sigma <= S_max:
        return min(S_churn / n_steps, math.sqrt(2) - 1)
    return 0.0


def _check_churn(S_churn: float, S_min: float, S_max: float, S_noise: float) -> None:
    check_real(S_churn, "S_churn", 0.0)
    check_real(S_noise, "S_noise", 0.0)
    check_real(S_min, "S_min", 0.0)
    if isinstance(S_max, bool) or not isinstance(S_max, int | float) or math.isnan(S_max):  # +inf is allowed
        raise ValueError(f"S_max: expected a number (inf allowed), got {S_max!r}")
    if not S_min <= S_max:
        raise ValueError(f"S_min, S_max: need 0 <= S_min <= S_max, got {S_min}, {S_max}")


def _sample_edm(model: Callable, x_T: Tensor, process: Process, grid: Tensor, heun: bool, S_churn: float,
                S_min: float, S_max: float, S_noise: float, cond: Mapping[str, Any] | None,
                generator: torch.Generator | None, callback: Callable[[dict], None] | None, progress: bool,
                dtype: torch.dtype | None, check_finite: bool) -> SampleResult:
    _check_churn(S_churn, S_min, S_max, S_noise)
    x, grid = prepare(x_T, process, grid, dtype, model)
    table = grid_table(process, grid)
    sigma_top = edm_sigma(process, process.t_max).item()
    n_steps = len(grid) - 1
    evaluate = GridModel(model, process, grid, "eps", cond, sampler="sample_heun" if heun else "sample_euler",
                         check=check_finite)
    times = evaluate.times
    y = x / table.alpha[0]
    for i, _, _ in step_pairs(grid, x, progress, "heun" if heun else "euler"):
        sig, sig_next = table.edm[i], table.edm[i + 1]
        gamma = churn_gamma(sig, n_steps, S_churn, S_min, S_max)
        if gamma > 0:  # raise the noise level to sig_hat (capped at the process's largest level)
            sig_hat = min(sig * (1 + gamma), sigma_top)
            y = y + (S_noise * math.sqrt(sig_hat**2 - sig**2)) * randn_like(y, generator)
            t_hat = edm_time(process, sig_hat)
            d = evaluate.off_grid(process.alpha(t_hat).item() * y, t_hat)
        else:
            sig_hat = sig
            d = evaluate.at(table.alpha[i] * y, i)[0]
        y_next = y + (sig_next - sig_hat) * d
        if heun and sig_next > 0:
            d_next = evaluate.at(table.alpha[i + 1] * y_next, i + 1)[0]
            y_next = y + (sig_next - sig_hat) * (0.5 * (d + d_next))
        evaluate.check_step(i)
        if callback is not None:
            report(callback, i=i, t=times[i], s=times[i + 1], x=table.alpha[i + 1] * y_next, x0=y - sig_hat * d,
                   nfe=evaluate.nfe)
        y = y_next
    return SampleResult(table.alpha[-1] * y, evaluate.nfe)


def sample_euler(model: Callable, x_T: Tensor, process: Process, grid: Tensor, *, S_churn: float = 0.0,
                S_min: float = 0.0, S_max: float = float("inf"), S_noise: float = 1.0,
                cond: Mapping[str, Any] | None = None, generator: torch.Generator | None = None,
                callback: Callable[[dict], None] | None = None, progress: bool = False,
                dtype: torch.dtype | None = None, check_finite: bool = True) -> SampleResult:
    """EDM Euler: ``y <- y + (sigma_next - sigma_hat) eps_hat`` per grid step, first order; with
    ``S_churn > 0`` each step first raises ``sigma`` to ``sigma_hat = sigma (1 + gamma)`` by adding noise of
    variance ``S_noise^2 (sigma_hat^2 - sigma^2)`` (:func:`churn_gamma`; capped at ``sigma(t_max)``).
    ``cond``, ``callback``, ``check_finite`` as in :func:`~atdiff.samplers.ancestral.sample_ddpm`.

    Shapes: ``x_T`` ``(B, ...)``; ``grid`` ``(N + 1,)`` decreasing process times. Returns
    ``SampleResult(x, nfe=N)``.
    """
    return _sample_edm(model, x_T, process, grid, False, S_churn, S_min, S_max, S_noise, cond, generator,
                       callback, progress, dtype, check_finite)


def sample_heun(model: Callable, x_T: Tensor, process: Process, grid: Tensor, *, S_churn: float = 0.0,
                S_min: float = 0.0, S_max: float = float("inf"), S_noise: float = 1.0,
                cond: Mapping[str, Any] | None = None, generator: torch.Generator | None = None,
                callback: Callable[[dict], None] | None = None, progress: bool = False,
                dtype: torch.dtype | None = None, check_finite: bool = True) -> SampleResult:
    """EDM Heun (second order): the Euler step corrected by the trapezoidal average of ``eps_hat`` at both
    ends; the last step into ``sigma = 0`` stays Euler. Churn as in :func:`sample_euler`.

    Shapes: ``x_T`` ``(B, ...)``; ``grid`` ``(N + 1,)`` decreasing process times. Returns
    ``SampleResult(x, nfe=2N - 1)`` when the grid ends at ``sigma = 0`` (``2N`` otherwise).
    """
    return _sample_edm(model, x_T, process, grid, True, S_churn, S_min, S_max, S_noise, cond, generator,
                       callback, progress, dtype, check_finite)

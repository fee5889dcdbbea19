"""Consistency sampling (Song et al. 2023, Algorithm 1): one step ``x = f(x_T, T)``, or multistep, re-noising to
each level ``tau`` of a decreasing sequence: ``x = f(x + sqrt(tau^2 - sigma_min^2) z, tau)``.

The model is a consistency function on the VE / EDM path (:class:`atdiff.precond.ConsistencyModel`, time = sigma);
any model that declares its prediction works through :func:`atdiff.param.predict` (its ``x0`` prediction is used).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..param import predict, unwrap
from ..processes import VE, Process
from .base import SampleResult, nonfinite_error, prepare, randn_like, report, time_like
from .grids import karras_grid

__all__ = ["sample_consistency", "consistency_grid"]


def consistency_grid(process: Process, steps: int, rho: float = 7.0, sigma_min: float | None = None) -> Tensor:
    """``steps`` decreasing levels for :func:`sample_consistency`: the first ``steps`` of the Karras grid of
    ``steps + 1`` levels from ``sigma_max`` to ``sigma_min`` (so ``[sigma_max]`` for one step; the last level,
    ``sigma_min``, where ``f`` is the identity, is dropped). Float64 ``(steps,)``."""
    if not isinstance(process, VE):
        raise ValueError(f"process: consistency sampling runs on the VE / EDM path, got {type(process).__name__}")
    lo = process.sigma_min if sigma_min is None else float(sigma_min)
    return karras_grid(lo, process.sigma_max, steps + 1, rho, append_zero=False)[:-1]


def _check_levels(grid: Tensor, process: Process, sigma_min: float) -> list[float]:
    grid = torch.as_tensor(grid, dtype=torch.float64)
    if grid.ndim != 1 or grid.numel() < 1:
        raise ValueError(f"grid: expected a 1-D tensor of at least one level, got shape {tuple(grid.shape)}")
    if not bool(torch.isfinite(grid).all()):
        raise ValueError("grid: contains NaN or infinite values")
    if not bool((grid[1:] < grid[:-1]).all()):
        raise ValueError(f"grid: levels must be strictly decreasing, got {grid.tolist()[:8]}")
    if grid[-1] < sigma_min or grid[0] > process.t_max + 1e-9:
        raise ValueError(f"grid: levels must lie in [sigma_min={sigma_min}, {process.t_max}], got "
                         f"[{grid[-1].item()}, {grid[0].item()}]")
    return grid.tolist()


def sample_consistency(model: Callable, x_T: Tensor, process: Process, grid: Tensor, *,
                       cond: Mapping[str, Any] | None = None, generator: torch.Generator | None = None,
                       callback: Callable[[dict], None] | None = None, progress: bool = False,
                       dtype: torch.dtype | None = None, sigma_min: float | None = None,
                       check_finite: bool = True) -> SampleResult:
    """One-step or multistep consistency sampling.

    ``x_T`` ``(B, ...)`` is the prior draw at ``grid[0]`` (e.g. ``sigma_max z``); ``grid`` ``(M,)`` strictly
    decreasing levels ``[T, tau_1, ..., tau_{M-1}]`` (:func:`consistency_grid`). ``x = f(x_T, T)``, then for each
    ``tau``: ``x = f(x + sqrt(tau^2 - sigma_min^2) z, tau)``. ``sigma_min`` defaults to the model's (a
    :class:`~atdiff.precond.ConsistencyModel`'s) or else the process's. Returns ``SampleResult(x, nfe=M)``.
    ``callback`` gets ``{i, t, s, x, x0, nfe}`` per step: ``t`` the level evaluated, ``s`` the next level (0 after
    the last), ``x0`` the consistency output, ``x`` the state handed to the next step (``x0`` after the last).
    ``check_finite`` raises ``FloatingPointError`` naming the step when the model returns NaN or infinity.
    """
    if not isinstance(process, VE):
        raise ValueError(f"process: consistency sampling runs on the VE / EDM path, got {type(process).__name__}")
    if sigma_min is None:
        sigma_min = float(getattr(unwrap(model), "sigma_min", process.sigma_min))
    levels = _check_levels(grid, process, sigma_min)
    # every sampler's checks of x_T, dtype and the model's dtype (the two-point grid [T, 0] is valid by construction)
    x, _ = prepare(x_T, process, torch.tensor([levels[0], process.t_min], dtype=torch.float64), dtype, model)
    steps = range(len(levels))
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="consistency", leave=False)
    nfe = 0
    for i in steps:
        tau = levels[i]
        if i > 0:
            x = x + (tau**2 - sigma_min**2) ** 0.5 * randn_like(x, generator)
        x0 = predict(model, x, time_like(tau, x), process, "x0", cond)
        nfe += 1
        if check_finite and not bool(torch.isfinite(x0).all()):
            raise nonfinite_error("consistency", i, tau)
        x = x0
        report(callback, i=i, t=tau, s=levels[i + 1] if i + 1 < len(levels) else 0.0, x=x, x0=x0, nfe=nfe)
    return SampleResult(x, nfe)

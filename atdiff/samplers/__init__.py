"""Samplers: pure functions ``sample_x(model, x_T, process, grid, **opts) -> SampleResult(x, nfe)``.

Every sampler takes an explicit decreasing grid of process times, ``generator`` (reproducible noise),
``callback`` (a dict per step), ``progress`` (a tqdm bar) and ``dtype`` (e.g. ``torch.float64``), counts
network evaluations, and leaves gradient tracking to the caller (no ``torch.no_grad()`` inside).
``sample(name, model, x_T, process, steps_or_grid, **opts)`` dispatches by name so a recipe can sweep
samplers; an int builds that sampler's default grid. :func:`sampler_help` lists the names.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor

from ..processes import Process, VPDiscrete
from .ancestral import sample_ddpm, step_variance
from .base import SampleResult
from .ddim import ddim_step, sample_ddim
from .dpm_solver import sample_dpm_solver
from .edm import sample_euler, sample_heun
from .grids import (
    check_grid,
    default_t_end,
    dpm_grid,
    edm_sigma,
    edm_time,
    karras_grid,
    karras_time_grid,
    respaced_grid,
    respacing_timesteps,
    uniform_grid,
)
from .iddpm import EpsilonScaling, RespacedModel, respace, sample_iddpm, sample_iddpm_es
from .ode import LikelihoodResult, ode_log_likelihood, sample_ode
from .sde import langevin_step, sample_pc, sample_sde


def _respaced_or_uniform(process: Process, steps: int) -> Tensor:
    """improved-diffusion's even respacing (``"N"``) on a discrete process, else a uniform grid."""
    if isinstance(process, VPDiscrete):
        return respaced_grid(process, steps)
    return uniform_grid(process, steps)


def _ddim_or_uniform(process: Process, steps: int) -> Tensor:
    """improved-diffusion's ``"ddimN"`` respacing (stride from t = 0, so it never starts at t = T, where the
    cosine schedule's ``abar_T ~ 2e-9`` would amplify the x0 prediction's error ~1000-fold) on a discrete process,
    else a uniform grid."""
    if isinstance(process, VPDiscrete):
        return respaced_grid(process, f"ddim{steps}")
    return uniform_grid(process, steps)


class SamplerSpec(NamedTuple):
    """A registered sampler: the function, its default grid ``grid(process, steps)``, a one-line summary."""

    fn: Callable[..., SampleResult]
    grid: Callable[..., Tensor]
    description: str


REGISTRY: dict[str, SamplerSpec] = {
    "ddpm": SamplerSpec(sample_ddpm, uniform_grid, "ancestral DDPM, posterior variance "
                        "(variance=small|large); NFE N"),
    "iddpm": SamplerSpec(sample_iddpm, _respaced_or_uniform, "ancestral, IDDPM learned-range variance, "
                         "respaced steps; NFE N"),
    "iddpm-es": SamplerSpec(sample_iddpm_es, _respaced_or_uniform, "IDDPM with epsilon scaling eps/1.017 "
                            "(es_lam, es_slope); NFE N"),
    "ddim": SamplerSpec(sample_ddim, _ddim_or_uniform, "DDIM, deterministic for eta=0, first order, 'ddimN' "
                        "respacing; NFE N"),
    "dpm-solver": SamplerSpec(partial(sample_dpm_solver, solver="dpmsolver", method="singlestep", order=3),
                              dpm_grid, "DPM-Solver-3 single-step, noise prediction, logSNR grid; NFE 3N"),
    "dpm-solver++": SamplerSpec(partial(sample_dpm_solver, solver="dpmsolver++", method="multistep", order=2),
                                dpm_grid, "DPM-Solver++(2M) multistep, data prediction, logSNR grid; NFE N"),
    "euler": SamplerSpec(sample_euler, karras_time_grid, "EDM Euler on the Karras grid (S_churn for "
                         "stochastic); NFE N"),
    "heun": SamplerSpec(sample_heun, karras_time_grid, "EDM Heun on the Karras grid, second order (S_churn "
                        "for stochastic); NFE 2N-1"),
    "ode": SamplerSpec(sample_ode, karras_time_grid, "probability-flow ODE by torchdiffeq (dopri5 "
                       "rtol=atol=1e-5, or method=rk4 on the grid); NFE adaptive"),
    "sde": SamplerSpec(sample_sde, uniform_grid, "reverse SDE, Euler-Maruyama; NFE N"),
    "pc": SamplerSpec(sample_pc, uniform_grid, "predictor-corrector: Euler-Maruyama + Langevin corrector "
                      "(snr=0.16); NFE 2N"),
}

#: name -> sampler function (the entries of :data:`REGISTRY`)
SAMPLERS: dict[str, Callable[..., SampleResult]] = {name: spec.fn for name, spec in REGISTRY.items()}


def describe_samplers() -> dict[str, str]:
    """``{name: one-line description}`` of every registered sampler."""
    return {name: spec.description for name, spec in REGISTRY.items()}


def sampler_help() -> str:
    """A help text for a ``--sampler`` flag: one ``name: description`` line per sampler."""
    width = max(len(name) for name in REGISTRY)
    return "\n".join(f"{name:<{width}}  {desc}" for name, desc in describe_samplers().items())


def default_grid(name: str, process: Process, steps: int, **grid_opts) -> Tensor:
    """The default grid of sampler ``name`` with ``steps`` steps (``grid_opts`` go to its grid builder)."""
    _check_name(name)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps: expected an integer >= 1, got {steps!r}")
    return REGISTRY[name].grid(process, int(steps), **grid_opts)


def _check_name(name: str) -> None:
    if name not in REGISTRY:
        raise ValueError(f"name: unknown sampler {name!r}; valid samplers: {', '.join(REGISTRY)}")


def sample(name: str, model: Callable, x_T: Tensor, process: Process, steps_or_grid: int | Tensor, *,
           grid_opts: dict | None = None, **opts) -> SampleResult:
    """Run the sampler called ``name`` (see :func:`sampler_help`).

    ``steps_or_grid``: an int ``N`` builds the sampler's default grid of ``N`` steps (options in
    ``grid_opts``, e.g. ``{"skip_type": "time-quadratic"}`` or ``{"rho": 7}``); a tensor is the grid itself.
    ``opts`` go to the sampler. Returns ``SampleResult(x, nfe)``.
    """
    _check_name(name)
    if isinstance(steps_or_grid, numbers.Integral):  # int, bool (rejected there), numpy integers
        grid = default_grid(name, process, steps_or_grid, **(grid_opts or {}))
    else:
        if grid_opts:
            raise ValueError("grid_opts: only used with an int number of steps, got an explicit grid")
        grid = torch.as_tensor(steps_or_grid)
    return REGISTRY[name].fn(model, x_T, process, grid, **opts)


__all__ = [
    "SAMPLERS", "REGISTRY", "SamplerSpec", "SampleResult", "sample", "default_grid", "describe_samplers",
    "sampler_help", "sample_ddpm", "sample_iddpm", "sample_iddpm_es", "sample_ddim", "ddim_step",
    "sample_dpm_solver", "sample_euler", "sample_heun", "sample_ode", "ode_log_likelihood",
    "LikelihoodResult",
    "sample_sde", "sample_pc", "langevin_step", "step_variance", "respace", "RespacedModel", "EpsilonScaling",
    "check_grid", "karras_grid", "karras_time_grid", "dpm_grid", "default_t_end", "edm_sigma", "edm_time",
    "respaced_grid", "respacing_timesteps", "uniform_grid",
]

"""Samplers: pure functions ``sample_x(model, x_T, process, grid, **opts) -> SampleResult(x, nfe)``.

Every sampler takes an explicit decreasing grid of process times, ``cond`` (the conditioning dict handed to
the model as ``model(x, t, **cond)``), ``generator`` (reproducible noise), ``callback`` (one dict per step with
the keys :data:`CALLBACK_KEYS`), ``progress`` (a tqdm bar), ``dtype`` (float32 or float64) and ``check_finite``
(raise ``FloatingPointError`` naming the step and time of the first non-finite model output; one host sync per
step), counts network evaluations, and leaves gradient tracking to the caller (no ``torch.no_grad()`` inside).
``sample(name, model, x_T, process, steps_or_grid, **opts)`` dispatches by name so a recipe can sweep
samplers; an int builds that sampler's default grid, ``nfe=N`` the grid (and options) that spend exactly ``N``
network evaluations (:func:`steps_for_nfe`). :func:`sampler_help` lists the names. The registry
(:data:`REGISTRY`) is data: a new sampler registers its function, default grid, description and NFE rule.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..processes import Process, VPDiscrete
from ..validate import check_int
from .ancestral import sample_ddpm, step_variance
from .base import CALLBACK_KEYS, SampleResult
from .consistency import consistency_grid, sample_consistency
from .ddim import ddim_step, sample_ddim
from .dpm_solver import sample_dpm_solver, singlestep_orders_for_nfe
from .edm import sample_euler, sample_heun
from .grids import (
    MAX_STEPS,
    check_grid,
    check_steps,
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


def _check_discrete_steps(process: Process, steps: int) -> None:
    if isinstance(process, VPDiscrete) and steps > process.T:
        raise ValueError(f"steps: a respacing of a process with T = {process.T} steps keeps at most {process.T}, "
                         f"got {steps}")


def _respaced_or_uniform(process: Process, steps: int) -> Tensor:
    """improved-diffusion's even respacing (``"N"``) on a discrete process, else a uniform grid."""
    if isinstance(process, VPDiscrete):
        _check_discrete_steps(process, steps)
        return respaced_grid(process, steps)
    return uniform_grid(process, steps)


def _ddim_or_uniform(process: Process, steps: int) -> Tensor:
    """improved-diffusion's ``"ddimN"`` respacing (stride from t = 0, so it never starts at t = T, where the
    cosine schedule's ``abar_T ~ 2e-9`` would amplify the x0 prediction's error ~1000-fold) on a discrete process,
    else a uniform grid."""
    if isinstance(process, VPDiscrete):
        _check_discrete_steps(process, steps)
        try:
            return respaced_grid(process, f"ddim{steps}")
        except ValueError as err:
            raise ValueError(f"steps: improved-diffusion's 'ddim{steps}' respacing needs an integer stride giving "
                             f"exactly {steps} of {process.T} steps ({err}); pass an explicit grid, e.g. "
                             f"respaced_grid(process, '{steps}')") from None
    return uniform_grid(process, steps)


class NfePlan(NamedTuple):
    """How to spend an exact number of network evaluations: the number of ``steps`` of the sampler's default
    grid and the sampler options that go with it (e.g. DPM-Solver's per-step ``orders``; usually empty)."""

    steps: int
    opts: dict


def one_per_step(nfe: int, opts: Mapping[str, Any]) -> NfePlan:
    """NFE rule of a sampler with one network evaluation per step: ``N = nfe`` steps."""
    return NfePlan(nfe, {})


def _heun_plan(nfe: int, opts: Mapping[str, Any]) -> NfePlan:
    """Heun: ``2N - 1`` evaluations on ``N`` steps (the last step, into ``sigma = 0``, is an Euler step)."""
    if nfe % 2 == 0:
        raise ValueError(f"nfe: heun spends 2N - 1 evaluations on N steps (two per step, one on the last step "
                         f"into sigma = 0), so only odd NFE are attainable; got {nfe}, use {nfe - 1} or {nfe + 1}")
    return NfePlan((nfe + 1) // 2, {})


def _corrector_plan(default_correctors: int) -> Callable[[int, Mapping[str, Any]], NfePlan]:
    """SDE / predictor-corrector: ``N (1 + M)`` evaluations for ``M = corrector_steps`` per step."""

    def plan(nfe: int, opts: Mapping[str, Any]) -> NfePlan:
        per = 1 + check_int(opts.get("corrector_steps", default_correctors), "corrector_steps", 0)
        if nfe % per:
            raise ValueError(f"nfe: this sampler spends {per} evaluations per step (1 predictor + "
                             f"{per - 1} corrector), so nfe must be a multiple of {per}; got {nfe}")
        return NfePlan(nfe // per, {})

    return plan


def _dpm_plan(nfe: int, opts: Mapping[str, Any]) -> NfePlan:
    """DPM-Solver: multistep spends one evaluation per step; single-step takes DPM-Solver-fast's orders
    (:func:`~atdiff.samplers.dpm_solver.singlestep_orders_for_nfe`), so any NFE is attainable."""
    if opts.get("method", "multistep") == "multistep":
        return NfePlan(nfe, {})
    orders = singlestep_orders_for_nfe(nfe, opts.get("order", 2))
    return NfePlan(len(orders), {"orders": orders})


def _ode_plan(nfe: int, opts: Mapping[str, Any]) -> NfePlan:
    method = opts.get("method", "dopri5")
    raise ValueError(f"nfe: the ode sampler (method={method!r}) cannot be run at a set NFE: torchdiffeq chooses "
                     f"its steps adaptively (dopri5) or spends a method-dependent number of evaluations per "
                     f"interval; give it a grid (steps_or_grid) and read SampleResult.nfe")


class SamplerSpec(NamedTuple):
    """A registered sampler: the function, its default grid ``grid(process, steps)``, a one-line summary, and
    its NFE rule ``plan(nfe, opts) -> NfePlan`` (``opts``: the sampler options in effect; the rule raises
    ``ValueError`` naming ``nfe`` for an unattainable budget), and whether it takes ``clip_x0`` (it clamps a
    data prediction; improved-diffusion's ``clip_denoised`` for images in ``[-1, 1]``)."""

    fn: Callable[..., SampleResult]
    grid: Callable[..., Tensor]
    description: str
    plan: Callable[[int, Mapping[str, Any]], NfePlan] = one_per_step
    clips: bool = False


REGISTRY: dict[str, SamplerSpec] = {
    "ddpm": SamplerSpec(sample_ddpm, uniform_grid, "ancestral DDPM, posterior variance "
                        "(variance=small|large); NFE N", clips=True),
    "iddpm": SamplerSpec(sample_iddpm, _respaced_or_uniform, "ancestral, IDDPM learned-range variance, "
                         "respaced steps; NFE N", clips=True),
    "iddpm-es": SamplerSpec(sample_iddpm_es, _respaced_or_uniform, "IDDPM with epsilon scaling eps/1.017 "
                            "(es_lam, es_slope); NFE N", clips=True),
    "ddim": SamplerSpec(sample_ddim, _ddim_or_uniform, "DDIM, deterministic for eta=0, first order, 'ddimN' "
                        "respacing; NFE N", clips=True),
    "dpm-solver": SamplerSpec(partial(sample_dpm_solver, solver="dpmsolver", method="singlestep", order=3),
                              dpm_grid, "DPM-Solver-3 single-step, noise prediction, logSNR grid; NFE 3N "
                              "(nfe=: DPM-Solver-fast orders, any NFE)", _dpm_plan),
    "dpm-solver++": SamplerSpec(partial(sample_dpm_solver, solver="dpmsolver++", method="multistep", order=2),
                                dpm_grid, "DPM-Solver++(2M) multistep, data prediction, logSNR grid; NFE N",
                                _dpm_plan, clips=True),
    "euler": SamplerSpec(sample_euler, karras_time_grid, "EDM Euler on the Karras grid (S_churn for "
                         "stochastic); NFE N"),
    "heun": SamplerSpec(sample_heun, karras_time_grid, "EDM Heun on the Karras grid, second order (S_churn "
                        "for stochastic); NFE 2N-1 (odd)", _heun_plan),
    "ode": SamplerSpec(sample_ode, karras_time_grid, "probability-flow ODE by torchdiffeq (dopri5 "
                       "rtol=atol=1e-5, or method=rk4 on the grid); NFE adaptive", _ode_plan),
    "sde": SamplerSpec(sample_sde, uniform_grid, "reverse SDE, Euler-Maruyama; NFE N (1 + corrector_steps)",
                       _corrector_plan(0)),
    "pc": SamplerSpec(sample_pc, uniform_grid, "predictor-corrector: Euler-Maruyama + Langevin corrector "
                      "(snr=0.16); NFE 2N", _corrector_plan(1)),
    "consistency": SamplerSpec(sample_consistency, consistency_grid, "consistency model: one step, or multistep "
                               "re-noising to each level (Song et al. 2023; VE process); NFE N"),
}

#: the samplers of diffusion models (every entry but the consistency sampler, which needs a consistency function on
#: the VE path)
DIFFUSION_SAMPLERS: tuple[str, ...] = tuple(name for name in REGISTRY if name != "consistency")

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
    """The default grid of sampler ``name`` with ``steps`` steps (``grid_opts`` go to its grid builder).
    ``steps`` is an integer in ``[1, MAX_STEPS]`` (and at most ``T`` on a discrete process's integer grids),
    refused before anything is allocated."""
    _check_name(name)
    return REGISTRY[name].grid(process, check_steps(steps), **grid_opts)


def _check_name(name: str) -> None:
    if name not in REGISTRY:
        raise ValueError(f"name: unknown sampler {name!r}; valid samplers: {', '.join(REGISTRY)}")


def _effective_opts(name: str, opts: Mapping[str, Any]) -> dict:
    """The sampler options in effect: the registered function's bound keywords, overridden by ``opts``."""
    fn = REGISTRY[name].fn
    return {**(fn.keywords if isinstance(fn, partial) else {}), **opts}


def steps_for_nfe(name: str, nfe: int, **opts) -> NfePlan:
    """The number of steps of sampler ``name``'s default grid (and the options) that spend exactly ``nfe``
    network evaluations, under the sampler options ``opts`` (e.g. ``corrector_steps``, ``method``, ``order``).

    Rules: one evaluation per step for ddpm, iddpm, iddpm-es, ddim, euler, sde and multistep DPM-Solver;
    Heun ``2N - 1`` (odd NFE only); ``pc`` ``2N`` (``N (1 + corrector_steps)``); single-step DPM-Solver
    DPM-Solver-fast's orders (``K = nfe // 3 + 1`` steps for order 3, the last ones of lower order), so any NFE;
    the adaptive ``ode`` sampler is refused. Unattainable budgets raise ``ValueError`` naming ``nfe``.
    """
    _check_name(name)
    nfe = check_int(nfe, "nfe", 1)
    plan = REGISTRY[name].plan(nfe, _effective_opts(name, opts))
    check_steps(plan.steps, "nfe")
    return plan


#: grid options that change the number of evaluations the NFE rules count on
_NFE_GRID_CONFLICTS = ("denoise_to_zero", "append_zero")


def sample(name: str, model: Callable, x_T: Tensor, process: Process, steps_or_grid: int | Tensor | None = None,
           *, nfe: int | None = None, cond: Mapping[str, Any] | None = None, grid_opts: dict | None = None,
           **opts) -> SampleResult:
    """Run the sampler called ``name`` (see :func:`sampler_help`).

    ``steps_or_grid``: an int ``N`` builds the sampler's default grid of ``N`` steps (options in
    ``grid_opts``, e.g. ``{"skip_type": "time-quadratic"}`` or ``{"rho": 7}``); a tensor is the grid itself.
    Or ``nfe=N`` instead: the default grid and options that spend exactly ``N`` network evaluations
    (:func:`steps_for_nfe`). ``cond`` is the conditioning dict handed to the model (``model(x, t, **cond)``,
    e.g. ``{"y": labels}``); ``opts`` go to the sampler. Returns ``SampleResult(x, nfe)``.
    """
    _check_name(name)
    grid_opts = dict(grid_opts or {})
    if nfe is not None:
        if steps_or_grid is not None:
            raise ValueError("nfe: give either steps_or_grid or nfe, not both")
        conflicts = sorted(set(grid_opts) & set(_NFE_GRID_CONFLICTS))
        if conflicts:
            raise ValueError(f"grid_opts: {conflicts} change the number of steps the NFE rule counts on; "
                             f"not allowed with nfe")
        plan = steps_for_nfe(name, nfe, **opts)
        clash = sorted(set(plan.opts) & set(opts))
        if clash:
            raise ValueError(f"{clash[0]}: set by the NFE plan of {name!r}; not allowed with nfe")
        opts = {**opts, **plan.opts}
        grid = default_grid(name, process, plan.steps, **grid_opts)
    elif steps_or_grid is None:
        raise ValueError("steps_or_grid: expected a number of steps or a grid of times (or pass nfe=...)")
    elif isinstance(steps_or_grid, numbers.Integral):  # int, bool (rejected there), numpy integers
        grid = default_grid(name, process, steps_or_grid, **grid_opts)
    elif isinstance(steps_or_grid, Tensor | np.ndarray | list | tuple):
        if grid_opts:
            raise ValueError("grid_opts: only used with an int number of steps, got an explicit grid")
        grid = torch.as_tensor(steps_or_grid)
    else:
        raise ValueError(f"steps_or_grid: expected an int number of steps or a 1-D grid of times, got "
                         f"{steps_or_grid!r}")
    return REGISTRY[name].fn(model, x_T, process, grid, cond=cond, **opts)


__all__ = [
    "SAMPLERS", "REGISTRY", "DIFFUSION_SAMPLERS", "SamplerSpec", "SampleResult", "sample", "default_grid",
    "describe_samplers",
    "steps_for_nfe", "NfePlan", "one_per_step", "CALLBACK_KEYS", "MAX_STEPS", "check_steps",
    "sampler_help", "sample_ddpm", "sample_iddpm", "sample_iddpm_es", "sample_ddim", "ddim_step",
    "sample_dpm_solver", "sample_euler", "sample_heun", "sample_ode", "ode_log_likelihood",
    "LikelihoodResult",
    "sample_sde", "sample_pc", "sample_consistency", "consistency_grid",
    "langevin_step", "step_variance", "respace", "RespacedModel", "EpsilonScaling",
    "check_grid", "karras_grid", "karras_time_grid", "dpm_grid", "default_t_end", "edm_sigma", "edm_time",
    "respaced_grid", "respacing_timesteps", "uniform_grid",
]

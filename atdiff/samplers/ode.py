"""Black-box probability-flow ODE with torchdiffeq: sampling and log-likelihood.

The ODE is integrated in the EDM coordinates (see :mod:`atdiff.samplers.edm`): ``y = x / alpha(t)`` against
``sigma = sigma(t) / alpha(t)``, where it reads ``dy / dsigma = eps_hat(alpha y, t(sigma))`` for every
process.
The solve is differentiable (plain autograd through ``torchdiffeq.odeint``) and counts network evaluations.

For an ``x0``-predicting model the field ``(y - D(y)) / sigma`` cannot be evaluated at ``sigma = 0``; when the
grid ends there, :func:`sample_ode` integrates to the last grid time with ``sigma > 0`` (for a two-point grid,
:func:`~atdiff.samplers.grids.default_t_end`) and takes a final denoising step ``y <- D(y)``, the Euler step
into ``sigma = 0`` that the other samplers take. Models predicting ``eps``, ``v`` or ``score`` integrate all
the way (their field is finite at ``sigma = 0``).

Log-likelihood by the instantaneous change of variables: along the flow
``d log p_sigma(y) / dsigma = -div_y eps_hat``, so
``log p_{t_start}(x) = log N(y_T; 0, sigma_T^2 I) + int div_y eps_hat dsigma - D log alpha(t_start)``,
with the divergence exact (``D`` vector-Jacobian products, for small ``D``) or by Hutchinson's estimator.
The prior ``N(0, sigma_T^2 I)`` in ``y`` is ``N(0, sigma(t_max)^2 I)`` in ``x``, the usual approximation of
``q(x_T)`` (it ignores the signal left at ``t_max``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torchdiffeq import odeint
from tqdm.auto import tqdm

from ..param import predict, prediction_of
from ..processes import Process
from .base import SampleResult, check_choice, nonfinite_error, prepare, report, time_like
from .grids import check_grid, default_t_end, edm_sigma, edm_time

__all__ = ["sample_ode", "ode_log_likelihood", "LikelihoodResult", "TRACES", "FIXED_METHODS"]

TRACES = ("exact", "hutchinson")
#: torchdiffeq's fixed-grid methods: they step exactly on the given grid
FIXED_METHODS = ("euler", "midpoint", "rk4", "heun2", "heun3", "explicit_adams", "implicit_adams")


class LikelihoodResult(NamedTuple):
    """Per-sample log-likelihood ``(B,)`` in nats, the prior end point ``y_T`` ``(B, ...)`` and the NFE."""

    log_likelihood: Tensor
    y_T: Tensor
    nfe: int


def _check_tolerances(rtol: float, atol: float) -> None:
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol, atol: expected > 0, got {rtol}, {atol}")


class _Field:
    """``dy / dsigma = eps_hat(alpha y, t(sigma))``: counts evaluations, reports each one (``i`` is the
    evaluation's index, ``s`` None: an adaptive solver has no next time), checks each one for finiteness (one
    host sync per evaluation; the solver's step control synchronises at every step anyway)."""

    def __init__(self, model: Callable, process: Process, cond: Mapping[str, Any] | None,
                 callback: Callable[[dict], None] | None, bar: tqdm | None, sampler: str, check: bool) -> None:
        self.model, self.process, self.cond, self.callback, self.bar = model, process, cond, callback, bar
        self.sampler, self.check, self.nfe = sampler, check, 0

    def __call__(self, sigma: Tensor, y: Tensor) -> Tensor:
        sig = sigma.detach().double().cpu()
        t = edm_time(self.process, sig)
        alpha = self.process.alpha(t).item()
        eps = predict(self.model, alpha * y, time_like(t, y), self.process, "eps", cond=self.cond)
        self.nfe += 1
        if self.check and not bool(torch.isfinite(eps).all()):
            raise nonfinite_error(self.sampler, self.nfe - 1, t.item(), "the ODE field (the model output) has")
        if self.bar is not None:
            self.bar.update(1)
        if self.callback is not None:
            x0 = alpha * (y - sig.item() * eps)
            report(self.callback, i=self.nfe - 1, t=t.item(), s=None, x=alpha * y, x0=x0, nfe=self.nfe)
        return eps


def _solve(func: Callable, y0, sigmas: Tensor, method: str, rtol: float, atol: float, options: dict | None):
    """``odeint`` over ``sigmas``: every point for fixed-grid methods; for adaptive ones the two end points,
    with a forced step onto the end (torchdiffeq otherwise steps past it and interpolates back, evaluating the
    model beyond ``sigma = 0``)."""
    if method in FIXED_METHODS:
        return odeint(func, y0, sigmas, rtol=rtol, atol=atol, method=method, options=options)
    options = {"step_t": sigmas[-1:], **(options or {})}
    return odeint(func, y0, sigmas[[0, -1]], rtol=rtol, atol=atol, method=method, options=options)


def _ode_grid(grid: Tensor, process: Process, native: str) -> tuple[Tensor, bool]:
    """The times the ODE is integrated over and whether a final denoising step to ``grid[-1]`` follows (an
    ``x0``-model on a grid ending at ``sigma = 0``; see the module docstring)."""
    if native != "x0" or edm_sigma(process, grid[-1]).item() > 0:
        return grid, False
    if len(grid) > 2:
        return grid[:-1], True
    t_end = default_t_end(process)
    if not grid[-1] < t_end < grid[0]:
        raise ValueError(f"grid: an x0-predicting model needs a grid ending above sigma = 0 or starting above "
                         f"t = {t_end}, got {grid.tolist()}")
    return torch.tensor([grid[0].item(), t_end], dtype=torch.float64), True


def sample_ode(model: Callable, x_T: Tensor, process: Process, grid: Tensor, *, method: str = "dopri5",
               rtol: float = 1e-5, atol: float = 1e-5, options: dict | None = None,
               cond: Mapping[str, Any] | None = None, generator: torch.Generator | None = None,
               callback: Callable[[dict], None] | None = None, progress: bool = False,
               dtype: torch.dtype | None = None, check_finite: bool = True) -> SampleResult:
    """Solve the probability-flow ODE from ``grid[0]`` to ``grid[-1]`` with ``torchdiffeq.odeint``.

    Adaptive methods (``dopri5``, default tolerances 1e-5: looser ones distort mixture weights) use only the
    end points of ``grid``; fixed-grid methods (``rk4``, ...) step on every grid point. An ``x0``-model ends
    with a denoising step (module docstring). ``callback`` is called at every network evaluation with the dict
    of :data:`~atdiff.samplers.base.CALLBACK_KEYS` (``i`` the evaluation index, ``s`` None); ``progress`` shows
    a bar of evaluations. ``check_finite`` raises ``FloatingPointError`` at the first non-finite evaluation.
    ``cond`` is the conditioning dict handed to the model. ``generator`` is accepted for the common signature.

    Shapes: ``x_T`` ``(B, ...)``; ``grid`` ``(N + 1,)`` decreasing. Returns ``SampleResult(x, nfe)`` with the
    true number of network evaluations.
    """
    _check_tolerances(rtol, atol)
    x, grid = prepare(x_T, process, grid, dtype, model)
    solve_grid, denoise = _ode_grid(grid, process, prediction_of(model))
    sigmas = edm_sigma(process, solve_grid)
    alpha_0, alpha_1 = process.alpha(solve_grid[[0, -1]]).tolist()
    with tqdm(desc=f"ode-{method}", disable=not progress, leave=False) as bar:
        field = _Field(model, process, cond, callback, bar if progress else None, "sample_ode", check_finite)
        sigmas = sigmas.to(device=x.device, dtype=x.dtype)
        ys = _solve(field, x / alpha_0, sigmas, method, rtol, atol, options)
    x = alpha_1 * ys[-1]
    if denoise:  # the Euler step into sigma = 0: y <- D(y)
        t_stop = solve_grid[-1].item()
        x0 = predict(model, x, time_like(t_stop, x), process, "x0", cond=cond)
        field.nfe += 1
        if check_finite and not bool(torch.isfinite(x0).all()):
            raise nonfinite_error("sample_ode", field.nfe - 1, t_stop)
        x = process.alpha(grid[-1]).item() * x0
        report(callback, i=field.nfe - 1, t=t_stop, s=grid[-1].item(), x=x, x0=x0, nfe=field.nfe)
    return SampleResult(x, field.nfe)


def _divergence(f: Tensor, y: Tensor, probe: Tensor | None, create_graph: bool) -> Tensor:
    """``div_y f`` per sample ``(B,)``: exact (``probe=None``, one vector-Jacobian product per coordinate) or
    Hutchinson's ``probe^T (df/dy) probe``."""
    if probe is not None:
        (g,) = torch.autograd.grad(f, y, probe, create_graph=create_graph)
        return (g * probe).flatten(1).sum(1)
    flat = f.flatten(1)
    div = torch.zeros(flat.shape[0], dtype=f.dtype, device=f.device)
    for i in range(flat.shape[1]):
        (g,) = torch.autograd.grad(flat[:, i].sum(), y, retain_graph=True, create_graph=create_graph)
        div = div + g.flatten(1)[:, i]
    return div


def ode_log_likelihood(model: Callable, x: Tensor, process: Process, *, t_start: float | None = None,
                       method: str = "dopri5", rtol: float = 1e-5, atol: float = 1e-5,
                       options: dict | None = None, trace: str = "exact", probe: str = "rademacher",
                       cond: Mapping[str, Any] | None = None, generator: torch.Generator | None = None,
                       create_graph: bool = False, dtype: torch.dtype | None = None,
                       check_finite: bool = True) -> LikelihoodResult:
    """``log q_{t_start}(x)`` per sample by the probability-flow ODE from ``t_start`` (default ``t_min``) to
    ``t_max`` (see the module docstring), in nats.

    ``trace="exact"`` costs ``D = prod(x.shape[1:])`` backward passes per evaluation; ``"hutchinson"`` one,
    with one ``probe`` vector (``"rademacher"`` or ``"gaussian"``, from ``generator``) per sample held fixed
    over the solve (unbiased). ``create_graph=True`` keeps the divergence differentiable (for training
    through the likelihood). ``cond`` is the conditioning dict handed to the model; ``check_finite`` raises
    ``FloatingPointError`` at the first non-finite evaluation. An ``x0``-model needs ``sigma(t_start) > 0``.
    Shapes: ``x`` ``(B, ...)``; returns ``LikelihoodResult(log_likelihood (B,),
    y_T (B, ...), nfe)``.
    """
    _check_tolerances(rtol, atol)
    check_choice(trace, TRACES, "trace")
    check_choice(probe, ("rademacher", "gaussian"), "probe")
    ends = torch.tensor([process.t_max, process.t_min], dtype=torch.float64)
    x, _ = prepare(x, process, ends, dtype, model, "x")
    t0 = process.t_min if t_start is None else float(t_start)
    grid = check_grid(torch.tensor([process.t_max, t0], dtype=torch.float64), process, "t_start")
    if prediction_of(model) == "x0" and edm_sigma(process, grid[-1]).item() == 0:
        raise ValueError(f"t_start: an x0-predicting model's ODE field divides by sigma, which is 0 at t_start = "
                         f"{t0}; choose t_start with sigma(t_start) > 0, e.g. {default_t_end(process)}")
    sigmas = edm_sigma(process, grid.flip(0)).to(device=x.device, dtype=x.dtype)
    noise = None
    if trace == "hutchinson":
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if probe == "rademacher":
            noise = noise.sign()
    field = _Field(model, process, cond, None, None, "ode_log_likelihood", check_finite)

    def augmented(sigma: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            y = state[0] if state[0].requires_grad else state[0].detach().requires_grad_(True)
            f = field(sigma, y)
            div = _divergence(f, y, noise, create_graph)
        return (f if create_graph else f.detach()), div

    alpha_0 = process.alpha(grid[-1]).item()
    start = (x / alpha_0, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device))
    ys, integral = _solve(augmented, start, sigmas, method, rtol, atol, options)
    y_T, sigma_T = ys[-1], sigmas[-1]
    d = x[0].numel()
    log_norm = d * (sigma_T.log() + 0.5 * math.log(2 * math.pi))
    log_prior = -0.5 * (y_T.flatten(1) ** 2).sum(1) / sigma_T**2 - log_norm
    return LikelihoodResult(log_prior + integral[-1] - d * math.log(alpha_0), y_T, field.nfe)

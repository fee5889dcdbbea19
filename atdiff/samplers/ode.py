"""Black-box probability-flow ODE with torchdiffeq: sampling and log-likelihood.

The ODE is integrated in the EDM coordinates (see :mod:`atdiff.samplers.edm`): ``y = x / alpha(t)`` against
``sigma = sigma(t) / alpha(t)``, where it reads ``dy / dsigma = eps_hat(alpha y, t(sigma))`` for every
process.
The solve is differentiable (plain autograd through ``torchdiffeq.odeint``) and counts network evaluations.

Log-likelihood by the instantaneous change of variables: along the flow
``d log p_sigma(y) / dsigma = -div_y eps_hat``, so
``log p_{t_start}(x) = log N(y_T; 0, sigma_T^2 I) + int div_y eps_hat dsigma - D log alpha(t_start)``,
with the divergence exact (``D`` vector-Jacobian products, for small ``D``) or by Hutchinson's estimator.
The prior ``N(0, sigma_T^2 I)`` in ``y`` is ``N(0, sigma(t_max)^2 I)`` in ``x``, the usual approximation of
``q(x_T)`` (it ignores the signal left at ``t_max``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from torchdiffeq import odeint
from tqdm.auto import tqdm

from ..param import predict
from ..processes import Process, check_finite
from .base import SampleResult, check_choice, prepare, report, time_like
from .grids import check_grid, edm_sigma, edm_time

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
    """``dy / dsigma = eps_hat(alpha y, t(sigma))``: counts evaluations, reports each one."""

    def __init__(self, model: Callable, process: Process, callback: Callable[[dict], None] | None,
                 bar: tqdm | None) -> None:
        self.model, self.process, self.callback, self.bar, self.nfe = model, process, callback, bar, 0

    def __call__(self, sigma: Tensor, y: Tensor) -> Tensor:
        t = edm_time(self.process, sigma.detach().double().cpu())
        alpha = self.process.alpha(t).item()
        eps = predict(self.model, alpha * y, time_like(t, y), self.process, "eps")
        self.nfe += 1
        if self.bar is not None:
            self.bar.update(1)
        report(self.callback, nfe=self.nfe, t=t, sigma=sigma.detach(), x=alpha * y, eps=eps)
        return eps


def _solve(func: Callable, y0, sigmas: Tensor, method: str, rtol: float, atol: float, options: dict | None):
    """``odeint`` over ``sigmas``: every point for fixed-grid methods; for adaptive ones the two end points,
    with a forced step onto the end (torchdiffeq otherwise steps past it and interpolates back, evaluating the
    model beyond ``sigma = 0``)."""
    if method in FIXED_METHODS:
        return odeint(func, y0, sigmas, rtol=rtol, atol=atol, method=method, options=options)
    options = {"step_t": sigmas[-1:], **(options or {})}
    return odeint(func, y0, sigmas[[0, -1]], rtol=rtol, atol=atol, method=method, options=options)


def sample_ode(model: Callable, x_T: Tensor, process: Process, grid: Tensor, *, method: str = "dopri5",
               rtol: float = 1e-5, atol: float = 1e-5, options: dict | None = None,
               generator: torch.Generator | None = None, callback: Callable[[dict], None] | None = None,
               progress: bool = False, dtype: torch.dtype | None = None) -> SampleResult:
    """Solve the probability-flow ODE from ``grid[0]`` to ``grid[-1]`` with ``torchdiffeq.odeint``.

    Adaptive methods (``dopri5``, default tolerances 1e-5: looser ones distort mixture weights, see
    machine-notes) use only the end points of ``grid``; fixed-grid methods (``rk4``, ...) step on every grid
    point. ``callback`` is called at every network evaluation with ``{nfe, t, sigma, x, eps}``; ``progress``
    shows a bar of evaluations. ``generator`` is accepted for the common signature.

    Shapes: ``x_T`` ``(B, ...)``; ``grid`` ``(N + 1,)`` decreasing. Returns ``SampleResult(x, nfe)`` with the
    true number of network evaluations.
    """
    _check_tolerances(rtol, atol)
    x, grid = prepare(x_T, process, grid, dtype)
    sigmas = edm_sigma(process, grid)
    alpha_0, alpha_1 = process.alpha(grid[[0, -1]]).tolist()
    with tqdm(desc=f"ode-{method}", disable=not progress, leave=False) as bar:
        field = _Field(model, process, callback, bar if progress else None)
        sigmas = sigmas.to(device=x.device, dtype=x.dtype)
        ys = _solve(field, x / alpha_0, sigmas, method, rtol, atol, options)
    return SampleResult(alpha_1 * ys[-1], field.nfe)


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
                       generator: torch.Generator | None = None, create_graph: bool = False,
                       dtype: torch.dtype | None = None) -> LikelihoodResult:
    """``log q_{t_start}(x)`` per sample by the probability-flow ODE from ``t_start`` (default ``t_min``) to
    ``t_max`` (see the module docstring), in nats.

    ``trace="exact"`` costs ``D = prod(x.shape[1:])`` backward passes per evaluation; ``"hutchinson"`` one,
    with one ``probe`` vector (``"rademacher"`` or ``"gaussian"``, from ``generator``) per sample held fixed
    over the solve (unbiased). ``create_graph=True`` keeps the divergence differentiable (for training
    through the likelihood). Shapes: ``x`` ``(B, ...)``; returns ``LikelihoodResult(log_likelihood (B,),
    y_T (B, ...), nfe)``.
    """
    _check_tolerances(rtol, atol)
    check_choice(trace, TRACES, "trace")
    check_choice(probe, ("rademacher", "gaussian"), "probe")
    check_finite(x, "x")
    if dtype is not None:
        x = x.to(dtype)
    t0 = process.t_min if t_start is None else float(t_start)
    grid = check_grid(torch.tensor([process.t_max, t0], dtype=torch.float64), process, "t_start")
    sigmas = edm_sigma(process, grid.flip(0)).to(device=x.device, dtype=x.dtype)
    noise = None
    if trace == "hutchinson":
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if probe == "rademacher":
            noise = noise.sign()
    field = _Field(model, process, None, None)

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

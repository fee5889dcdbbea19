"""DPM-Solver (Lu et al. 2022) and DPM-Solver++ (Lu et al. 2023): exponential integrators of the probability
flow ODE in ``lambda = log_snr / 2``, orders 1-3, single-step and multistep, for any process.

With the noise prediction ``eps`` (``solver="dpmsolver"``) and ``h = lambda_s - lambda_t > 0``::

    x_s = (alpha_s / alpha_t) x_t - sigma_s [phi_1 m0 + phi_2 D1 + phi_3 D2],
    phi_1 = expm1(h), phi_2 = phi_1 / h - 1, phi_3 = phi_2 / h - 1/2

and with the data prediction ``x0`` (``solver="dpmsolver++"``)::

    x_s = (sigma_s / sigma_t) x_t - alpha_s [phi_1 m0 - phi_2 D1 + phi_3 D2],
    phi_1 = expm1(-h), phi_2 = phi_1 / h + 1, phi_3 = phi_2 / h - 1/2

where ``m0`` is the prediction at ``t`` and ``D1 ~ h m'``, ``D2 ~ h^2 m''`` (derivatives in ``lambda``) are
divided differences from earlier grid points (multistep) or from intermediate points ``t(lambda_t + r h)``
(single-step, ``r = 1/2`` for order 2, ``r = 1/3, 2/3`` for order 3). These are the Taylor coefficients of the
exponential integrator, so order ``k`` has local error ``O(h^(k+1))``. The first-order update is DDIM. A step
to a time with ``sigma = 0`` (``lambda = inf``) is always first order, in DDIM's finite form.

Deviation from the reference code: the multistep third-order update of DPM-Solver's repository (and of
diffusers) pairs ``phi_3`` with ``(D1_0 - D1_1) / (r0 + r1) ~ h^2 m'' / 2``, half the Taylor term, which makes
it second order (measured: slope 2.1-2.3 against the exact flow of Gaussian data). Here ``D2`` carries the
factor 2 and the measured order is 3.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..param import convert
from ..processes import Process
from .base import (
    GridModel,
    SampleResult,
    check_choice,
    check_clip,
    check_order,
    grid_table,
    prepare,
    report,
    step_pairs,
    time_like,
)

__all__ = ["sample_dpm_solver", "SOLVERS", "METHODS", "dpm_update", "multistep_terms", "step_orders",
           "singlestep_orders_for_nfe"]

SOLVERS = ("dpmsolver", "dpmsolver++")
METHODS = ("multistep", "singlestep")

#: steps below which ``lower_order_final`` lowers the order of the last steps (DPM-Solver's rule)
LOWER_ORDER_FINAL_BELOW = 10


class _Point:
    """``alpha``, ``sigma``, ``lam`` (floats) at one time ``t``."""

    __slots__ = ("t", "alpha", "sigma", "lam")

    def __init__(self, t: float, alpha: float, sigma: float, lam: float) -> None:
        self.t, self.alpha, self.sigma, self.lam = t, alpha, sigma, lam


def _point_at_lambda(process: Process, lam: float) -> _Point:
    """The time with ``log_snr / 2 = lam`` and its coefficients (for single-step intermediate points)."""
    t = process.t_from_log_snr(torch.tensor(2 * lam, dtype=torch.float64))
    return _Point(t.item(), process.alpha(t).item(), process.sigma(t).item(), lam)


def dpm_update(x: Tensor, terms: Sequence[Tensor], a: _Point, b: _Point, data_pred: bool) -> Tensor:
    """The exponential-integrator update from ``a`` to ``b`` with ``terms = [m0, D1, D2][:order]``.

    The ``m0`` coefficient is written in DDIM's finite form (``sigma_s phi_1 = alpha_s sigma_t / alpha_t -
    sigma_s`` and ``alpha_s phi_1 = sigma_s alpha_t / sigma_t - alpha_s``), valid at ``sigma_b = 0``; higher
    terms need a finite ``h``. Shapes: ``x`` and every term ``(B, ...)``.
    """
    if data_pred:
        out = (b.sigma / a.sigma) * x - (b.sigma * a.alpha / a.sigma - b.alpha) * terms[0]
    else:
        out = (b.alpha / a.alpha) * x - (b.alpha * a.sigma / a.alpha - b.sigma) * terms[0]
    if len(terms) == 1:
        return out
    h = b.lam - a.lam
    if data_pred:
        phi_2 = math.expm1(-h) / h + 1
        out = out + (b.alpha * phi_2) * terms[1]
    else:
        phi_2 = math.expm1(h) / h - 1
        out = out - (b.sigma * phi_2) * terms[1]
    if len(terms) == 2:
        return out
    phi_3 = phi_2 / h - 0.5
    return out - ((b.alpha if data_pred else b.sigma) * phi_3) * terms[2]


def multistep_terms(history: Sequence[tuple[float, Tensor]], lam_next: float, order: int) -> list[Tensor]:
    """``[m0, D1, D2][:order]`` from the last ``order`` ``(lambda, prediction)`` pairs of ``history``
    (newest last), for a step to ``lam_next``."""
    lam_0, m0 = history[-1]
    if order == 1:
        return [m0]
    h = lam_next - lam_0
    lam_1, m1 = history[-2]
    r0 = (lam_0 - lam_1) / h
    d1_0 = (m0 - m1) / r0
    if order == 2:
        return [m0, d1_0]
    lam_2, m2 = history[-3]
    r1 = (lam_1 - lam_2) / h
    d1_1 = (m1 - m2) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = 2 * (d1_0 - d1_1) / (r0 + r1)  # ~ h^2 m''; the reference code omits the 2 (see the module docstring)
    return [m0, d1, d2]


def step_orders(n_steps: int, order: int, method: str, lower_order_final: bool, sigma_end: Sequence[float]
                ) -> list[int]:
    """The order of each of ``n_steps`` steps: multistep warm-up (step ``i`` has at most ``i + 1``
    predictions), lower order at the end for short runs (``lower_order_final`` and ``n_steps < 10``: at most the
    number of steps left), order 1 into ``sigma = 0`` (``sigma_end[i]``: sigma at the end of step ``i``)."""
    orders = []
    for i in range(n_steps):
        k = order
        if method == "multistep":
            k = min(k, i + 1)
        if lower_order_final and n_steps < LOWER_ORDER_FINAL_BELOW:
            k = min(k, n_steps - i)
        if sigma_end[i] == 0.0:
            k = 1
        orders.append(k)
    return orders


def singlestep_orders_for_nfe(nfe: int, order: int) -> list[int]:
    """DPM-Solver-fast's step orders for exactly ``nfe`` evaluations (Lu et al. 2022): with ``order = 3``,
    ``K = nfe // 3 + 1`` steps of order 3 except the last ones, ``[.., 2, 1]`` if ``nfe % 3 == 0``, ``[.., 1]``
    if ``nfe % 3 == 1``, ``[.., 2]`` if ``nfe % 3 == 2``; with ``order = 2``, steps of order 2 and a final order
    1 for odd ``nfe``; with ``order = 1``, ``nfe`` first-order steps. The orders sum to ``nfe``."""
    check_order(order)
    if order == 3:
        k = nfe // 3 + 1
        tail = {0: [2, 1], 1: [1], 2: [2]}[nfe % 3]
        return [3] * (k - len(tail)) + tail
    if order == 2:
        return [2] * (nfe // 2) + [1] * (nfe % 2)
    return [1] * nfe


def _check_orders(orders: Sequence[int], n_steps: int, method: str, sigma_end: Sequence[float]) -> list[int]:
    orders = list(orders)
    if len(orders) != n_steps:
        raise ValueError(f"orders: expected one order per step ({n_steps}), got {len(orders)}")
    for i, k in enumerate(orders):
        check_order(k)
        if method == "multistep" and k > i + 1:
            raise ValueError(f"orders: multistep step {i} has {i + 1} predictions, cannot be of order {k}")
        if sigma_end[i] == 0.0 and k != 1:
            raise ValueError(f"orders: step {i} ends at sigma = 0 and must be of order 1, got {k}")
    return orders


def sample_dpm_solver(model: Callable, x_T: Tensor, process: Process, grid: Tensor, *, order: int = 2,
                      solver: str = "dpmsolver++", method: str = "multistep", lower_order_final: bool = True,
                      orders: Sequence[int] | None = None, clip_x0: float | None = None,
                      cond: Mapping[str, Any] | None = None, generator: torch.Generator | None = None,
                      callback: Callable[[dict], None] | None = None, progress: bool = False,
                      dtype: torch.dtype | None = None, check_finite: bool = True) -> SampleResult:
    """DPM-Solver(++) of order 1-3 along ``grid`` (see the module docstring for the updates).

    ``method="multistep"`` uses one network evaluation per step (NFE = N) and the predictions at earlier grid
    points; its first ``order - 1`` steps have fewer predictions and take lower orders (DPM-Solver's
    warm-up). For ``order = 3`` the first-order first step adds ``O(h^2 m''(lambda_T))``, small because the
    prediction barely changes near the prior (measured global order 3).
    ``"singlestep"`` evaluates at ``order - 1`` intermediate times inside each step (NFE = sum of the step
    orders). ``lower_order_final`` lowers the order of the last steps when ``N < 10`` (DPM-Solver's rule
    for few steps). ``orders`` gives the order of every step explicitly instead (``order`` and
    ``lower_order_final`` are then unused), e.g. :func:`singlestep_orders_for_nfe` for an exact NFE budget.
    ``clip_x0`` (DPM-Solver++ only: a finite number > 0) clamps every data prediction to ``[-clip_x0, clip_x0]``
    before it enters an update, as improved-diffusion's ``clip_denoised`` does for images in ``[-1, 1]``: on the
    cosine schedule the first prediction near ``t = T`` divides the noise error by ``alpha_T ~ 4.5e-5``.
    ``generator`` is accepted for the common signature (the solver is deterministic). ``cond``, ``callback``,
    ``check_finite`` as in :func:`~atdiff.samplers.ancestral.sample_ddpm`.

    Shapes: ``x_T`` ``(B, ...)``; ``grid`` ``(N + 1,)`` decreasing. Returns ``SampleResult(x, nfe)``.
    """
    check_order(order)
    check_choice(solver, SOLVERS, "solver")
    check_choice(method, METHODS, "method")
    x, grid = prepare(x_T, process, grid, dtype, model)
    table = grid_table(process, grid)
    points = [_Point(*v) for v in zip(grid.tolist(), table.alpha, table.sigma, table.lam, strict=True)]
    data_pred = solver == "dpmsolver++"
    clip_x0 = check_clip(clip_x0)
    if clip_x0 is not None and not data_pred:
        raise ValueError("clip_x0: clipping applies to the data prediction of solver='dpmsolver++'; the noise "
                         f"prediction solver {solver!r} has none (use dpmsolver++ or leave clip_x0=None)")
    if orders is None:
        orders = step_orders(len(grid) - 1, order, method, lower_order_final, table.sigma[1:])
    else:
        orders = _check_orders(orders, len(grid) - 1, method, table.sigma[1:])
    evaluate = GridModel(model, process, grid, "x0" if data_pred else "eps", cond, sampler="sample_dpm_solver",
                         check=check_finite)
    history: list[tuple[float, Tensor]] = []
    for i, t, _ in step_pairs(grid, x, progress, f"{solver}-{method}"):
        a, b, k = points[i], points[i + 1], orders[i]
        m0 = _clip(evaluate.at(x, i)[0], clip_x0)
        history = (history + [(a.lam, m0)])[-3:]
        x_in = x
        if method == "multistep" or k == 1:
            x = dpm_update(x, multistep_terms(history, b.lam, k), a, b, data_pred)
        else:
            x = _singlestep(x, m0, a, b, k, data_pred, process,
                            lambda y, p: _clip(evaluate.off_grid(y, p.t), clip_x0))
        evaluate.check_step(i)
        if callback is not None:
            x0 = m0 if data_pred else convert(m0, x_in, time_like(t, x_in), process, "eps", "x0")
            report(callback, i=i, t=a.t, s=b.t, x=x, x0=x0, nfe=evaluate.nfe)
    return SampleResult(x, evaluate.nfe)


def _clip(m: Tensor, clip_x0: float | None) -> Tensor:
    return m if clip_x0 is None else m.clamp(-clip_x0, clip_x0)


def _singlestep(x: Tensor, m0: Tensor, a: _Point, b: _Point, order: int, data_pred: bool, process: Process,
                evaluate: Callable[[Tensor, _Point], Tensor]) -> Tensor:
    """One single-step DPM-Solver-2 (``r = 1/2``) or -3 (``r = 1/3, 2/3``) update from ``a`` to ``b``."""
    h = b.lam - a.lam
    if order == 2:
        r1 = 0.5
        p1 = _point_at_lambda(process, a.lam + r1 * h)
        m1 = evaluate(dpm_update(x, [m0], a, p1, data_pred), p1)
        return dpm_update(x, [m0, (m1 - m0) / r1], a, b, data_pred)
    r1, r2 = 1 / 3, 2 / 3
    p1 = _point_at_lambda(process, a.lam + r1 * h)
    p2 = _point_at_lambda(process, a.lam + r2 * h)
    m1 = evaluate(dpm_update(x, [m0], a, p1, data_pred), p1)
    m2 = evaluate(dpm_update(x, [m0, (r2 / r1) * (m1 - m0)], a, p2, data_pred), p2)
    return dpm_update(x, [m0, (m2 - m0) / r2], a, b, data_pred)

"""DDIM sampling (Song, Meng & Ermon 2021) on an explicit grid, for any process."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..param import convert
from ..processes import Process, expand_like
from ..validate import check_real
from .base import GridModel, SampleResult, check_clip, prepare, randn_like, report, step_pairs, tabulate_linear

__all__ = ["sample_ddim", "ddim_step"]


def ddim_step(x: Tensor, eps: Tensor, process: Process, t: Tensor, s: Tensor, *, eta: float = 0.0,
              noise: Tensor | None = None, clip_x0: float | None = None) -> tuple[Tensor, Tensor]:
    """One DDIM update ``t -> s`` from the eps-prediction ``eps`` at ``(x, t)``.

    ``x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps + c z`` with ``c^2 = eta^2 sigma_ts^2 sigma_s^2/sigma_t^2``
    (``eta = 1``: the DDPM posterior variance; ``eta = 0``: deterministic). Returns ``(x_s, x0_hat)``.
    """
    x0 = convert(eps, x, t, process, "eps", "x0")
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
        eps = convert(x0, x, t, process, "x0", "eps")
    a_s, sig_s, sig_t = process.alpha(s), process.sigma(s), process.sigma(t)
    a_ts, sig_ts = process.transition(s, t)
    c2 = eta**2 * sig_ts**2 * sig_s**2 / sig_t**2
    # sigma_s^2 - c^2 written without the cancellation that loses digits when eta ~ 1 and alpha_ts ~ 0
    keep = sig_s * ((1 - eta**2) * sig_t**2 + eta**2 * a_ts**2 * sig_s**2).clamp_min(0).sqrt() / sig_t
    x_s = expand_like(a_s, x) * x0 + expand_like(keep, x) * eps
    if eta:
        if noise is None:
            raise ValueError("noise: ddim_step with eta > 0 needs a noise tensor")
        x_s = x_s + expand_like(c2.sqrt(), x) * noise
    return x_s, x0


def sample_ddim(model: Callable, x_T: Tensor, process: Process, grid: Tensor, *, eta: float = 0.0,
                clip_x0: float | None = None, cond: Mapping[str, Any] | None = None,
                generator: torch.Generator | None = None, callback: Callable[[dict], None] | None = None,
                progress: bool = False, dtype: torch.dtype | None = None, check_finite: bool = True
                ) -> SampleResult:
    """DDIM: one :func:`ddim_step` per grid interval. ``eta = 0`` is the deterministic probability-flow
    discretisation, first order in the step size. Without ``clip_x0`` the step, linear in ``(x, eps, noise)``,
    is tabulated once for the whole grid (:func:`~atdiff.samplers.base.tabulate_linear` on :func:`ddim_step`).
    ``cond``, ``callback``, ``check_finite`` as in :func:`~atdiff.samplers.ancestral.sample_ddpm`.

    Shapes: ``x_T`` ``(B, ...)``; ``grid`` ``(N + 1,)`` decreasing. Returns ``SampleResult(x, nfe=N)``.
    """
    eta = check_real(eta, "eta", 0.0)
    clip_x0 = check_clip(clip_x0)
    x, grid = prepare(x_T, process, grid, dtype, model)
    evaluate = GridModel(model, process, grid, "eps", cond, sampler="sample_ddim", check=check_finite)
    times = evaluate.times
    t_vec, s_vec, n = grid[:-1], grid[1:], len(grid) - 1
    if clip_x0 is None:
        step = tabulate_linear(lambda y, e, *z: ddim_step(y, e, process, t_vec, s_vec, eta=eta,
                                                          noise=z[0] if z else None)[0], 3 if eta else 2, n)
        to_x0 = tabulate_linear(lambda y, e: ddim_step(y, e, process, t_vec, s_vec)[1], 2, n)
    for i, t, s in step_pairs(grid, x, progress, "ddim"):
        eps, _ = evaluate.at(x, i)
        noise = randn_like(x, generator) if eta else None
        if clip_x0 is not None:
            x, x0 = ddim_step(x, eps, process, t, s, eta=eta, noise=noise, clip_x0=clip_x0)
        else:
            x0 = (to_x0[0][i] * x + to_x0[1][i] * eps) if callback is not None else None
            x = step[0][i] * x + step[1][i] * eps
            if eta:
                x = x + step[2][i] * noise
        evaluate.check_step(i)
        report(callback, i=i, t=times[i], s=times[i + 1], x=x, x0=x0, nfe=evaluate.nfe)
    return SampleResult(x, evaluate.nfe)

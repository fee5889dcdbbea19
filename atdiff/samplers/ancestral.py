"""Ancestral (DDPM / IDDPM) sampling on an explicit grid."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..param import learned_range_log_variance, learned_variance_of
from ..processes import Process
from .base import GridModel, SampleResult, check_clip, prepare, randn_like, report, step_pairs, tabulate_linear

__all__ = ["sample_ddpm", "step_variance", "VARIANCES"]

VARIANCES = ("small", "large", "learned")


def step_variance(kind: str, beta: float | Tensor, beta_tilde: float | Tensor, v: Tensor | None = None
                  ) -> float | Tensor:
    """The variance of an ancestral step ``t -> s`` from its transition variance ``beta = sigma_ts^2`` and
    posterior variance ``beta_tilde = sigma_ts^2 sigma_s^2 / sigma_t^2`` (both from the process).

    ``"small"``: ``beta_tilde``; ``"large"``: ``beta``; ``"learned"``: IDDPM's
    ``exp(f log beta + (1 - f) log beta_tilde)``, ``f = (v + 1) / 2``
    (:func:`~atdiff.param.learned_range_log_variance`, ``v`` ``(B, ...)``). On a respaced grid ``beta`` and
    ``beta_tilde`` are those of the respaced process.
    """
    if kind == "small":
        return beta_tilde
    if kind == "large":
        return beta
    log = torch.log if isinstance(beta, Tensor) else math.log
    return learned_range_log_variance(v, log(beta), log(beta_tilde)).exp()


def sample_ddpm(model: Callable, x_T: Tensor, process: Process, grid: Tensor, *,
                variance: str = "small", clip_x0: float | None = None, cond: Mapping[str, Any] | None = None,
                generator: torch.Generator | None = None, callback: Callable[[dict], None] | None = None,
                progress: bool = False, dtype: torch.dtype | None = None, check_finite: bool = True
                ) -> SampleResult:
    """Ancestral sampling: ``x_s ~ N(mu_tilde(x_t, x0_hat), var)`` for each step ``t -> s`` of ``grid``.

    ``variance`` is ``"small"`` (``beta_tilde``), ``"large"`` (``beta``) or ``"learned"`` (the model's
    learned range, needs ``model.learned_variance``); see :func:`step_variance`. The last step adds no noise.
    ``clip_x0`` (a finite number > 0) clamps the predicted ``x0`` (e.g. 1.0 for images). The posterior mean and
    variance come from :meth:`Process.posterior`, evaluated once for the whole grid. ``cond`` is the
    conditioning dict handed to the model (``model(x, t, **cond)``, e.g. ``{"y": labels}``). ``callback``
    gets the dict of :data:`~atdiff.samplers.base.CALLBACK_KEYS` after each step; ``check_finite`` raises
    ``FloatingPointError`` at the first step whose model output is not finite (one host sync per step).

    Shapes: ``x_T`` ``(B, ...)``; ``grid`` ``(N + 1,)`` decreasing. Returns ``SampleResult(x, nfe=N)``.
    """
    if variance not in VARIANCES:
        raise ValueError(f"variance: expected one of {VARIANCES}, got {variance!r}")
    if variance == "learned" and not learned_variance_of(model):
        raise ValueError("variance: 'learned' needs a model with learned_variance = True")
    clip_x0 = check_clip(clip_x0)
    x, grid = prepare(x_T, process, grid, dtype, model)
    t_vec, s_vec = grid[:-1], grid[1:]
    c_xt, c_x0 = tabulate_linear(lambda xt, x0: process.posterior(xt, x0, t_vec, s_vec)[0], 2, len(t_vec))
    beta_tilde = process.posterior(t_vec, t_vec, t_vec, s_vec)[1].tolist()
    beta = (process.transition(s_vec, t_vec)[1] ** 2).tolist()
    evaluate = GridModel(model, process, grid, "x0", cond, sampler="sample_ddpm", check=check_finite)
    times = evaluate.times
    for i, _, _ in step_pairs(grid, x, progress, "ddpm"):
        x0, v = evaluate.at(x, i)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        mean = c_xt[i] * x + c_x0[i] * x0
        if i < len(grid) - 2:
            var = step_variance(variance, beta[i], beta_tilde[i], v)
            x = mean + (var.sqrt() if isinstance(var, Tensor) else math.sqrt(var)) * randn_like(x, generator)
        else:
            x = mean
        evaluate.check_step(i)
        report(callback, i=i, t=times[i], s=times[i + 1], x=x, x0=x0, nfe=evaluate.nfe)
    return SampleResult(x, evaluate.nfe)

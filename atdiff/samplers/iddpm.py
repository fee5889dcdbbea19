"""IDDPM (Nichol & Dhariwal 2021) sampling: respacing, learned-variance ancestral sampling, and epsilon
scaling (ES, Ning et al. 2024) as a model wrapper.

Respacing the improved-diffusion way rebuilds the betas on the kept timesteps
(``beta'_k = 1 - abar_{t_k} / abar_{t_{k-1}}``) and runs a process with ``K`` steps whose model sees the
original timestep (:class:`RespacedModel`). Ancestral sampling on the original process along the respaced
grid (:func:`~atdiff.samplers.grids.respaced_grid`) is the same computation: the step variances ``beta`` and
``beta_tilde`` of a grid step ``t -> s`` are the respaced process's ``beta'`` and ``beta_tilde'``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..param import learned_variance_of, predict_with_variance, prediction_of
from ..processes import Process, VPDiscrete, expand_like
from ..validate import check_real
from .ancestral import sample_ddpm
from .base import SampleResult
from .grids import respacing_timesteps

__all__ = ["respace", "RespacedModel", "sample_iddpm", "sample_iddpm_es", "EpsilonScaling"]


def respace(process: VPDiscrete, spec: str | int) -> tuple[VPDiscrete, list[int]]:
    """The respaced process of ``spec`` (see :func:`~atdiff.samplers.grids.respacing_timesteps`): a
    :class:`VPDiscrete` with ``K`` rebuilt betas whose ``abar_k`` equals the original ``abar`` at the ``k``-th
    kept timestep, and the kept timesteps (1-based, increasing, length ``K``)."""
    if not isinstance(process, VPDiscrete):
        raise ValueError(f"process: respacing needs a VPDiscrete process, got {process!r}")
    kept = respacing_timesteps(process.T, spec)
    log_abar = process.log_abar_table[[0, *kept]]
    betas = -torch.expm1(log_abar[1:] - log_abar[:-1])
    return VPDiscrete(betas=betas), kept


class RespacedModel(nn.Module):
    """Wrap a model of the original process for the respaced one: time ``k`` (0..K, non-integer times
    interpolate) becomes the original timestep ``kept[k - 1]`` (0 stays 0). Keeps the wrapped model's
    ``prediction`` and ``learned_variance`` (read through DDP / ``AveragedModel`` / ``torch.compile`` wrappers)
    and hands the conditioning keywords to it untouched."""

    def __init__(self, model: Callable, kept: Sequence[int]) -> None:
        super().__init__()
        self.model = model
        self.prediction = prediction_of(model)
        self.learned_variance = learned_variance_of(model)
        self.register_buffer("timestep_map", torch.tensor([0, *kept], dtype=torch.float64), persistent=False)

    def original_time(self, t: Tensor) -> Tensor:
        """The original timestep of respaced time ``t`` (shape of ``t``, float64)."""
        table = self.timestep_map.to(t.device)
        tc = t.double().clamp(0, len(table) - 1)
        lo = tc.floor().long().clamp(max=len(table) - 2)
        w = tc - lo
        return (1 - w) * table[lo] + w * table[lo + 1]

    def forward(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        return self.model(x, self.original_time(t).to(t.dtype), **cond)


def sample_iddpm(model: Callable, x_T: Tensor, process: Process, grid: Tensor, *, variance: str = "learned",
                 **opts) -> SampleResult:
    """IDDPM ancestral sampling: :func:`~atdiff.samplers.ancestral.sample_ddpm` with the learned-range
    variance of a ``learned_variance`` model (``variance="small"`` / ``"large"`` for a fixed one). Use the
    respaced grid of the original process (``respaced_grid(process, "50")``) or :func:`respace` with a
    :class:`RespacedModel`; both give the same samples. ``opts`` (``cond``, ``clip_x0``, ``callback``, ...) go
    to :func:`~atdiff.samplers.ancestral.sample_ddpm`. Returns ``SampleResult(x, nfe=N)``."""
    return sample_ddpm(model, x_T, process, grid, variance=variance, **opts)


def sample_iddpm_es(model: Callable, x_T: Tensor, process: Process, grid: Tensor, *, es_lam: float = 1.017,
                    es_slope: float = 0.0, **opts) -> SampleResult:
    """:func:`sample_iddpm` of ``model`` wrapped in :class:`EpsilonScaling` with ``lambda(t) = es_lam +
    es_slope t / t_max``."""
    return sample_iddpm(EpsilonScaling(model, process, es_lam, es_slope), x_T, process, grid, **opts)


class EpsilonScaling(nn.Module):
    """Epsilon scaling (ES): the wrapped model's noise prediction divided by ``lambda(t)`` before any sampler
    step, ``lambda(t) = lam + slope * t / t_max`` (constant for ``slope = 0``; the paper's ``lam = 1.017``).

    Declares ``prediction = "eps"`` and passes a learned variance through unchanged; the conditioning
    keywords go to the wrapped model untouched. For an eps-model with
    ``lam = 1, slope = 0`` every sampler gives exactly (bitwise) the samples of the unwrapped model.
    """

    def __init__(self, model: Callable, process: Process, lam: float = 1.017, slope: float = 0.0) -> None:
        super().__init__()
        lam, slope = check_real(lam, "lam"), check_real(slope, "slope")
        if not lam > 0 or not lam + slope > 0:
            raise ValueError(f"lam, slope: lambda(t) = lam + slope t / t_max must stay > 0, got {lam}, "
                             f"{slope}")
        self.model, self.process, self.lam, self.slope = model, process, float(lam), float(slope)
        self.prediction = "eps"
        self.learned_variance = learned_variance_of(model)

    def scale(self, t: Tensor) -> Tensor:
        """``lambda(t)``, shape of ``t``."""
        return self.lam + self.slope * (t / self.process.t_max)

    def forward(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        eps, v = predict_with_variance(self.model, x, t, self.process, "eps", cond=cond)
        eps = eps / expand_like(self.scale(t), eps)
        return eps if v is None else torch.cat([eps, v], dim=1)

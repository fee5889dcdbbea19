"""Problem builders shared by the chain claims (C1, C2, C3): random Gaussian data, perturbed linear models, the
affine steps of a named sampler, cached exact marginals and reverse transitions, and the posterior's law of total
variance (the model-side leg of C1 and C3)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor

from atdiff.processes import Process
from theory.claims.common import (
    F64,
)
from theory.gaussian import (
    Gaussian,
    marginal,
)
from theory.linear import (
    AffineEpsModel,
    AffineStep,
    bayes_coef,
    ddim_chain_steps,
    ddpm_chain_steps,
    gaussian_reverse_step,
    perturbed_coef,
)

RTOL = 1e-9  # float64 closed forms: a bound holds when slack >= -RTOL * (1 + |rhs|)


def random_gaussian(d: int, seed: int) -> Gaussian:
    """A random Gaussian data law in ``d`` dimensions: mean ``N(0, I)``, covariance ``G G^T / d + 0.1 I``."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=F64)
    return Gaussian(torch.randn(d, generator=g, dtype=F64), a @ a.T / d + 0.1 * torch.eye(d, dtype=F64))


def perturbed_model(data: Gaussian, process: Process, size: float, seed: int) -> AffineEpsModel:
    """A misspecified linear eps-model: ``eps*(x, t) + size (R x / sqrt(d) + r)`` with fixed Gaussian ``R``, ``r``
    (a time-independent eps error of relative size ``size``); ``size = 0`` is the Bayes ``eps*``."""
    g = torch.Generator().manual_seed(seed + 7919)
    d = data.dim
    dA = size * torch.randn(d, d, generator=g, dtype=F64) / math.sqrt(d)
    db = size * torch.randn(d, generator=g, dtype=F64)
    return AffineEpsModel(perturbed_coef(bayes_coef(data, process), dA=dA, db=db))


def model_steps(model: Callable, process: Process, grid: Tensor, dim: int, sampler: str) -> list[AffineStep]:
    """The affine steps of a sampler named ``ddpm-small``, ``ddpm-large``, ``ddpm-small+`` / ``ddpm-large+`` (the
    last step also adds its noise, as a density must), ``ddim`` or ``ddim-<eta>`` along ``grid``."""
    if sampler.startswith("ddpm-"):
        variance = sampler[5:].rstrip("+")
        return ddpm_chain_steps(model, process, grid, dim, variance=variance, final_noise=sampler.endswith("+"))
    if sampler == "ddim" or sampler.startswith("ddim-"):
        eta = float(sampler[5:]) if sampler.startswith("ddim-") else 0.0
        return ddim_chain_steps(model, process, grid, dim, eta=eta)
    raise ValueError(f"sampler: expected 'ddpm-small[+]', 'ddpm-large[+]', 'ddim' or 'ddim-<eta>', got {sampler!r}")


def _prior(d: int) -> tuple[Tensor, Tensor]:
    return torch.zeros(d, dtype=F64), torch.eye(d, dtype=F64)


@functools.lru_cache(maxsize=4096)
def _marginal_at(data: Gaussian, process: Process, t: float) -> Gaussian:
    return marginal(data, process, torch.tensor(t, dtype=F64))


@functools.lru_cache(maxsize=4096)
def _reverse_at(data: Gaussian, process: Process, t: float, s: float) -> AffineStep:
    return gaussian_reverse_step(data, process, torch.tensor(t, dtype=F64), torch.tensor(s, dtype=F64))


def _truth(data: Gaussian, process: Process, grid: Tensor) -> list[Gaussian]:
    """The exact marginals ``q(x_t)`` at the grid times (cached: the claims revisit the same grids)."""
    return [_marginal_at(data, process, float(t)) for t in grid]


def _true_reverse(data: Gaussian, process: Process, grid: Tensor) -> list[AffineStep]:
    """The exact reverse transitions ``q(x_{grid[n+1]} | x_{grid[n]})`` (cached)."""
    return [_reverse_at(data, process, float(t), float(s)) for t, s in zip(grid[:-1], grid[1:], strict=True)]




def posterior_total_variance_error(data: Gaussian, process: Process, grid: Tensor) -> float:
    """The model-side leg of C1 and C3: at every step ``t -> s`` of ``grid``, the covariance of the true reverse
    transition ``q(x_s | x_t)`` (joint-Gaussian conditioning, :func:`theory.linear.gaussian_reverse_step`) must equal
    the library's posterior variance plus the squared ``x0`` coefficient of its posterior mean times
    ``Cov(x0 | x_t)`` (the law of total variance). A wrong ``process.posterior`` breaks it although the bounds
    themselves hold for any model. Returns the largest error relative to the largest entry of the covariance."""
    worst = 0.0
    d = data.dim
    eye = torch.eye(d, dtype=F64)
    for t, s in zip(grid[:-1], grid[1:], strict=True):
        rev = _reverse_at(data, process, float(t), float(s))
        tt, ss = torch.tensor([float(t)], dtype=F64), torch.tensor([float(s)], dtype=F64)
        mean_x0, var = process.posterior(torch.zeros(1, d, dtype=F64), torch.ones(1, d, dtype=F64), tt, ss)
        c_x0, v = mean_x0.reshape(-1)[0], var.reshape(-1)[0]
        alpha, sigma = process.alpha(tt)[0], process.sigma(tt)[0]
        cov = data.cov
        cov_x0 = cov - alpha**2 * cov @ torch.linalg.solve(alpha**2 * cov + sigma**2 * eye, cov)
        expected = v * eye + c_x0**2 * cov_x0
        worst = max(worst, float((rev.Q - expected).abs().max() / rev.Q.abs().max().clamp_min(1e-300)))
    return worst

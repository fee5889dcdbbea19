"""Named toy data laws (2-D Gaussian mixtures and Gaussians) shared by the toy experiments."""

from __future__ import annotations

import math

import torch

from theory.gaussian import Gaussian, GaussianMixture

__all__ = ["MIXTURES", "make_mixture", "moment_matched_gaussian"]


def _ring(k: int, radius: float, std: float) -> GaussianMixture:
    angles = torch.arange(k, dtype=torch.float64) * 2 * math.pi / k
    means = radius * torch.stack([angles.cos(), angles.sin()], 1)
    return GaussianMixture(torch.full((k,), 1.0 / k, dtype=torch.float64), means,
                           std**2 * torch.eye(2, dtype=torch.float64).expand(k, 2, 2))


def _unbalanced() -> GaussianMixture:
    means = torch.tensor([[-1.5, -1.0], [1.5, -1.0], [0.0, 1.6]], dtype=torch.float64)
    covs = torch.tensor([[[0.10, 0.04], [0.04, 0.05]], [[0.05, 0.0], [0.0, 0.12]], [[0.08, -0.03], [-0.03, 0.06]]],
                        dtype=torch.float64)
    return GaussianMixture(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), means, covs)


MIXTURES = {
    "ring8": lambda: _ring(8, 2.0, 0.15),
    "unbalanced3": _unbalanced,
}


def make_mixture(name: str) -> GaussianMixture:
    """A named mixture: ``ring8`` (8 equal modes of std 0.15 on a circle of radius 2) or ``unbalanced3``
    (3 anisotropic modes, weights 0.5 / 0.3 / 0.2)."""
    if name not in MIXTURES:
        raise ValueError(f"name: unknown mixture {name!r}; expected one of {sorted(MIXTURES)}")
    return MIXTURES[name]()


def moment_matched_gaussian(mix: GaussianMixture) -> Gaussian:
    """The Gaussian with the mixture's mean and covariance (the best a unimodal model can do)."""
    w = mix.weights
    mean = (w[:, None] * mix.means).sum(0)
    diff = mix.means - mean
    cov = (w[:, None, None] * (mix.covs + diff[:, :, None] * diff[:, None, :])).sum(0)
    return Gaussian(mean, cov)

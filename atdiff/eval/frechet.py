"""Frechet distance between feature sets: the squared 2-Wasserstein distance between their fitted Gaussians.

``FD = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1^{1/2} S_2 S_1^{1/2})^{1/2})`` (Heusel et al. 2017; FID when the
features are the Inception pool features).

Matrix square root. Only ``tr (S_1 S_2)^{1/2}`` is needed, i.e. the sum of the square roots of the eigenvalues
of ``S_1 S_2``. With the Cholesky factor ``S_1 = L L^T``, ``L^T S_2 L = L^{-1} (S_1 S_2) L`` is similar to ``S_1 S_2``
and symmetric positive semi-definite, so one Cholesky and one symmetric eigenvalue solve (``eigvalsh``, no
eigenvectors) give the trace; if ``S_1`` is singular (fewer samples than dimensions) the symmetric square root
``S_1^{1/2}`` from ``eigh`` replaces ``L``. Eigenvalues below the round-off level ``d * eps * max|eigenvalue|``
(including negative ones) are set to zero, so the square root does not amplify round-off (``sqrt(1e-14) = 1e-7``
per null direction). This is preferred to ``scipy.linalg.sqrtm(S_1 @ S_2)`` (the form ADM and pytorch-fid use):
that product is not symmetric, its Schur-based square root returns spurious imaginary parts and fails on
singular covariances, which those tools patch with an ``eps * I`` offset that changes the value; it is also
several times slower at d = 2048. The symmetric form is exact for singular matrices and never complex. All of it
runs in float64 (torch's LAPACK bindings, which were several times faster than numpy's here).

Statistics ``(mu, sigma)`` are a :class:`GaussianStats` that saves to / loads from ``.npz`` with keys ``mu`` and
``sigma`` (the convention of ADM's reference batches, whose ``mu``/``sigma`` load directly).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["GaussianStats", "fit_gaussian", "frechet_distance", "sqrtm_psd", "trace_sqrt_product"]


@dataclass(frozen=True)
class GaussianStats:
    """Mean ``mu`` ``(d,)`` and covariance ``sigma`` ``(d, d)`` (float64) of a feature set of ``n`` rows.

    ``n`` is 0 when unknown (e.g. statistics read from a published reference batch)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int = 0

    def __post_init__(self) -> None:
        mu = np.asarray(self.mu, dtype=np.float64)
        sigma = np.asarray(self.sigma, dtype=np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"sigma: expected shape (d, d) matching mu (d,), got mu {mu.shape}, sigma {sigma.shape}")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise ValueError("mu, sigma: contain NaN or infinite values")
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "sigma", sigma)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``mu``, ``sigma`` (and ``n``) to an ``.npz`` file."""
        np.savez(path, mu=self.mu, sigma=self.sigma, n=np.int64(self.n))

    @classmethod
    def load(cls, path: str | os.PathLike) -> GaussianStats:
        """Read ``mu`` and ``sigma`` from an ``.npz`` (ours or an ADM reference batch)."""
        try:
            with np.load(path, allow_pickle=False) as f:
                if "mu" not in f or "sigma" not in f:
                    raise ValueError(f"path: {path} has no 'mu' and 'sigma' arrays (keys: {sorted(f.keys())})")
                n = int(f["n"]) if "n" in f else 0
                return cls(f["mu"], f["sigma"], n)
        except OSError as err:
            raise ValueError(f"path: cannot read {path} as .npz ({err})") from err


def fit_gaussian(features: np.ndarray) -> GaussianStats:
    """Mean and unbiased covariance (``ddof=1``, as FID tools use) of ``features`` ``(n, d)``, in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features: expected (n, d) with n >= 2, got shape {features.shape}")
    if not np.isfinite(features).all():
        raise ValueError("features: contain NaN or infinite values")
    return GaussianStats(features.mean(0), np.cov(features, rowvar=False, ddof=1).reshape(features.shape[1], -1),
                         features.shape[0])


def _clip_roundoff(w: Tensor) -> Tensor:
    """Eigenvalues of a PSD matrix with those below ``d * eps * max|w|`` (round-off, or negative) set to zero."""
    tol = w.numel() * torch.finfo(torch.float64).eps * w.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return torch.where(w > tol, w, torch.zeros_like(w))


def _sym(a: Tensor) -> Tensor:
    return 0.5 * (a + a.T)


def sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite ``a`` ``(d, d)`` by ``eigh``; eigenvalues at
    round-off level or below zero are set to zero."""
    w, v = torch.linalg.eigh(_sym(torch.as_tensor(np.asarray(a, dtype=np.float64))))
    return ((v * _clip_roundoff(w).sqrt()) @ v.T).numpy()


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr (S_1 S_2)^{1/2}`` ``= tr (S_1^{1/2} S_2 S_1^{1/2})^{1/2}`` for PSD ``(d, d)`` matrices (Cholesky of
    ``S_1``, or its symmetric square root when singular, then ``eigvalsh``)."""
    s1 = _sym(torch.as_tensor(np.asarray(sigma1, dtype=np.float64)))
    s2 = _sym(torch.as_tensor(np.asarray(sigma2, dtype=np.float64)))
    factor, info = torch.linalg.cholesky_ex(s1)
    if int(info) != 0:
        factor = torch.as_tensor(sqrtm_psd(s1.numpy()))
    w = torch.linalg.eigvalsh(_sym(factor.T @ s2 @ factor))
    return float(_clip_roundoff(w).sqrt().sum())


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """Frechet distance (squared W2) between the Gaussians ``a`` and ``b``.

    Accuracy as an estimator: when ``a``, ``b`` are fitted to ``n`` i.i.d. feature rows each of two distributions
    with finite fourth moments, the estimate differs from the population value by ``O_p(n^{-1/2})`` (its
    first-order term in the fluctuations of the sample moments) when the two distributions differ, and its bias is
    ``O(1/n)`` (positive, about ``c / n`` with ``c`` growing with the dimension; Chong & Forsyth 2020). When the
    two distributions are equal the first-order term vanishes and the estimate itself is ``O_p(1/n)``. Compare
    numbers only at equal ``n``.
    """
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"b: feature dimension {b.mu.shape[0]} differs from a's {a.mu.shape[0]}")
    diff = a.mu - b.mu
    value = float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * trace_sqrt_product(a.sigma, b.sigma))
    return max(value, 0.0)

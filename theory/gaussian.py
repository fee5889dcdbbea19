"""Exact ground truth ("oracle") for Gaussian and Gaussian-mixture data under any :mod:`atdiff.processes` process.

For data ``x0 ~ N(m, S)`` and a process ``x_t = alpha(t) x0 + sigma(t) eps`` the marginal is
``q(x_t) = N(alpha m, alpha^2 S + sigma^2 I)``; for a mixture ``sum_k w_k N(m_k, S_k)`` it is the mixture of
those. With ``S = U diag(lam) U^T`` the marginal covariance is ``U diag(alpha^2 lam + sigma^2) U^T``, so every
quantity below is computed in the eigenbasis of each component (one ``eigh`` per component, at construction).

Everything is computed in float64; outputs come back in the dtype of ``x`` (or the requested ``dtype``).
Shapes: ``x`` is ``(B, d)``; ``t`` (and ``s``) a tensor of shape ``()`` or ``(B,)``.

Public API
----------
* :class:`Gaussian`, :class:`GaussianMixture` -- the data laws (validated, float64, frozen).
* :func:`marginal` -- ``q(x_t)`` as a law of the same kind (scalar ``t``).
* :func:`log_prob`, :func:`score`, :func:`eps_star`, :func:`x0_star`, :func:`sample` -- exact marginal quantities.
* :func:`oracle_model` -- the Bayes-optimal eps-model ``model(x, t)`` (``prediction = "eps"``) for samplers.
* :func:`flow_map` -- the exact probability-flow ODE map ``x_t -> x_s`` for Gaussian data.
* :func:`kl_gaussians`, :func:`w2_gaussians` -- KL divergence and Bures-Wasserstein distance of two Gaussians.
* :func:`linear_eps_star`, :func:`linear_eps_loss` -- linear eps-models ``eps(x) = A x + b`` on Gaussian data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from atdiff.param import convert
from atdiff.processes import Process

__all__ = [
    "Gaussian",
    "GaussianMixture",
    "OracleModel",
    "marginal",
    "log_prob",
    "score",
    "eps_star",
    "x0_star",
    "sample",
    "sample_data",
    "oracle_model",
    "flow_map",
    "kl_gaussians",
    "w2_gaussians",
    "linear_eps_star",
    "linear_eps_loss",
]

F64 = torch.float64
_WEIGHT_TOL = 1e-6


# ------------------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------------------
def _as64(value, name: str) -> Tensor:
    """``value`` as a float64 CPU tensor (autograd kept), rejecting NaN / infinity (``ValueError`` naming ``name``)."""
    try:
        out = (value if isinstance(value, Tensor) else torch.as_tensor(value, dtype=F64)).to(device="cpu", dtype=F64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name}: cannot convert to a float tensor ({err})") from err
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return out


def _check_spd(cov: Tensor, name: str) -> Tensor:
    """Check that ``cov`` ``(..., d, d)`` is symmetric positive definite (Cholesky); return it symmetrised."""
    scale = cov.abs().amax().clamp_min(1.0)
    if not torch.allclose(cov, cov.mT, rtol=0.0, atol=1e-10 * float(scale)):
        raise ValueError(f"{name}: must be symmetric")
    cov = 0.5 * (cov + cov.mT)
    _, info = torch.linalg.cholesky_ex(cov)
    if bool((info != 0).any()):
        raise ValueError(f"{name}: must be positive definite (Cholesky failed)")
    return cov


def _check_psd(cov: Tensor, name: str) -> Tensor:
    """Check that ``cov`` ``(..., d, d)`` is symmetric positive semi-definite (up to rounding); symmetrise it."""
    scale = float(cov.abs().amax().clamp_min(1.0))
    if not torch.allclose(cov, cov.mT, rtol=0.0, atol=1e-10 * scale):
        raise ValueError(f"{name}: must be symmetric")
    cov = 0.5 * (cov + cov.mT)
    if bool((torch.linalg.eigvalsh(cov) < -1e-10 * scale).any()):
        raise ValueError(f"{name}: must be positive semi-definite")
    return cov


def _check_weights(weights: Tensor) -> Tensor:
    """Check ``weights`` ``(K,)``: non-negative, summing to one within 1e-6; return them renormalised."""
    if weights.ndim != 1 or weights.numel() < 1:
        raise ValueError(f"weights: expected shape (K,) with K >= 1, got {tuple(weights.shape)}")
    if bool((weights < 0).any()):
        raise ValueError("weights: must be non-negative")
    total = float(weights.sum())
    if abs(total - 1.0) > _WEIGHT_TOL:
        raise ValueError(f"weights: must sum to one (within {_WEIGHT_TOL}), got sum {total!r}")
    return weights / weights.sum()


# ------------------------------------------------------------------------------------------------------------
# data laws
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Gaussian:
    """Data law ``N(mean, cov)`` in ``d`` dimensions.

    Args: ``mean`` ``(d,)``; ``cov`` ``(d, d)`` symmetric positive definite. Stored as float64 CPU tensors,
    together with the eigendecomposition ``cov = evecs diag(evals) evecs^T``.
    """

    mean: Tensor
    cov: Tensor
    evals: Tensor = field(init=False, repr=False)
    evecs: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        mean, cov = _as64(self.mean, "mean").detach(), _as64(self.cov, "cov").detach()
        if mean.ndim != 1 or mean.numel() < 1:
            raise ValueError(f"mean: expected shape (d,), got {tuple(mean.shape)}")
        d = mean.shape[0]
        if cov.shape != (d, d):
            raise ValueError(f"cov: expected shape ({d}, {d}) to match mean, got {tuple(cov.shape)}")
        cov = _check_spd(cov, "cov")
        evals, evecs = torch.linalg.eigh(cov)
        for name, value in (("mean", mean), ("cov", cov), ("evals", evals), ("evecs", evecs)):
            object.__setattr__(self, name, value)

    @property
    def dim(self) -> int:
        """The data dimension ``d``."""
        return self.mean.shape[0]


@dataclass(frozen=True, eq=False)
class GaussianMixture:
    """Data law ``sum_k weights[k] N(means[k], covs[k])``.

    Args: ``weights`` ``(K,)`` non-negative summing to one (within 1e-6; renormalised exactly);
    ``means`` ``(K, d)``; ``covs`` ``(K, d, d)`` symmetric positive definite. Stored as float64 CPU tensors,
    with per-component eigendecompositions ``evals`` ``(K, d)``, ``evecs`` ``(K, d, d)``.
    """

    weights: Tensor
    means: Tensor
    covs: Tensor
    evals: Tensor = field(init=False, repr=False)
    evecs: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        weights = _check_weights(_as64(self.weights, "weights").detach())
        means, covs = _as64(self.means, "means").detach(), _as64(self.covs, "covs").detach()
        k = weights.shape[0]
        if means.ndim != 2 or means.shape[0] != k or means.shape[1] < 1:
            raise ValueError(f"means: expected shape ({k}, d) to match weights, got {tuple(means.shape)}")
        d = means.shape[1]
        if covs.shape != (k, d, d):
            raise ValueError(f"covs: expected shape ({k}, {d}, {d}) to match means, got {tuple(covs.shape)}")
        covs = _check_spd(covs, "covs")
        evals, evecs = torch.linalg.eigh(covs)
        for name, value in (("weights", weights), ("means", means), ("covs", covs), ("evals", evals),
                            ("evecs", evecs)):
            object.__setattr__(self, name, value)

    @property
    def dim(self) -> int:
        """The data dimension ``d``."""
        return self.means.shape[1]

    @property
    def n_components(self) -> int:
        """The number of components ``K``."""
        return self.weights.shape[0]


Data = Gaussian | GaussianMixture


def _components(data: Data, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(log_weights (K,), means (K, d), evals (K, d), evecs (K, d, d))`` on ``device``; a Gaussian has K = 1."""
    if isinstance(data, Gaussian):
        parts = (torch.zeros(1, dtype=F64), data.mean[None], data.evals[None], data.evecs[None])
    elif isinstance(data, GaussianMixture):
        parts = (data.weights.log(), data.means, data.evals, data.evecs)
    else:
        raise TypeError(f"data: expected a Gaussian or GaussianMixture, got {type(data).__name__}")
    return tuple(p.to(device) for p in parts)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------------------
# times and coefficients
# ------------------------------------------------------------------------------------------------------------
def _times(process: Process, t: Tensor | float, batch: int, device: torch.device, name: str = "t") -> Tensor:
    """Validate ``t`` (shape ``()``, ``(1,)`` or ``(batch,)``) and return it as float64 of shape ``(batch,)``."""
    t = process.check_time(t if isinstance(t, Tensor) else torch.tensor(t, dtype=F64), name)
    t = t.to(device=device, dtype=F64)
    if t.numel() == 1:
        return t.reshape(1).expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"{name}: expected shape () or ({batch},), got {tuple(t.shape)}")
    return t


def _coefs(process: Process, t64: Tensor) -> tuple[Tensor, Tensor]:
    """``alpha(t)``, ``sigma(t)`` in float64, shape of ``t64``."""
    return process.alpha(t64), process.sigma(t64)


def _check_x(data: Data, x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[1] != data.dim:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x: expected a tensor of shape (B, {data.dim}), got {shape}")


def _eigen_terms(data: Data, process: Process, x: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-component terms of ``q(x_t)`` at ``x``, all float64.

    Returns ``log_w`` ``(K,)``, ``z`` ``(B, K, d)`` the coordinates of ``x - alpha m_k`` in the eigenbasis of
    ``S_k``, ``lam_t`` ``(B, K, d)`` the marginal eigenvalues ``alpha^2 lam_k + sigma^2`` and ``evecs`` ``(K, d, d)``.
    """
    _check_x(data, x)
    log_w, means, evals, evecs = _components(data, x.device)
    alpha, sigma = _coefs(process, _times(process, t, x.shape[0], x.device))
    a = alpha[:, None, None]
    lam_t = a**2 * evals[None] + sigma[:, None, None] ** 2
    diff = x.to(F64)[:, None, :] - a * means[None]
    z = torch.einsum("kde,bkd->bke", evecs, diff)
    return log_w, z, lam_t, evecs


def _component_log_probs(z: Tensor, lam_t: Tensor) -> Tensor:
    """``log N(x; alpha m_k, C_k)`` per component, ``(B, K)``, from the eigen-terms."""
    d = z.shape[-1]
    return -0.5 * ((z**2 / lam_t).sum(-1) + lam_t.log().sum(-1) + d * math.log(2 * math.pi))


# ------------------------------------------------------------------------------------------------------------
# marginal quantities
# ------------------------------------------------------------------------------------------------------------
def marginal(data: Data, process: Process, t: Tensor | float) -> Data:
    """The exact marginal ``q(x_t)`` at a scalar time ``t``, as a law of the same kind as ``data``.

    Gaussian: ``N(alpha m, alpha^2 S + sigma^2 I)``; mixture: the same map applied to every component.
    """
    t = process.check_time(t if isinstance(t, Tensor) else torch.tensor(t, dtype=F64))
    if t.numel() != 1:
        raise ValueError(f"t: marginal needs a single time, got shape {tuple(t.shape)}")
    alpha, sigma = _coefs(process, t.to(F64).reshape(()))
    if isinstance(data, Gaussian):
        eye = torch.eye(data.dim, dtype=F64)
        return Gaussian(alpha * data.mean, alpha**2 * data.cov + sigma**2 * eye)
    if isinstance(data, GaussianMixture):
        eye = torch.eye(data.dim, dtype=F64)
        return GaussianMixture(data.weights, alpha * data.means, alpha**2 * data.covs + sigma**2 * eye)
    raise TypeError(f"data: expected a Gaussian or GaussianMixture, got {type(data).__name__}")


def log_prob(data: Data, process: Process, x: Tensor, t: Tensor | float) -> Tensor:
    """``log q(x_t = x)``, shape ``(B,)`` in ``x.dtype`` (mixtures via logsumexp). Differentiable in ``x``."""
    log_w, z, lam_t, _ = _eigen_terms(data, process, x, t)
    return torch.logsumexp(log_w + _component_log_probs(z, lam_t), dim=1).to(x.dtype)


def _score64(data: Data, process: Process, x: Tensor, t: Tensor | float) -> Tensor:
    """``grad_x log q(x_t)`` in float64, ``(B, d)``: responsibility-weighted component scores."""
    log_w, z, lam_t, evecs = _eigen_terms(data, process, x, t)
    resp = torch.softmax(log_w + _component_log_probs(z, lam_t), dim=1)  # (B, K)
    comp = -torch.einsum("kde,bke->bkd", evecs, z / lam_t)  # -C_k^{-1} (x - alpha m_k)
    return (resp[..., None] * comp).sum(1)


def score(data: Data, process: Process, x: Tensor, t: Tensor | float) -> Tensor:
    """The exact score ``grad_x log q(x_t)`` at ``x``, shape ``(B, d)`` in ``x.dtype``."""
    return _score64(data, process, x, t).to(x.dtype)


def _eps_star64(data: Data, process: Process, x: Tensor, t: Tensor | float) -> Tensor:
    sigma = process.sigma(_times(process, t, x.shape[0], x.device))
    return -sigma[:, None] * _score64(data, process, x, t)


def eps_star(data: Data, process: Process, x: Tensor, t: Tensor | float) -> Tensor:
    """Bayes-optimal eps-prediction ``E[eps | x_t = x] = -sigma(t) score(x, t)``, ``(B, d)`` in ``x.dtype``."""
    return _eps_star64(data, process, x, t).to(x.dtype)


def x0_star(data: Data, process: Process, x: Tensor, t: Tensor | float) -> Tensor:
    """Bayes-optimal x0-prediction ``E[x0 | x_t = x]`` (from :func:`eps_star` by ``atdiff.param.convert``)."""
    t64 = _times(process, t, x.shape[0], x.device)
    x64 = x.to(F64)
    return convert(_eps_star64(data, process, x, t64), x64, t64, process, "eps", "x0").to(x.dtype)


def sample_data(data: Data, n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` draws of ``x0`` from the data law, ``(n, d)`` float64 (CPU)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n: expected a non-negative integer, got {n!r}")
    log_w, means, evals, evecs = _components(data, torch.device("cpu"))
    idx = torch.multinomial(log_w.exp(), n, replacement=True, generator=generator) if n else \
        torch.zeros(0, dtype=torch.long)
    z = torch.randn(n, data.dim, generator=generator, dtype=F64)
    root = evecs[idx] * evals[idx].sqrt()[:, None, :]  # U diag(sqrt(lam)), (n, d, d)
    return means[idx] + torch.einsum("nde,ne->nd", root, z)


def sample(data: Data, process: Process, n: int, t: Tensor | float, generator: torch.Generator | None = None,
           dtype: torch.dtype | None = None) -> Tensor:
    """``n`` draws from ``q(x_t)`` (``x0`` from the data, then ``alpha x0 + sigma eps``); ``t = 0`` gives data.

    ``t`` has shape ``()`` or ``(n,)``. Returns ``(n, d)`` on the CPU in ``dtype`` (default: torch's default).
    """
    t64 = _times(process, t, n, torch.device("cpu"))
    x0 = sample_data(data, n, generator)
    eps = torch.randn(x0.shape, generator=generator, dtype=F64)
    return process.add_noise(x0, eps, t64).to(dtype or torch.get_default_dtype())


# ------------------------------------------------------------------------------------------------------------
# the oracle as a model
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class OracleModel:
    """The Bayes-optimal eps-model of ``data`` under ``process``: ``model(x, t) = eps_star(x, t)``.

    Usable directly by samplers (``atdiff.param.predict(model, x, t, process, kind)``); ``prediction = "eps"``.
    """

    data: Data
    process: Process
    prediction: str = field(default="eps", init=False)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        return eps_star(self.data, self.process, x, t)


def oracle_model(data: Data, process: Process) -> OracleModel:
    """The exact eps-model ``model(x, t) -> E[eps | x_t = x]`` with ``model.prediction == "eps"``."""
    if not isinstance(data, Gaussian | GaussianMixture):
        raise TypeError(f"data: expected a Gaussian or GaussianMixture, got {type(data).__name__}")
    if not isinstance(process, Process):
        raise TypeError(f"process: expected an atdiff Process, got {type(process).__name__}")
    return OracleModel(data, process)


# ------------------------------------------------------------------------------------------------------------
# probability-flow ODE (Gaussian data)
# ------------------------------------------------------------------------------------------------------------
def flow_map(data: Gaussian, process: Process, x: Tensor, t: Tensor | float, s: Tensor | float) -> Tensor:
    """Exact probability-flow ODE map from ``x_t = x`` to ``x_s`` for Gaussian data (``s`` may exceed ``t``).

    With ``S = U diag(lam) U^T`` and ``lam_t = alpha_t^2 lam + sigma_t^2``, the eigen-coordinates of
    ``(x_t - alpha_t m) / sqrt(lam_t)`` are constant along the flow, so
    ``x_s = alpha_s m + U diag(sqrt(lam_s / lam_t)) U^T (x_t - alpha_t m)``. ``(B, d)`` in ``x.dtype``.
    """
    if not isinstance(data, Gaussian):
        raise TypeError(f"data: flow_map needs Gaussian data, got {type(data).__name__}")
    _check_x(data, x)
    m, lam, u = data.mean.to(x.device), data.evals.to(x.device), data.evecs.to(x.device)
    a_t, sig_t = _coefs(process, _times(process, t, x.shape[0], x.device, "t"))
    a_s, sig_s = _coefs(process, _times(process, s, x.shape[0], x.device, "s"))
    lam_t = a_t[:, None] ** 2 * lam + sig_t[:, None] ** 2
    lam_s = a_s[:, None] ** 2 * lam + sig_s[:, None] ** 2
    z = (x.to(F64) - a_t[:, None] * m) @ u
    return (a_s[:, None] * m + (z * (lam_s / lam_t).sqrt()) @ u.T).to(x.dtype)


# ------------------------------------------------------------------------------------------------------------
# Gaussian-to-Gaussian divergences
# ------------------------------------------------------------------------------------------------------------
def _gauss_pair(m0, S0, m1, S1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Validate two Gaussians ``(..., d)``, ``(..., d, d)`` (broadcasting batch dims); float64."""
    m0, S0, m1, S1 = (_as64(v, n) for v, n in ((m0, "m0"), (S0, "S0"), (m1, "m1"), (S1, "S1")))
    for name, m, S in (("S0", m0, S0), ("S1", m1, S1)):
        if m.ndim < 1 or S.ndim < 2 or S.shape[-2:] != (m.shape[-1], m.shape[-1]):
            raise ValueError(f"{name}: expected shape (..., d, d) matching the mean (..., d), "
                             f"got {tuple(S.shape)} and {tuple(m.shape)}")
    if m0.shape[-1] != m1.shape[-1]:
        raise ValueError(f"m1: dimension {m1.shape[-1]} differs from m0's {m0.shape[-1]}")
    return m0, S0, m1, S1


def kl_gaussians(m0, S0, m1, S1) -> Tensor:
    """Exact ``KL(N(m0, S0) || N(m1, S1))`` in float64, shape of the broadcast batch dims (``()`` if none).

    ``0.5 [tr(S1^{-1} S0) + (m1 - m0)^T S1^{-1} (m1 - m0) - d + log det S1 - log det S0]``; both covariances
    must be positive definite.
    """
    m0, S0, m1, S1 = _gauss_pair(m0, S0, m1, S1)
    L0, L1 = torch.linalg.cholesky(_check_spd(S0, "S0")), torch.linalg.cholesky(_check_spd(S1, "S1"))
    batch = torch.broadcast_shapes(m0.shape[:-1], m1.shape[:-1], L0.shape[:-2], L1.shape[:-2])
    d = m0.shape[-1]
    L0, L1 = L0.expand(*batch, d, d), L1.expand(*batch, d, d)
    diff = (m1 - m0).expand(*batch, d)[..., None]
    M = torch.linalg.solve_triangular(L1, L0, upper=False)  # L1^{-1} L0: tr(S1^{-1} S0) = ||M||_F^2
    v = torch.linalg.solve_triangular(L1, diff, upper=False)  # ||v||^2 = (m1 - m0)^T S1^{-1} (m1 - m0)
    logdet = 2 * (L1.diagonal(dim1=-2, dim2=-1).log() - L0.diagonal(dim1=-2, dim2=-1).log()).sum(-1)
    return 0.5 * ((M**2).sum((-2, -1)) + (v**2).sum((-2, -1)) - d + logdet)


def _psd_sqrt(S: Tensor) -> Tensor:
    """Symmetric PSD square root by ``eigh`` (negative rounding eigenvalues clamped to 0)."""
    evals, evecs = torch.linalg.eigh(0.5 * (S + S.mT))
    return (evecs * evals.clamp_min(0).sqrt()[..., None, :]) @ evecs.mT


def w2_gaussians(m0, S0, m1, S1) -> Tensor:
    """2-Wasserstein distance (not squared) between ``N(m0, S0)`` and ``N(m1, S1)``, float64, batch shape.

    ``W2^2 = ||m0 - m1||^2 + tr(S0 + S1 - 2 (S1^{1/2} S0 S1^{1/2})^{1/2})`` (Bures); covariances may be PSD.
    The covariance term is evaluated without cancellation as ``min_U ||S0^{1/2} - S1^{1/2} U||_F^2`` over
    orthogonal ``U``, attained at the polar factor of ``S1^{1/2} S0^{1/2}``, so equal laws give ~1e-16, not ~1e-8.
    """
    m0, S0, m1, S1 = _gauss_pair(m0, S0, m1, S1)
    r0, r1 = _psd_sqrt(_check_psd(S0, "S0")), _psd_sqrt(_check_psd(S1, "S1"))
    W, _, Vh = torch.linalg.svd(r1.mT @ r0)
    residual = r0 - r1 @ (W @ Vh)
    return (((m0 - m1) ** 2).sum(-1) + (residual**2).sum((-2, -1))).sqrt()


# ------------------------------------------------------------------------------------------------------------
# linear eps-models on Gaussian data
# ------------------------------------------------------------------------------------------------------------
def linear_eps_star(data: Gaussian, process: Process, t: Tensor | float) -> tuple[Tensor, Tensor]:
    """The Bayes eps-predictor of Gaussian data at scalar ``t`` is affine: ``eps*(x) = A x + b`` (float64).

    ``A = sigma C^{-1}``, ``b = -alpha sigma C^{-1} m`` with ``C = alpha^2 S + sigma^2 I``.
    Returns ``A`` ``(d, d)`` and ``b`` ``(d,)``.
    """
    if not isinstance(data, Gaussian):
        raise TypeError(f"data: linear_eps_star needs Gaussian data, got {type(data).__name__}")
    alpha, sigma = _coefs(process, _times(process, t, 1, torch.device("cpu"))[0])
    lam_t = alpha**2 * data.evals + sigma**2
    A = (data.evecs * (sigma / lam_t)) @ data.evecs.T
    return A, -alpha * (A @ data.mean)


def linear_eps_loss(data: Gaussian, process: Process, t: Tensor | float, A, b) -> Tensor:
    """Exact ``E ||A x_t + b - eps||^2`` over ``x0 ~ data``, ``eps ~ N(0, I)`` at scalar ``t`` (float64, ``()``).

    The residual ``alpha A x0 + (sigma A - I) eps + b`` is Gaussian with mean ``alpha A m + b`` and covariance
    ``alpha^2 A S A^T + (sigma A - I)(sigma A - I)^T``; the loss is its squared mean norm plus its trace.
    Differentiable in ``A`` and ``b``.
    """
    if not isinstance(data, Gaussian):
        raise TypeError(f"data: linear_eps_loss needs Gaussian data, got {type(data).__name__}")
    d = data.dim
    A, b = _as64(A, "A"), _as64(b, "b")
    if A.shape != (d, d):
        raise ValueError(f"A: expected shape ({d}, {d}), got {tuple(A.shape)}")
    if b.shape != (d,):
        raise ValueError(f"b: expected shape ({d},), got {tuple(b.shape)}")
    alpha, sigma = _coefs(process, _times(process, t, 1, torch.device("cpu"))[0])
    mean = alpha * (A @ data.mean) + b
    B = sigma * A - torch.eye(d, dtype=F64)
    return (mean**2).sum() + alpha**2 * torch.trace(A @ data.cov @ A.T) + (B**2).sum()

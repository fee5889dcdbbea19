"""Exact laws of sampling chains driven by an affine eps-model, and exact reverse transitions of the data.

When the eps-model is affine in ``x`` at every time, ``eps(x, t) = A_t x + b_t`` (the Bayes ``eps*`` of Gaussian
data is affine, and so is any perturbed or misspecified linear model), one DDIM step or one DDPM ancestral step
is ``y = M x + c + xi`` with ``xi ~ N(0, Q)`` independent of ``x`` (an :class:`AffineStep`). A Gaussian
``N(m, C)`` is then mapped to ``N(M m + c, M C M^T + Q)`` exactly, so every marginal ``p(x_s)`` along the
sampling chain is an exact Gaussian and KL / W2 to the truth are closed forms.

The affine maps are not re-derived here: they are read off the library's own step functions
(:func:`atdiff.samplers.ddim_step`, :meth:`atdiff.processes.Process.posterior` with ``x0_hat`` from
:func:`atdiff.param.predict`) by evaluating them at the zero vector and the identity basis, which is exact
because the step is affine (:func:`affine_map`); every extracted map is verified at random points.

For Gaussian data the true reverse transition ``q(x_s | x_t)`` is Gaussian with an affine mean (joint-Gaussian
conditioning, :func:`gaussian_reverse_step`); for a mixture it is a mixture whose weights are proportional to
``w_k N(x_t; alpha_t mu_k, alpha_t^2 S_k + sigma_t^2 I)`` (:func:`mixture_reverse_transition`).

Everything is float64 on the CPU. Shapes: ``x`` ``(B, d)``; means ``(d,)``; covariances ``(d, d)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from atdiff.param import predict
from atdiff.processes import VE, Process
from atdiff.samplers import check_grid, ddim_step

from .gaussian import Gaussian, GaussianMixture, kl_gaussians, linear_eps_star, log_prob, marginal, sample

__all__ = [
    "Coef",
    "AffineStep",
    "AffineEpsModel",
    "constant_eps_model",
    "bayes_coef",
    "perturbed_coef",
    "affine_map",
    "ddim_step_affine",
    "ddpm_step_affine",
    "ve_teacher_step",
    "ve_teacher_step_affine",
    "ddim_chain_steps",
    "ddpm_chain_steps",
    "push_gaussian",
    "chain_marginals",
    "ddim_chain_marginals",
    "ddpm_chain_marginals",
    "gaussian_reverse_step",
    "step_log_prob",
    "transition_kl",
    "expected_transition_kl",
    "MixtureTransition",
    "mixture_reverse_transition",
    "mixture_transition_log_prob",
    "sample_mixture_transition",
    "mixture_transition_kl_mc",
    "expected_mixture_transition_kl_mc",
]

F64 = torch.float64
#: ``coef(t) -> (A (d, d), b (d,))``: the coefficients of an affine eps-model at a scalar time ``t``
Coef = Callable[[Tensor], tuple[Tensor, Tensor]]
_AFFINE_RTOL = 1e-8


# ------------------------------------------------------------------------------------------------------------
# affine eps-models
# ------------------------------------------------------------------------------------------------------------
class AffineStep(NamedTuple):
    """One Gaussian-affine step ``y = M x + c + xi``, ``xi ~ N(0, Q)`` independent of ``x``.

    ``M`` ``(d_out, d_in)``, ``c`` ``(d_out,)``, ``Q`` ``(d_out, d_out)`` positive semi-definite (zero for a
    deterministic step). Also the conditional law ``p(y | x) = N(M x + c, Q)`` of a transition.
    """

    M: Tensor
    c: Tensor
    Q: Tensor


@dataclass(frozen=True, eq=False)
class AffineEpsModel:
    """The eps-model ``model(x, t) = A_t x + b_t`` with ``(A_t, b_t) = coef(t)`` (``prediction = "eps"``).

    Usable by every sampler. ``x`` ``(B, d)``, ``t`` ``(B,)`` (or ``()``); returns ``(B, d)`` in ``x.dtype``,
    differentiable in whatever tensors ``coef`` returns.
    """

    coef: Coef
    prediction: str = field(default="eps", init=False)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        times, index = torch.unique(t.to(F64), return_inverse=True)
        out = torch.zeros(x.shape, dtype=F64, device=x.device)
        for k, tk in enumerate(times):
            A, b = self.coef(tk)
            out = torch.where((index == k)[:, None], x.to(F64) @ A.mT + b, out)
        return out.to(x.dtype)


def constant_eps_model(A: Tensor, b: Tensor) -> AffineEpsModel:
    """The time-independent eps-model ``x A^T + b`` (``A`` ``(d, d)``, ``b`` ``(d,)``) as an :class:`AffineEpsModel`."""
    return AffineEpsModel(lambda t: (A, b))


def bayes_coef(data: Gaussian, process: Process) -> Coef:
    """The coefficients of the Bayes ``eps*`` of Gaussian data (:func:`theory.gaussian.linear_eps_star`)."""
    if not isinstance(data, Gaussian):
        raise TypeError(f"data: bayes_coef needs Gaussian data, got {type(data).__name__}")
    return lambda t: linear_eps_star(data, process, t)


def perturbed_coef(coef: Coef, *, scale: float = 1.0, dA: Tensor | None = None, db: Tensor | None = None) -> Coef:
    """A misspecified model ``(scale A_t + dA, scale b_t + db)`` from the coefficients ``coef``.

    ``dA`` ``(d, d)`` and ``db`` ``(d,)`` are time-independent (default zero), like a network whose eps error
    has a constant size; ``scale = 1 / 1.017`` mimics epsilon scaling.
    """
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite number, got {scale}")

    def new(t: Tensor) -> tuple[Tensor, Tensor]:
        A, b = coef(t)
        A, b = scale * A, scale * b
        return (A if dA is None else A + dA), (b if db is None else b + db)

    return new


# ------------------------------------------------------------------------------------------------------------
# affine maps of the library's step functions
# ------------------------------------------------------------------------------------------------------------
def affine_map(fn: Callable[[Tensor], Tensor], d_in: int, *, name: str = "model", check: bool = True
               ) -> tuple[Tensor, Tensor]:
    """``(M (d_out, d_in), c (d_out,))`` with ``fn(x) = x M^T + c`` for an affine ``fn: (B, d_in) -> (B, d_out)``.

    Read off ``fn`` at the zero vector and the identity basis (exact for an affine map). With ``check`` the map is
    verified at three random points; a deviation raises ``ValueError`` naming ``name``.
    """
    probe = [torch.zeros(1, d_in, dtype=F64), torch.eye(d_in, dtype=F64)]
    if check:  # three random points, evaluated in the same call
        probe.append(3.0 * torch.randn(3, d_in, dtype=F64, generator=torch.Generator().manual_seed(12345)))
    y = fn(torch.cat(probe)).to(F64)
    c = y[0]
    M = (y[1:d_in + 1] - c).mT
    if check:
        with torch.no_grad():
            err = float((y[d_in + 1:] - (probe[2] @ M.mT + c)).abs().max())
            scale = 1.0 + float(M.abs().max()) * 3.0 * d_in + float(c.abs().max())
        if not err <= _AFFINE_RTOL * scale:
            raise ValueError(f"{name}: the step is not affine in x (deviation {err:.3g} at random points); exact "
                             f"chain marginals need an affine eps-model eps(x, t) = A_t x + b_t")
    return M, c


def _time(t: Tensor | float, name: str) -> Tensor:
    t = torch.as_tensor(t, dtype=F64)
    if t.numel() != 1 or not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: expected one finite time, got {t.tolist()}")
    return t.reshape(())


def _check_pair(process: Process, t: Tensor | float, s: Tensor | float) -> tuple[Tensor, Tensor]:
    t, s = _time(t, "t"), _time(s, "s")
    process.check_time(t, "t")
    process.check_time(s, "s")
    if not s < t:
        raise ValueError(f"s: expected s < t, got s = {float(s)}, t = {float(t)}")
    return t, s


def _check_dim(dim: int) -> None:
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise ValueError(f"dim: expected an integer >= 1, got {dim!r}")


def ddim_step_affine(model: Callable, process: Process, t: Tensor | float, s: Tensor | float, dim: int, *,
                     eta: float = 0.0) -> AffineStep:
    """The DDIM step ``t -> s`` (:func:`atdiff.samplers.ddim_step`) of an affine eps-``model`` as an affine step.

    The step is affine jointly in ``(x, z)`` (``z`` its fresh noise), so ``M`` and the noise matrix ``N`` come
    from one :func:`affine_map`; ``Q = N N^T``.
    """
    _check_dim(dim)
    if not eta >= 0:
        raise ValueError(f"eta: expected >= 0, got {eta}")
    t, s = _check_pair(process, t, s)

    def step(xz: Tensor) -> Tensor:
        x, z = xz[:, :dim], xz[:, dim:]
        eps = predict(model, x, t.to(x.dtype), process, "eps")
        return ddim_step(x, eps, process, t, s, eta=eta, noise=z if eta else None)[0]

    MN, c = affine_map(step, 2 * dim)
    N = MN[:, dim:]
    return AffineStep(MN[:, :dim], c, N @ N.mT)


def _ancestral_variance(process: Process, t: Tensor, s: Tensor, variance: str) -> Tensor:
    """The variance ``sample_ddpm`` adds on a step ``t -> s`` (float64 scalar): DDPM's ``beta_tilde`` (``small``,
    from :meth:`Process.posterior`) or the forward transition variance (``large``)."""
    if variance == "small":
        zero = torch.zeros(1, 1, dtype=F64)
        return process.posterior(zero, zero, t, s)[1].reshape(())
    if variance == "large":
        return process.transition(s, t)[1] ** 2
    raise ValueError(f"variance: expected 'small' or 'large', got {variance!r}")


def ddpm_step_affine(model: Callable, process: Process, t: Tensor | float, s: Tensor | float, dim: int, *,
                     variance: str = "small", noise: bool = True) -> AffineStep:
    """The ancestral step ``t -> s`` of :func:`atdiff.samplers.sample_ddpm` for an affine eps-``model``.

    Mean: :meth:`Process.posterior` at ``x0_hat = predict(model, x, t, process, "x0")``; noise ``var I`` with
    the sampler's ``variance`` rule, or none if ``noise`` is False (the sampler's last step).
    """
    _check_dim(dim)
    t, s = _check_pair(process, t, s)
    var = _ancestral_variance(process, t, s, variance)

    def mean(x: Tensor) -> Tensor:
        x0 = predict(model, x, t.to(x.dtype), process, "x0")
        return process.posterior(x, x0, t, s)[0]

    M, c = affine_map(mean, dim)
    return AffineStep(M, c, (var if noise else 0.0) * torch.eye(dim, dtype=F64))


def ve_teacher_step(model: Callable, process: VE, x: Tensor, t: Tensor | float, s: Tensor | float,
                    method: str = "heun") -> Tensor:
    """One probability-flow ODE step ``t -> s`` of a consistency-distillation teacher on a VE process, ``(B, d)``.

    On VE (``alpha = 1``, ``sigma = t``) the DDIM step with ``eta = 0`` is exactly the Euler step of
    ``dx/dt = (x - D(x, t)) / t = eps(x, t)``; Heun (EDM's 2nd-order step) is the DDIM step with the average of
    the eps-predictions at ``(x, t)`` and at the Euler point ``(x', s)``.
    """
    if not isinstance(process, VE):
        raise ValueError(f"process: the VE teacher step needs a VE process, got {process!r}")
    if method not in ("euler", "heun"):
        raise ValueError(f"method: expected 'euler' or 'heun', got {method!r}")
    t, s = _check_pair(process, t, s)
    eps = predict(model, x, t.to(x.dtype), process, "eps")
    x_euler = ddim_step(x, eps, process, t, s)[0]
    if method == "euler":
        return x_euler
    eps_s = predict(model, x_euler, s.to(x.dtype), process, "eps")
    return ddim_step(x, 0.5 * (eps + eps_s), process, t, s)[0]


def ve_teacher_step_affine(model: Callable, process: VE, t: Tensor | float, s: Tensor | float, dim: int,
                           method: str = "heun") -> AffineStep:
    """:func:`ve_teacher_step` of an affine eps-``model`` as a deterministic :class:`AffineStep`."""
    _check_dim(dim)
    M, c = affine_map(lambda x: ve_teacher_step(model, process, x, t, s, method), dim)
    return AffineStep(M, c, torch.zeros(dim, dim, dtype=F64))


def ddim_chain_steps(model: Callable, process: Process, grid: Tensor, dim: int, *, eta: float = 0.0
                     ) -> list[AffineStep]:
    """The ``N`` affine steps of :func:`atdiff.samplers.sample_ddim` along ``grid`` ``(N + 1,)``."""
    grid = check_grid(grid, process)
    return [ddim_step_affine(model, process, grid[i], grid[i + 1], dim, eta=eta) for i in range(len(grid) - 1)]


def ddpm_chain_steps(model: Callable, process: Process, grid: Tensor, dim: int, *, variance: str = "small",
                     final_noise: bool = False) -> list[AffineStep]:
    """The ``N`` affine steps of :func:`atdiff.samplers.sample_ddpm` along ``grid`` ``(N + 1,)``.

    Like the sampler, the last step adds no noise unless ``final_noise`` (the model transition as a density,
    e.g. for the bound of Prop. 1).
    """
    grid = check_grid(grid, process)
    n = len(grid) - 1
    return [ddpm_step_affine(model, process, grid[i], grid[i + 1], dim, variance=variance,
                             noise=final_noise or i < n - 1) for i in range(n)]


def _check_gaussian(m: Tensor, C: Tensor, names: tuple[str, str]) -> tuple[Tensor, Tensor]:
    m, C = torch.as_tensor(m).to(F64), torch.as_tensor(C).to(F64)
    if m.ndim != 1 or C.shape != (m.shape[0], m.shape[0]):
        raise ValueError(f"{names[1]}: expected shape (d, d) matching {names[0]} of shape (d,), got "
                         f"{tuple(C.shape)} and {tuple(m.shape)}")
    for name, v in zip(names, (m, C), strict=True):
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"{name}: contains NaN or infinite values")
    if not torch.allclose(C, C.mT, rtol=0, atol=1e-10 * (1 + float(C.abs().max()))) or \
            bool((torch.linalg.eigvalsh(C) < -1e-10 * (1 + float(C.abs().max()))).any()):
        raise ValueError(f"{names[1]}: must be symmetric positive semi-definite")
    return m, C


def push_gaussian(step: AffineStep, m: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """The law of ``y = M x + c + xi`` for ``x ~ N(m, C)``: ``(M m + c, M C M^T + Q)``."""
    C_out = step.M @ C @ step.M.mT + step.Q
    return step.M @ m + step.c, 0.5 * (C_out + C_out.mT)


def chain_marginals(steps: list[AffineStep], m_T: Tensor, C_T: Tensor) -> list[tuple[Tensor, Tensor]]:
    """The exact Gaussian laws ``(mean (d,), cov (d, d))`` along a chain of steps started at ``N(m_T, C_T)``:
    ``len(steps) + 1`` entries, the first being the start."""
    m, C = _check_gaussian(m_T, C_T, ("m_T", "C_T"))
    if steps and steps[0].M.shape[1] != m.shape[0]:
        raise ValueError(f"m_T: dimension {m.shape[0]} differs from the steps' input dimension {steps[0].M.shape[1]}")
    out = [(m, C)]
    for step in steps:
        out.append(push_gaussian(step, *out[-1]))
    return out


def ddim_chain_marginals(model: Callable, process: Process, grid: Tensor, m_T: Tensor, C_T: Tensor, *,
                         eta: float = 0.0) -> list[tuple[Tensor, Tensor]]:
    """Exact laws of ``sample_ddim(model, x_T ~ N(m_T, C_T), process, grid, eta=eta)`` at every grid time."""
    m, C = _check_gaussian(m_T, C_T, ("m_T", "C_T"))
    return chain_marginals(ddim_chain_steps(model, process, grid, m.shape[0], eta=eta), m, C)


def ddpm_chain_marginals(model: Callable, process: Process, grid: Tensor, m_T: Tensor, C_T: Tensor, *,
                         variance: str = "small", final_noise: bool = False) -> list[tuple[Tensor, Tensor]]:
    """Exact laws of ``sample_ddpm(model, x_T ~ N(m_T, C_T), process, grid, variance=variance)`` at every grid
    time (with ``final_noise``: of the chain whose last step also adds its noise)."""
    m, C = _check_gaussian(m_T, C_T, ("m_T", "C_T"))
    steps = ddpm_chain_steps(model, process, grid, m.shape[0], variance=variance, final_noise=final_noise)
    return chain_marginals(steps, m, C)


# ------------------------------------------------------------------------------------------------------------
# exact reverse transitions of the data, and KLs between transitions
# ------------------------------------------------------------------------------------------------------------
def gaussian_reverse_step(data: Gaussian, process: Process, t: Tensor | float, s: Tensor | float) -> AffineStep:
    """The true reverse transition ``q(x_s | x_t)`` (``s < t``) of Gaussian data as an :class:`AffineStep`.

    With ``x_t = alpha_ts x_s + sigma_ts xi`` and ``x_s ~ N(mu_s, V_s)``: ``M = alpha_ts V_s V_t^{-1}``,
    ``c = mu_s - M mu_t``, ``Q = V_s - alpha_ts M V_s`` (joint-Gaussian conditioning).
    """
    if not isinstance(data, Gaussian):
        raise TypeError(f"data: gaussian_reverse_step needs Gaussian data, got {type(data).__name__}")
    t, s = _check_pair(process, t, s)
    q_s, q_t = marginal(data, process, s), marginal(data, process, t)
    a_ts = process.transition(s, t)[0]
    M = a_ts * torch.linalg.solve(q_t.cov, q_s.cov).mT  # V_s V_t^{-1} (both symmetric)
    Q = q_s.cov - a_ts * M @ q_s.cov
    return AffineStep(M, q_s.mean - M @ q_t.mean, 0.5 * (Q + Q.mT))


def step_log_prob(step: AffineStep, y: Tensor, x: Tensor) -> Tensor:
    """``log N(y; M x + c, Q)`` for ``y`` ``(B, d_out)`` given ``x`` ``(B, d_in)``, shape ``(B,)`` (``Q`` > 0)."""
    dist = torch.distributions.MultivariateNormal(x.to(F64) @ step.M.mT + step.c, covariance_matrix=step.Q)
    return dist.log_prob(y.to(F64))


def transition_kl(step_p: AffineStep, step_q: AffineStep, x: Tensor) -> Tensor:
    """Pointwise ``KL(p(. | x) || q(. | x))`` of two affine-Gaussian transitions at ``x`` ``(B, d)``, ``(B,)``."""
    x = x.to(F64)
    return kl_gaussians(x @ step_p.M.mT + step_p.c, step_p.Q, x @ step_q.M.mT + step_q.c, step_q.Q)


def expected_transition_kl(step_p: AffineStep, step_q: AffineStep, m: Tensor, C: Tensor) -> Tensor:
    """``E_{x ~ N(m, C)} KL(p(. | x) || q(. | x))``, exact (float64 scalar).

    The KL at the mean input plus the mean-difference fluctuation ``0.5 tr(Q_q^{-1} D C D^T)``, ``D = M_p - M_q``.
    """
    m, C = _check_gaussian(m, C, ("m", "C"))
    D = step_p.M - step_q.M
    at_mean = kl_gaussians(step_p.M @ m + step_p.c, step_p.Q, step_q.M @ m + step_q.c, step_q.Q)
    return at_mean + 0.5 * torch.linalg.solve(step_q.Q, D @ C @ D.mT).diagonal().sum()


class MixtureTransition(NamedTuple):
    """A Gaussian-mixture conditional law: ``log_weights`` ``(B, K)`` (normalised), ``means`` ``(B, K, d)``,
    ``covs`` ``(K, d, d)``."""

    log_weights: Tensor
    means: Tensor
    covs: Tensor


def _component(data: GaussianMixture, k: int) -> Gaussian:
    return Gaussian(data.means[k], data.covs[k])


def mixture_reverse_transition(data: GaussianMixture, process: Process, x_t: Tensor, t: Tensor | float,
                               s: Tensor | float) -> MixtureTransition:
    """The true ``q(x_s | x_t = x_t)`` of mixture data: ``sum_k r_k(x_t) q_k(x_s | x_t)`` with
    ``r_k ∝ w_k N(x_t; alpha_t mu_k, alpha_t^2 S_k + sigma_t^2 I)`` and ``q_k`` the Gaussian reverse transition
    of component ``k`` (:func:`gaussian_reverse_step`). ``x_t`` ``(B, d)``."""
    if not isinstance(data, GaussianMixture):
        raise TypeError(f"data: mixture_reverse_transition needs a GaussianMixture, got {type(data).__name__}")
    if not isinstance(x_t, Tensor) or x_t.ndim != 2 or x_t.shape[1] != data.dim:
        raise ValueError(f"x_t: expected a tensor of shape (B, {data.dim}), got "
                         f"{tuple(x_t.shape) if isinstance(x_t, Tensor) else type(x_t).__name__}")
    t, s = _check_pair(process, t, s)
    x_t = x_t.to(F64)
    comps = [_component(data, k) for k in range(data.n_components)]
    log_r = data.weights.log() + torch.stack([log_prob(g, process, x_t, t) for g in comps], dim=1)
    steps = [gaussian_reverse_step(g, process, t, s) for g in comps]
    means = torch.stack([x_t @ st.M.mT + st.c for st in steps], dim=1)
    covs = torch.stack([st.Q for st in steps])
    return MixtureTransition(torch.log_softmax(log_r, dim=1), means, covs)


def mixture_transition_log_prob(trans: MixtureTransition, y: Tensor) -> Tensor:
    """``log sum_k r_k N(y; mean_k, cov_k)`` for ``y`` ``(B, d)``, shape ``(B,)``."""
    comp = torch.distributions.MultivariateNormal(trans.means, covariance_matrix=trans.covs)
    return torch.logsumexp(trans.log_weights + comp.log_prob(y.to(F64)[:, None, :]), dim=1)


def sample_mixture_transition(trans: MixtureTransition, generator: torch.Generator | None = None) -> Tensor:
    """One draw per row from a :class:`MixtureTransition`, ``(B, d)``."""
    k = torch.multinomial(trans.log_weights.exp(), 1, generator=generator)[:, 0]
    z = torch.randn(trans.means.shape[0], trans.means.shape[2], dtype=F64, generator=generator)
    root = torch.linalg.cholesky(trans.covs)[k]
    return trans.means[torch.arange(len(k)), k] + (root @ z[..., None])[..., 0]


def _mean_se(v: Tensor) -> tuple[Tensor, Tensor]:
    return v.mean(), v.std() / math.sqrt(v.numel())


def mixture_transition_kl_mc(data: GaussianMixture, process: Process, step_p: AffineStep, x_t: Tensor,
                             t: Tensor | float, s: Tensor | float, n: int,
                             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Monte Carlo ``KL(q(x_s | x_t) || p(x_s | x_t))`` at each row of ``x_t`` ``(B, d)`` against the Gaussian model
    transition ``step_p``, from ``n`` draws of ``q(x_s | x_t)`` (both log-densities exact). Returns the estimates
    ``(B,)`` and their standard errors ``(B,)``."""
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"n: expected an integer >= 2, got {n!r}")
    trans = mixture_reverse_transition(data, process, x_t, t, s)
    x_rep = x_t.to(F64).repeat(n, 1)
    rep = MixtureTransition(trans.log_weights.repeat(n, 1), trans.means.repeat(n, 1, 1), trans.covs)
    y = sample_mixture_transition(rep, generator)
    diff = (mixture_transition_log_prob(rep, y) - step_log_prob(step_p, y, x_rep)).reshape(n, -1)
    return diff.mean(0), diff.std(0) / math.sqrt(n)


def expected_mixture_transition_kl_mc(data: GaussianMixture, process: Process, step_p: AffineStep,
                                      t: Tensor | float, s: Tensor | float, n: int,
                                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Monte Carlo ``E_{q(x_t)} KL(q(x_s | x_t) || p(x_s | x_t))`` from ``n`` joint draws ``(x_t, x_s)``;
    returns ``(estimate, standard error)`` (float64 scalars)."""
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"n: expected an integer >= 2, got {n!r}")
    x_t = sample(data, process, n, _time(t, "t"), generator, dtype=F64)
    trans = mixture_reverse_transition(data, process, x_t, t, s)
    y = sample_mixture_transition(trans, generator)
    return _mean_se(mixture_transition_log_prob(trans, y) - step_log_prob(step_p, y, x_t))

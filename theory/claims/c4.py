"""C4 (check): DRO = AT. For ``x~ = x_t + delta`` with ``x0`` fixed, ``KL(q(x_{t-1} | x~, x0) || p_theta(x_{t-1} |
x~)) = c_t ||eps_theta(x~) - eps - delta / sigma_t||^2`` with ``c_t = beta_t^2 / (2 beta~_t alpha_t (1 - abar_t))``,
and a KL radius ``eta0`` is the l2 radius ``sqrt(2 eta0 (1 - abar_t))``. Built from pure functions of ``c_t``, a
radius and the two sides, so a test can feed a wrong quantity; checked against sympy in the full run."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from atdiff.losses import denoising_loss
from atdiff.param import predict
from atdiff.processes import Process, VPDiscrete
from theory.claims import Verdict, claim
from theory.claims.common import (
    F64,
    kl_ball_radius64,
    max_rel_error,
    new_generator,
    round_value,
    single_thread,
    symbolic_error,
)
from theory.gaussian import (
    kl_gaussians,
)
from theory.linear import (
    AffineEpsModel,
    constant_eps_model,
)


def c_t(process: VPDiscrete, t: Tensor) -> Tensor:
    """``c_t = beta_t^2 / (2 beta_tilde_t alpha_t (1 - abar_t))`` at integer times ``t >= 2`` ``(B,)`` (float64).

    ``beta_tilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)``; at ``t = 1`` it is 0 and the identity degenerates.
    """
    ti = t.long()
    beta = process.betas[ti - 1]
    abar, abar_prev = process.abar(t.double()), process.abar(t.double() - 1)
    beta_tilde = beta * (1 - abar_prev) / (1 - abar)
    return beta**2 / (2 * beta_tilde * (1 - beta) * (1 - abar))


def model_step_mean(x: Tensor, eps_pred: Tensor, process: VPDiscrete, t: Tensor) -> Tensor:
    """``mu_theta = (x_t - beta_t / sqrt(1 - abar_t) eps_theta) / sqrt(alpha_t)``. Shapes ``(B, d)``, ``t`` ``(B,)``."""
    beta = process.betas[t.long() - 1][:, None]
    sigma = process.sigma(t.double())[:, None]
    return (x - beta / sigma * eps_pred) / (1 - beta).sqrt()


def _kl_isotropic_many(cases: list[tuple[Tensor, Tensor, Tensor]]) -> list[Tensor]:
    """``KL(N(m0, var I) || N(m1, var I))`` per sample for several ``(m0 (B, d), m1 (B, d), var (B, 1))``, by
    :func:`kl_gaussians` as the sum of the 1-D KLs of the coordinates, in one batched call (small ``linalg``
    calls carry a fixed overhead each). Returns one ``(B,)`` tensor per case."""
    m0s, m1s, vs, shapes = [], [], [], []
    for m0, m1, var in cases:
        b, d = m0.shape
        m0s.append(m0.reshape(-1, 1))
        m1s.append(m1.reshape(-1, 1))
        vs.append(var.expand(b, d).reshape(-1, 1, 1))
        shapes.append((b, d))
    v = torch.cat(vs)
    kl = kl_gaussians(torch.cat(m0s), v, torch.cat(m1s), v)
    return [part.reshape(shape).sum(1) for part, shape in zip(kl.split([b * d for b, d in shapes]), shapes,
                                                               strict=True)]


def _kl_isotropic(m0: Tensor, m1: Tensor, var: Tensor) -> Tensor:
    """``KL(N(m0, var I) || N(m1, var I))`` per sample; ``m0``, ``m1`` ``(B, d)``, ``var`` ``(B, 1)``; ``(B,)``."""
    return _kl_isotropic_many([(m0, m1, var)])[0]


def dro_kl_terms(model: Callable, x0: Tensor, eps: Tensor, delta: Tensor, t: Tensor, process: VPDiscrete
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """The two Gaussians of C4's left side at ``x~ = x_t + delta``: means of ``q(x_{t-1} | x~, x0)`` and of
    ``p_theta(x_{t-1} | x~)`` ``(B, d)``, and their common variance ``beta_tilde_t`` ``(B, 1)``."""
    x_pert = process.add_noise(x0, eps, t) + delta
    mean_q, var = process.posterior(x_pert, x0, t, t - 1)
    eps_pred = predict(model, x_pert, t, process, "eps")
    return mean_q, model_step_mean(x_pert, eps_pred, process, t), var.reshape(-1, 1).expand(x0.shape[0], 1)


def dro_kl(model: Callable, x0: Tensor, eps: Tensor, delta: Tensor, t: Tensor, process: VPDiscrete) -> Tensor:
    """Left side of C4: ``KL(q(x_{t-1} | x~, x0) || p_theta(x_{t-1} | x~))`` at ``x~ = x_t + delta``, with
    ``p_theta`` of variance ``beta_tilde_t``. Shapes: ``x0, eps, delta`` ``(B, d)``, ``t`` ``(B,)``; returns
    ``(B,)``."""
    return _kl_isotropic(*dro_kl_terms(model, x0, eps, delta, t, process))


def at_kl_rhs(model: Callable, x0: Tensor, eps: Tensor, delta: Tensor, t: Tensor, process: VPDiscrete,
              c: Tensor) -> Tensor:
    """Right side of C4: ``c ||eps_theta(x~) - (eps + delta / sigma_t)||^2`` through the library's equivariant
    :func:`denoising_loss` (a mean over the ``d`` coordinates, hence the factor ``d``). Returns ``(B,)``."""
    d = x0[0].numel()
    return c * d * denoising_loss(model, x0, t, eps, process, delta=delta, target_mode="equivariant")




def shift_kl(mean: Tensor, delta: Tensor, sigma: Tensor) -> Tensor:
    """``KL(N(mean + delta, sigma^2 I) || N(mean, sigma^2 I))`` per sample by :func:`kl_gaussians` ``(B,)``."""
    return _kl_isotropic(mean + delta, mean, (sigma**2).reshape(-1, 1))


def radius_kl_error(eta0: float | Tensor, sigma: Tensor, direction: Tensor,
                    radius_fn: Callable[[float | Tensor, Tensor], Tensor]) -> float:
    """Relative error of ``KL = eta0`` for the mean shift ``radius_fn(eta0, sigma) * direction / ||direction||``.

    ``eta0`` a float or ``(B,)``, ``sigma`` ``(B,)``, ``direction`` ``(B, d)``. With the right radius
    ``sqrt(2 eta0) sigma`` the error is at rounding level.
    """
    unit = direction / direction.norm(dim=1, keepdim=True)
    delta = radius_fn(eta0, sigma)[:, None] * unit
    kl = shift_kl(torch.zeros_like(delta), delta, sigma)
    return max_rel_error(kl, torch.as_tensor(eta0, dtype=F64).expand_as(kl))




def _random_mlp(d: int, process: Process, gen: torch.Generator) -> nn.Module:
    """A small time-conditioned MLP (``atdiff.networks.MLP``) with random output weights, float64."""
    from atdiff.networks.mlp import MLP
    from atdiff.precond import DiffusionModel

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    net = MLP(d, hidden=16, depth=2, time_dim=16)
    nn.init.normal_(net.out.weight, std=0.5)
    nn.init.normal_(net.out.bias, std=0.5)
    return DiffusionModel(net, process).double().requires_grad_(False)


def _random_linear(d: int, gen: torch.Generator) -> AffineEpsModel:
    return constant_eps_model(torch.randn(d, d, generator=gen, dtype=F64) / math.sqrt(d),
                     torch.randn(d, generator=gen, dtype=F64))


def _c4_batch(process: VPDiscrete, d: int, n: int, gen: torch.Generator) -> tuple[Tensor, ...]:
    """Random ``x0, eps, delta`` ``(n, d)`` and integer times ``t`` ``(n,)`` in ``2..T`` (both ends included)."""
    t = torch.randint(2, process.T + 1, (n,), generator=gen).to(F64)
    t[0], t[-1] = 2.0, float(process.T)
    x0 = 2 * torch.randn(n, d, generator=gen, dtype=F64)
    eps = torch.randn(n, d, generator=gen, dtype=F64)
    delta = torch.rand(n, 1, generator=gen, dtype=F64) * torch.randn(n, d, generator=gen, dtype=F64)
    return x0, eps, delta, t


def scaled_error(lhs: Tensor, rhs: Tensor, scale: Tensor) -> float:
    """``max |lhs - rhs| / scale``: the error in units of the size of the terms it is computed from."""
    return float(((lhs - rhs).abs() / scale).max())


def c4_identity_errors(models: list[tuple[Callable, VPDiscrete, int]], n: int, gen: torch.Generator,
                       c_fn: Callable[[VPDiscrete, Tensor], Tensor] = c_t) -> list[tuple[float, float]]:
    """Errors of ``dro_kl = at_kl_rhs(c_fn)`` on ``n`` random ``(x0, eps, delta, t)`` for each ``(model, process,
    d)`` (the KLs of all cases in one batched call).

    Returns per case ``(max relative error, max scaled error)``; the scaled error divides by
    ``c (||eps_theta||^2 + ||eps + delta/sigma||^2)``, the size of the terms whose difference is squared, so it
    stays at rounding level where the residual (and the plain relative error's denominator) nearly vanishes.
    """
    terms, rhs, scales = [], [], []
    with torch.no_grad():
        for model, process, d in models:
            x0, eps, delta, t = _c4_batch(process, d, n, gen)
            c = c_fn(process, t)
            terms.append(dro_kl_terms(model, x0, eps, delta, t, process))
            rhs.append(at_kl_rhs(model, x0, eps, delta, t, process, c))
            x_pert = process.add_noise(x0, eps, t) + delta
            target = eps + delta / process.sigma(t)[:, None]
            scales.append(c * ((predict(model, x_pert, t, process, "eps") ** 2).sum(1) + (target**2).sum(1)))
    kls = _kl_isotropic_many(terms)
    return [(max_rel_error(r, kl), scaled_error(r, kl, sc)) for r, kl, sc in zip(rhs, kls, scales, strict=True)]




def symbolic_c4_check() -> dict[str, Any]:
    """``c_t`` and the KL radius against :mod:`theory.symbolic` (sympy): relative errors over all ``t`` of the
    linear and cosine schedules, and whether the sympy derivations verified themselves."""
    from theory import symbolic as sym  # sympy loads in ~1 s: only when a full run needs it

    errs = []
    for schedule in ("linear", "cosine"):
        p = VPDiscrete(schedule)
        t = torch.arange(2, p.T + 1, dtype=F64)
        errs.append(max_rel_error(torch.as_tensor(sym.c_t(p, t), dtype=F64), c_t(p, t)))
        radius = sym.derive_kl_radius()
        abar = p.abar(t)
        got = torch.as_tensor(radius.func(0.05, abar.numpy()), dtype=F64)
        errs.append(max_rel_error(got, kl_ball_radius64(0.05, (1 - abar).sqrt())))
    verified = sym.derive_dro_at_constant().verified and sym.derive_kl_radius().verified
    return {"symbolic_rel_error": max(errs), "symbolic_derivations_verified": bool(verified)}


@claim("C4")
@single_thread
def claim_c4(*, quick: bool, seed: int, out: Path | None) -> Verdict:
    """C4: the DRO = AT identity (random linear and MLP eps-models, linear and cosine schedules) and the
    KL-radius mapping ``||delta|| = sqrt(2 eta0 (1 - abar_t))``."""
    gen = new_generator(seed)
    dims, n = ((3,), 16) if quick else ((1, 3, 16), 64)
    cases, names = [], []
    for schedule in ("linear", "cosine"):
        process = VPDiscrete(schedule)
        for d in dims:
            cases += [(_random_linear(d, gen), process, d), (_random_mlp(d, process, gen), process, d)]
            names += [f"{schedule}/linear/d={d}", f"{schedule}/mlp/d={d}"]
    errors = dict(zip(names, c4_identity_errors(cases, n, gen), strict=True))
    sigmas, eta0s = [], []
    for schedule in ("linear", "cosine"):
        process = VPDiscrete(schedule)
        t = torch.randint(1, process.T + 1, (n,), generator=gen).to(F64)
        for eta0 in (1e-3, 0.05, 2.0):
            sigmas.append(process.sigma(t))
            eta0s.append(torch.full((n,), eta0, dtype=F64))
    sigma, eta0 = torch.cat(sigmas), torch.cat(eta0s)
    radius_err = radius_kl_error(eta0, sigma, torch.randn(len(sigma), 5, generator=gen, dtype=F64), kl_ball_radius64)
    identity_rel = max(e[0] for e in errors.values())
    identity_err = max(e[1] for e in errors.values())
    tol = 1e-11
    quantities: dict[str, Any] = {
        "identity_max_scaled_error": identity_err,
        "identity_max_rel_error": identity_rel,
        "radius_kl_max_rel_error": radius_err,
        "identity_rel_error_by_case": {k: round_value(v[0], 3) for k, v in errors.items()},
        "tolerance": tol,
        **({"symbolic_check": "skipped in quick mode (sympy derivation ~1.5 s)"} if quick else symbolic_c4_check()),
    }
    sym_err = 0.0 if quick else symbolic_error(quantities, ("symbolic_rel_error",), "symbolic_derivations_verified")
    worst = max(identity_err, radius_err, sym_err)
    return Verdict(
        id="C4", kind="check", relation="=",
        statement="KL(q(x_{t-1}|x~,x0) || p_theta(x_{t-1}|x~)) = c_t ||eps_theta(x~) - eps - delta/sqrt(1-abar_t)||^2, "
                  "c_t = beta_t^2/(2 beta_tilde alpha_t (1-abar_t)); KL radius eta0 <-> l2 radius "
                  "sqrt(2 eta0 (1-abar_t))",
        quantities=quantities, holds=worst < tol, margin=math.log10(tol) - math.log10(max(worst, 1e-300)),
        notes=f"float64, t uniform in 2..T (t = 1 has beta_tilde = 0), {n} samples per case; KL by kl_gaussians, "
              "the right side through atdiff.losses.denoising_loss(target_mode='equivariant'). The check uses the "
              "scaled error |KL - rhs| / (c_t (||eps_theta||^2 + ||target||^2)) (the plain relative error grows "
              "like 1/residual where eps_theta nearly equals the target, e.g. in 1-D); both are reported. Margin: "
              f"decades below the tolerance {tol:g}.")



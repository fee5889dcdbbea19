"""Reusable maths of adversarial training (AT) for linear eps-models on Gaussian data.

* the exact AT loss ``L_AT(a)`` of the eps-model ``a x`` over an l2 ball (1-D: :func:`l_at_1d`; shared scalar in
  ``d`` dimensions: :func:`l_at_shared`) and its exact minimiser (:func:`at_minimiser_1d`);
* the exact sup of a quadratic over an l2 ball (:func:`trust_region_sup`);
* the Bayes slopes under random perturbations (equivariant random delta, Input Perturbation).

Wang et al. 2025, Sec. 4 (linear-Gaussian analysis); see ``docs/claims.md`` (C5-C7).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

F64 = torch.float64


def folded_normal_mean(mu: Tensor, var: Tensor) -> Tensor:
    """``E|r|`` for ``r ~ N(mu, var)``: ``sqrt(2 var / pi) exp(-mu^2 / (2 var)) + mu erf(mu / sqrt(2 var))``."""
    sd = var.sqrt()
    return sd * math.sqrt(2 / math.pi) * torch.exp(-(mu**2) / (2 * var)) + mu * torch.erf(mu / (sd * math.sqrt(2)))


def l_at_1d(a: Tensor, alpha: Tensor, sigma: Tensor, lam: Tensor, eta: Tensor, mean: Tensor | float = 0.0
            ) -> Tensor:
    """Exact ``E max_{|delta| <= eta} (a (x_t + delta) - eps - delta / sigma)^2`` for 1-D data ``N(mean, lam)``
    and the eps-model ``a x`` (broadcasting tensors; float64).

    With ``r = a x_t - eps ~ N(a alpha mean, V)``, ``V = a^2 (alpha^2 lam + sigma^2) - 2 a sigma + 1``, the inner
    maximum is ``(|r| + eta |a - 1/sigma|)^2``, so ``L = E r^2 + 2 eta |a - 1/sigma| E|r| + eta^2 (a - 1/sigma)^2``.
    For ``mean = 0`` this is the paper's C5 formula with ``E|r| = sqrt(2 V / pi)``.
    """
    m = a - 1 / sigma
    mu = a * alpha * mean
    var = a**2 * (alpha**2 * lam + sigma**2) - 2 * a * sigma + 1
    return var + mu**2 + 2 * eta * m.abs() * folded_normal_mean(mu, var) + eta**2 * m**2


def expected_norm_diag(var: Tensor, points: int = 241) -> Tensor:
    """``E||r||`` for ``r ~ N(0, diag(var))``, ``var`` ``(..., d)`` -> ``(...)``, by quadrature of
    ``E sqrt(Q) = (2 sqrt(pi))^{-1} int_0^inf (1 - prod_i (1 + 2 u var_i)^{-1/2}) u^{-3/2} du`` in ``y = log u``.

    The integrand is analytic in a strip of half-width ``pi`` around the real ``y`` axis and decays like
    ``exp(-|y|/2)``, so the trapezoid rule on ``[-80, 80]`` (step 2/3) is accurate to ~1e-13 relative for
    variances in ``[1e-8, 1e8]``.
    """
    y = torch.linspace(-80.0, 80.0, points, dtype=F64)
    u = y.exp()
    log_p = -0.5 * torch.log1p(2 * u[:, None] * var[..., None, :]).sum(-1)  # (..., points)
    integrand = -torch.expm1(log_p) * (-0.5 * y).exp()
    return torch.trapezoid(integrand, y, dim=-1) / (2 * math.sqrt(math.pi))


def l_at_shared(a: Tensor, alpha: Tensor, sigma: Tensor, lam: Tensor, radius: Tensor) -> Tensor:
    """Exact l2-ball AT loss of the shared-scalar eps-model ``a x`` on zero-mean data ``N(0, diag(lam))``.

    ``a``, ``alpha``, ``sigma``, ``radius`` broadcast to a batch shape ``(n,)``; ``lam`` ``(d,)``. The residual is
    ``r + (a - 1/sigma) delta`` with ``r = a x_t - eps ~ N(0, diag(V))``; the direction is isotropic, so the sup
    over ``||delta|| <= radius`` is ``(||r|| + radius |a - 1/sigma|)^2`` and
    ``L = sum V + 2 radius |a - 1/sigma| E||r|| + radius^2 (a - 1/sigma)^2``. Returns ``(n,)``.
    """
    a, alpha, sigma, radius = (x.reshape(-1, 1) for x in torch.broadcast_tensors(a, alpha, sigma, radius))
    var = a**2 * (alpha**2 * lam + sigma**2) - 2 * a * sigma + 1  # (n, d)
    m = (a - 1 / sigma)[:, 0]
    r = radius[:, 0]
    return var.sum(-1) + 2 * r * m.abs() * expected_norm_diag(var) + r**2 * m**2


def minimise_convex(f: Callable[[Tensor], Tensor], lo: Tensor, hi: Tensor, iters: int = 60) -> Tensor:
    """Golden-section search, vectorised: the minimiser of a convex ``f`` (elementwise over the shape of ``lo``)
    in ``[lo, hi]``; ``f`` maps a tensor of that shape to one of that shape."""
    inv_phi = (math.sqrt(5) - 1) / 2
    a, b = lo.clone(), hi.clone()
    c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        left = fc < fd  # minimiser in [a, d]
        b = torch.where(left, d, b)
        a = torch.where(left, a, c)
        c_new = b - inv_phi * (b - a)
        d_new = a + inv_phi * (b - a)
        c, d = torch.where(left, c_new, d), torch.where(left, c, d_new)
        fc, fd = torch.where(left, f(c_new), fd), torch.where(left, fc, f(d_new))
    return 0.5 * (a + b)


def between_margin(a_at: Tensor, a_star: Tensor, inv_sigma: Tensor) -> float:
    """The smallest relative slack of ``a_star <= a_at <= inv_sigma``: ``min(a_at - a*, 1/sigma - a_at) /
    (1/sigma - a*)`` over all entries (``>= 0`` when the numerical AT minimiser lies between the two)."""
    width = inv_sigma - a_star
    return float(torch.minimum(a_at - a_star, inv_sigma - a_at).div(width).min())


def subgradient(loss: Callable[[Tensor], Tensor], a: Tensor) -> Tensor:
    """``d loss / d a`` elementwise by autograd (at a kink of ``|.|`` torch returns the mid subgradient)."""
    a = a.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(loss(a).sum(), a)
    return g


def bracket_margin(loss: Callable[[Tensor], Tensor], lo: Tensor, hi: Tensor) -> float:
    """For a convex ``loss``: a minimiser lies in ``[lo, hi]`` if ``loss'(lo) <= 0 <= loss'(hi)`` (subgradients).

    Returns ``min(-loss'(lo), loss'(hi))`` over all entries (``>= 0``: the bracket holds). Exact up to rounding,
    unlike the position of a numerical minimiser.
    """
    g_lo, g_hi = subgradient(loss, lo), subgradient(loss, hi)
    return float(torch.minimum(-g_lo, g_hi).min())


def bayes_slope(alpha: Tensor, sigma: Tensor, lam: Tensor, mean: Tensor | float = 0.0) -> Tensor:
    """The least-squares slope of the bias-free eps-model ``a x`` on 1-D data ``N(mean, lam)``:
    ``sigma / (alpha^2 (lam + mean^2) + sigma^2)`` (the Bayes ``a* = sigma / v`` when ``mean = 0``)."""
    return sigma / (alpha**2 * (lam + mean**2) + sigma**2)


def snap_to_kink(a_min: Tensor, loss: Callable[[Tensor], Tensor], kink: Tensor, jump: Tensor) -> Tensor:
    """Put a numerical minimiser ``a_min`` exactly on the kink of a convex ``loss`` when the kink is the minimiser.

    At the kink ``|a - kink|`` has the subdifferential ``[-1, 1]``, so ``loss``'s is ``[g - jump, g + jump]`` with
    ``g`` the autograd value there (torch's ``abs'(0) = 0``) and ``jump`` the coefficient of ``|a - kink|``.
    If it holds 0 the kink is the exact minimiser, which a golden-section search only approaches to rounding.
    """
    g = subgradient(loss, kink)
    at_kink = (g - jump <= 0) & (g + jump >= 0)
    return torch.where(at_kink, kink, a_min)


def at_minimiser_1d(alpha: Tensor, sigma: Tensor, lam: Tensor, eta: Tensor, mean: Tensor | float = 0.0) -> Tensor:
    """The exact minimiser of :func:`l_at_1d` over ``a`` (broadcast shape of the arguments): golden section on the
    convex loss, then :func:`snap_to_kink` at ``a = 1/sigma``."""
    a_ls = bayes_slope(alpha, sigma, lam, mean)
    shape = torch.broadcast_shapes(a_ls.shape, torch.as_tensor(eta).shape)
    a_ls = a_ls.expand(shape)

    def loss(a: Tensor) -> Tensor:
        return l_at_1d(a, alpha, sigma, lam, eta, mean)

    lo, hi = torch.minimum(a_ls, 0 * a_ls) - 1, (2 / sigma + 1).expand(shape)
    kink = (1 / sigma).expand(shape)
    var = kink**2 * (alpha**2 * lam + sigma**2) - 2 * kink * sigma + 1
    jump = 2 * eta * folded_normal_mean(kink * alpha * mean, var)
    return snap_to_kink(minimise_convex(loss, lo, hi), loss, kink, jump.expand(shape))




def trust_region_sup(r: Tensor, m: Tensor, radius: float, iters: int = 100) -> Tensor:
    """``max_{||delta|| <= radius} ||r + diag(m) delta||^2`` per sample (``r`` ``(B, d)``, ``m`` ``(d,)``).

    The maximiser is ``delta = (mu - m^2)^{-1} m r`` with ``mu > max m^2`` fixed by ``||delta|| = radius``
    (bisection in ``mu``; the norm decreases on that half-line).
    """
    m2 = m**2
    top = float(m2.max())

    def norm(mu: Tensor) -> Tensor:
        return ((m * r) / (mu[:, None] - m2)).norm(dim=1)

    lo = torch.full((r.shape[0],), top, dtype=F64) * (1 + 1e-15) + 1e-300
    hi = torch.full_like(lo, top + float((m.abs() * r.abs()).norm(dim=1).max()) / radius + 1.0)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        big = norm(mid) > radius
        lo, hi = torch.where(big, mid, lo), torch.where(big, hi, mid)
    mu = 0.5 * (lo + hi)
    delta = (m * r) / (mu[:, None] - m2)
    delta = delta * (radius / delta.norm(dim=1, keepdim=True))
    return ((r + m * delta) ** 2).sum(1)



def clean_slope(alpha: Tensor, sigma: Tensor, lam: Tensor) -> Tensor:
    """Bayes eps-predictor of clean training per data eigenvalue ``lam``: ``sigma / (alpha^2 lam + sigma^2)``."""
    return sigma / (alpha**2 * lam + sigma**2)


def reference_slope(alpha: Tensor, sigma_ref: Tensor, lam: Tensor) -> Tensor:
    """Bayes eps-predictor of the perturbed input's own law ``alpha x0 + sigma_ref eps'`` (noise level
    ``sigma_ref``, same ``alpha``): ``sigma_ref / (alpha^2 lam + sigma_ref^2)``."""
    return clean_slope(alpha, sigma_ref, lam)


def equivariant_random_slope(alpha: Tensor, sigma: Tensor, lam: Tensor, c: Tensor) -> Tensor:
    """Bayes predictor for ``x~ = x_t + c xi``, target ``eps + c xi / sigma``: ``(sigma'/sigma) * reference_slope``
    with ``sigma' = sqrt(sigma^2 + c^2)`` (the target is ``(sigma'/sigma) eps'``, ``eps'`` the noise of ``x~``)."""
    sig_ref = (sigma**2 + c**2).sqrt()
    return sig_ref / sigma * reference_slope(alpha, sig_ref, lam)


def ip_slope(alpha: Tensor, sigma: Tensor, lam: Tensor, gamma: Tensor) -> Tensor:
    """Bayes predictor of Input Perturbation, ``x~ = alpha x0 + sigma (eps + gamma xi)``, target ``eps``:
    ``reference_slope / sqrt(1 + gamma^2)`` at ``sigma' = sigma sqrt(1 + gamma^2)`` (``eps`` has correlation
    ``1/sqrt(1+gamma^2)`` with the noise ``eps'`` of ``x~`` and the rest is independent of ``x~``)."""
    sig_ref = sigma * (1 + gamma**2).sqrt()
    return reference_slope(alpha, sig_ref, lam) / (1 + gamma**2).sqrt()


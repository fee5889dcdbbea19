"""The paper's free adversarial training (Wang et al. 2025, Algorithm 1) for diagonal linear eps-models, in
population, and the slopes of the other arms compared with it in C5 (``docs/claims.md``).

Free AT draws ``(t, eps)`` once per minibatch and makes ``K`` passes; pass ``k`` evaluates the loss at
``x_t + delta_k`` against the *detached* equivariant target ``eps + sg(delta_k) / sigma_t``, steps the weights with
its gradient, and (for ``k < K - 1``) moves ``delta`` by an l2-normalised step of length ``h`` along the delta
gradient ``2 A r_k`` (``r_k`` the residual; ``delta_0 = 0``). The reference projection (radius ``0.1 sqrt(d)``)
never acts when ``(K - 1) h`` is below it (C8), so it is left out here.

For the eps-model ``eps = a * x`` (``a`` per coordinate, or one scalar shared by all coordinates) and a small
learning rate, the weights settle where the sum over passes of the expected weight gradients vanishes:
``sum_k E[(a y_k - eps - delta_k / sigma) y_k] = 0`` with ``y_k = x_t + delta_k``, where ``delta_k`` itself
depends on ``a``. That is a fixed point, not the minimiser of any fixed objective (C7: the detached step does not
ascend the full AT loss). :func:`free_at_fixed_point` solves ``a = update(a)``, ``update(a) = sum_k E[(eps +
delta_k / sigma) y_k] / sum_k E[y_k^2]``, on common random numbers, and returns the fixed point's ratio to the
least-squares slope of the same sample times the exact least-squares slope (the sampling noise of the two largely
cancels).

The step is normalised as the reference code and ``atdiff.perturb`` do: ``g / max(||g||, 1e-8)`` (a sample whose
delta gradient is below 1e-8 takes a shorter step; with Gaussian data that has probability ~0).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from atdiff.perturb import GRAD_NORM_FLOOR

__all__ = ["free_at_deltas", "free_at_fixed_point", "least_squares_slope", "ip_matched_slope", "es_matched_slope"]


def free_at_deltas(a: Tensor, x_t: Tensor, eps: Tensor, sigma: Tensor, step: float, replay: int) -> list[Tensor]:
    """The ``replay`` perturbations ``delta_0 = 0, delta_1, ...`` of one free-AT minibatch at frozen slopes.

    ``a`` ``(T, 1, d)``, ``x_t`` and ``eps`` ``(T, n, d)``, ``sigma`` ``(T, 1, 1)``; each step is
    ``h g / ||g||`` per sample with ``g = a * (a y - eps - delta / sigma)`` (the detached-target delta gradient up
    to a positive factor). Returns ``replay`` tensors ``(T, n, d)``.
    """
    delta = torch.zeros_like(x_t)
    out = [delta]
    for _ in range(replay - 1):
        g = a * (a * (x_t + delta) - eps - delta / sigma)
        norm = g.norm(dim=-1, keepdim=True).clamp_min(GRAD_NORM_FLOOR)
        delta = delta + step * g / norm
        out.append(delta)
    return out


def least_squares_slope(alpha: Tensor, sigma: Tensor, lam: Tensor, mean: Tensor, shared: bool) -> Tensor:
    """The least-squares slope of ``eps = a * x`` on ``x_t = alpha x0 + sigma eps``, ``x0 ~ N(mean, diag(lam))``:
    ``sigma / (alpha^2 (lam + mean^2) + sigma^2)`` per coordinate, or with sums over coordinates when ``shared``.
    ``alpha``, ``sigma`` ``(T,)``; ``lam``, ``mean`` ``(d,)``; returns ``(T, d)``."""
    al, sg = alpha[:, None], sigma[:, None]
    second = al**2 * (lam + mean**2) + sg**2  # E x_t^2 per coordinate
    if shared:
        d = lam.shape[0]
        return (d * sg / second.sum(1, keepdim=True)).expand(-1, d)
    return sg / second


def free_at_fixed_point(alpha: Tensor, sigma: Tensor, lam: Tensor, mean: Tensor, step: float, *, replay: int = 3,
                        shared: bool = False, n: int = 20_000, generator: torch.Generator | None = None,
                        iters: int = 30, tol: float = 1e-6) -> Tensor:
    """The population fixed point of free AT (module docstring) for ``eps = a * x`` on ``N(mean, diag(lam))``.

    ``alpha``, ``sigma`` ``(T,)`` (the times), ``lam``, ``mean`` ``(d,)``, ``step`` the l2 step length ``h``,
    ``replay`` ``K``, ``shared`` one slope for all coordinates. ``n`` Monte Carlo draws, shared by all times.
    Solved by elementwise secant steps on ``update(a) - a`` (the plain iteration converges slowly at small
    ``sigma``), stopping after ``iters`` rounds or once the residual is below ``tol`` relative to ``a``.
    Returns the slopes ``(T, d)`` (float64).
    """
    if replay < 1 or n < 2 or step < 0:
        raise ValueError(f"replay, n, step: expected replay >= 1, n >= 2, step >= 0, got {replay}, {n}, {step}")
    dtype = torch.float64
    alpha, sigma, lam, mean = (torch.as_tensor(v, dtype=dtype) for v in (alpha, sigma, lam, mean))
    d = lam.shape[0]
    x0 = mean + torch.randn(n, d, generator=generator, dtype=dtype) * lam.sqrt()
    eps = torch.randn(n, d, generator=generator, dtype=dtype)
    al, sg = alpha[:, None, None], sigma[:, None, None]
    x_t = al * x0 + sg * eps  # (T, n, d)
    dims = (1, 2) if shared else (1,)

    def ratio(num: Tensor, den: Tensor) -> Tensor:
        return (num.sum(dims) / den.sum(dims)).reshape(len(alpha), -1).expand(-1, d)

    def update(a: Tensor) -> Tensor:
        deltas = free_at_deltas(a[:, None, :], x_t, eps, sg, step, replay)
        num = sum((eps + dl / sg) * (x_t + dl) for dl in deltas)
        den = sum((x_t + dl) ** 2 for dl in deltas)
        return ratio(num, den)

    a_ls_mc = ratio(eps * x_t, x_t**2)
    # secant steps on F(a) = update(a) - a, elementwise (the coupling between coordinates through the l2 norm is
    # weak); a plain fixed-point step wherever the secant slope is unusable
    a_prev, f_prev = a_ls_mc, update(a_ls_mc) - a_ls_mc
    a = a_prev + f_prev
    for _ in range(iters):
        f = update(a) - a
        if float((f / a).abs().max()) < tol:
            break
        slope = (f - f_prev) / (a - a_prev)
        usable = (slope < -0.05) & torch.isfinite(slope)
        a_next = torch.where(usable, a - f / torch.where(usable, slope, -torch.ones_like(slope)), a + f)
        a_prev, f_prev, a = a, f, a_next
    return a / a_ls_mc * least_squares_slope(alpha, sigma, lam, mean, shared)


def ip_matched_slope(alpha: Tensor, sigma: Tensor, lam: Tensor, mean: Tensor, rho: float, shared: bool) -> Tensor:
    """Least-squares slope of Input Perturbation (Ning et al. 2023) with ``gamma = rho``: the input
    ``alpha x0 + sigma (eps + rho xi)``, target ``eps``: ``sigma / (alpha^2 (lam + mean^2) + sigma^2 (1 + rho^2))``
    (with sums over coordinates when ``shared``). Shapes as :func:`least_squares_slope`."""
    return least_squares_slope(alpha, sigma * math.sqrt(1 + rho**2), lam, mean, shared) / math.sqrt(1 + rho**2)


def es_matched_slope(alpha: Tensor, sigma: Tensor, lam: Tensor, mean: Tensor, rho: float, shared: bool) -> Tensor:
    """Epsilon scaling (Ning et al. 2024) of the least-squares model with the constant ``lambda = 1 + rho^2``: the
    slope divided by ``lambda`` (IP's shrink factor where noise dominates). Shapes as :func:`least_squares_slope`."""
    return least_squares_slope(alpha, sigma, lam, mean, shared) / (1 + rho**2)

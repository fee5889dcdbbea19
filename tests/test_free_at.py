"""The free-AT population fixed point and the matched-strength slopes of C5 (``theory.free_at``), against
independent Monte Carlo and hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from atdiff.processes import VPDiscrete
from theory.free_at import es_matched_slope, free_at_deltas, free_at_fixed_point, ip_matched_slope, least_squares_slope

F64 = torch.float64
P = VPDiscrete("linear")


def f64(v):
    return torch.as_tensor(v, dtype=F64)


def test_first_free_at_step_in_one_dimension_is_a_signed_step_by_hand():
    a, sigma = f64([[[0.8]]]), f64([[[0.5]]])
    x_t, eps = f64([[[1.0], [-2.0], [0.1]]]), f64([[[0.2], [0.3], [0.9]]])
    d0, d1, d2 = free_at_deltas(a, x_t, eps, sigma, 0.1, 3)
    r0 = 0.8 * x_t - eps  # residual at delta = 0; the detached gradient is 2 a r0
    assert torch.equal(d0, torch.zeros_like(x_t))
    assert torch.allclose(d1, 0.1 * torch.sign(r0))
    r1 = 0.8 * (x_t + d1) - eps - d1 / 0.5
    assert torch.allclose(d2, d1 + 0.1 * torch.sign(r1))


def test_without_perturbation_passes_the_fixed_point_is_least_squares():
    t = f64([50.0, 300.0, 900.0])
    lam, mean = f64([0.04, 1.0, 3.0]), f64([0.0, 0.5, -1.0])
    ls = least_squares_slope(P.alpha(t), P.sigma(t), lam, mean, shared=False)
    for kw in ({"replay": 1}, {"replay": 3, "step": 0.0}):
        step = kw.pop("step", 0.1)
        a = free_at_fixed_point(P.alpha(t), P.sigma(t), lam, mean, step, n=500,
                                generator=torch.Generator().manual_seed(0), **kw)
        assert torch.allclose(a, ls, rtol=1e-12)


@pytest.mark.parametrize("shared", [False, True])
def test_the_fixed_point_zeroes_the_summed_weight_gradient_on_fresh_samples(shared):
    t = f64([100.0, 400.0])
    alpha, sigma = P.alpha(t), P.sigma(t)
    lam, mean = f64([0.25, 2.0]), f64([0.0, 0.0])
    a = free_at_fixed_point(alpha, sigma, lam, mean, 0.1, shared=shared, n=20_000,
                            generator=torch.Generator().manual_seed(1))
    if shared:
        assert torch.allclose(a[:, 0], a[:, 1])
    g = torch.Generator().manual_seed(2)
    n = 200_000
    x0 = mean + torch.randn(n, 2, generator=g, dtype=F64) * lam.sqrt()
    eps = torch.randn(n, 2, generator=g, dtype=F64)
    x_t = alpha[:, None, None] * x0 + sigma[:, None, None] * eps
    deltas = free_at_deltas(a[:, None, :], x_t, eps, sigma[:, None, None], 0.1, 3)
    grad = sum((a[:, None, :] * (x_t + dl) - eps - dl / sigma[:, None, None]) * (x_t + dl) for dl in deltas)
    if shared:
        grad = grad.sum(-1, keepdim=True)
    mean_grad, se = grad.mean(1), grad.std(1) / math.sqrt(n)
    assert ((mean_grad / se).abs() < 5).all(), mean_grad / se
    # and the fixed point is not the least-squares slope: the test can fail
    ls = least_squares_slope(alpha, sigma, lam, mean, shared)
    assert ((a - ls).abs() / ls > 0.01).any()


def test_ip_slope_matches_a_monte_carlo_regression():
    t, rho = f64([200.0]), 0.3
    alpha, sigma = P.alpha(t), P.sigma(t)
    lam, mean = f64([0.5]), f64([1.0])
    g = torch.Generator().manual_seed(3)
    n = 400_000
    x0 = mean + torch.randn(n, generator=g, dtype=F64) * lam.sqrt()
    eps, xi = torch.randn(n, generator=g, dtype=F64), torch.randn(n, generator=g, dtype=F64)
    y = alpha * x0 + sigma * (eps + rho * xi)
    slope = (eps * y).mean() / (y * y).mean()  # least squares of the bias-free model
    assert float(ip_matched_slope(alpha, sigma, lam, mean, rho, False)[0, 0]) == pytest.approx(float(slope), rel=0.01)


def test_es_divides_the_least_squares_slope():
    t = f64([10.0, 500.0])
    ls = least_squares_slope(P.alpha(t), P.sigma(t), f64([1.0]), f64([0.0]), False)
    es = es_matched_slope(P.alpha(t), P.sigma(t), f64([1.0]), f64([0.0]), 0.13, False)
    assert torch.allclose(ls / es, torch.full_like(ls, 1.0169))


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="^replay, n, step"):
        free_at_fixed_point(f64([0.9]), f64([0.4]), f64([1.0]), f64([0.0]), 0.1, replay=0)

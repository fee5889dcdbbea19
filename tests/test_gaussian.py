"""Tests of the Gaussian / Gaussian-mixture oracle in ``theory.gaussian`` against independent computations."""

import math

import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import torch
from hypothesis import given
from hypothesis import strategies as st

from atdiff.param import predict
from atdiff.processes import VE, VPContinuous, VPDiscrete
from theory.gaussian import (
    Gaussian,
    GaussianMixture,
    eps_star,
    flow_map,
    kl_gaussians,
    linear_eps_loss,
    linear_eps_star,
    log_prob,
    marginal,
    oracle_model,
    sample,
    score,
    w2_gaussians,
    x0_star,
)

F64 = torch.float64
PROCESSES = [VPDiscrete("linear"), VPDiscrete("cosine"), VPContinuous(), VE()]
IDS = ["vp-linear", "vp-cosine", "vp-continuous", "ve"]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_spd(d: int, g: torch.Generator, floor: float = 0.1) -> torch.Tensor:
    a = torch.randn(d, d, generator=g, dtype=F64)
    return a @ a.T / d + floor * torch.eye(d, dtype=F64)


def gaussian3(seed: int = 0) -> Gaussian:
    g = gen(seed)
    return Gaussian(torch.randn(3, generator=g, dtype=F64), random_spd(3, g))


def mixture2(seed: int = 0) -> GaussianMixture:
    g = gen(seed)
    covs = torch.stack([random_spd(2, g) * 0.5 for _ in range(3)])
    return GaussianMixture([0.2, 0.5, 0.3], 2.0 * torch.randn(3, 2, generator=g, dtype=F64), covs)


def mixture1() -> GaussianMixture:
    return GaussianMixture([0.3, 0.5, 0.2], [[-2.0], [0.5], [3.0]], [[[0.3]], [[0.6]], [[0.1]]])


def random_times(process, n: int, g: torch.Generator, t_min: float = 0.0) -> torch.Tensor:
    """Times in ``[t_min, t_max]``; integer-valued (int64) for discrete processes."""
    u = torch.rand(n, generator=g, dtype=F64)
    if isinstance(process, VPDiscrete):
        return (t_min + u * (process.T - t_min)).round().long()
    return t_min + u * (process.t_max - t_min)


def marginal_cov(data: Gaussian, process, t) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form mean and covariance of q(x_t) for Gaussian data, written out independently."""
    a, s = process.alpha(torch.as_tensor(t, dtype=F64)), process.sigma(torch.as_tensor(t, dtype=F64))
    return a * data.mean, a**2 * data.cov + s**2 * torch.eye(data.dim, dtype=F64)


def mixture_moments(data: GaussianMixture, process, t) -> tuple[torch.Tensor, torch.Tensor]:
    a, s = process.alpha(torch.as_tensor(t, dtype=F64)), process.sigma(torch.as_tensor(t, dtype=F64))
    mu_k = a * data.means
    cov_k = a**2 * data.covs + s**2 * torch.eye(data.dim, dtype=F64)
    mean = (data.weights[:, None] * mu_k).sum(0)
    second = (data.weights[:, None, None] * (cov_k + mu_k[:, :, None] * mu_k[:, None, :])).sum(0)
    return mean, second - torch.outer(mean, mean)


# ------------------------------------------------------------------------------------------------------------
# score, eps*, x0*
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
@pytest.mark.parametrize("data", [gaussian3(), mixture2()], ids=["gaussian", "mixture"])
def test_score_is_gradient_of_log_prob(process, data):
    g = gen(1)
    n = 64
    t = random_times(process, n, g)
    x = 3.0 * torch.randn(n, data.dim, generator=g, dtype=F64)
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(log_prob(data, process, x, t).sum(), x)
    torch.testing.assert_close(score(data, process, x.detach(), t), grad, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
def test_eps_star_gaussian_closed_form(process):
    data = gaussian3(2)
    g = gen(3)
    for t in random_times(process, 5, g):
        x = torch.randn(7, 3, generator=g, dtype=F64)
        mean, cov = marginal_cov(data, process, t)
        expected = process.sigma(t.double()) * torch.linalg.solve(cov, (x - mean).T).T
        torch.testing.assert_close(eps_star(data, process, x, t), expected, rtol=1e-9, atol=1e-12)
        # x0* is the Gaussian posterior mean m + alpha S C^{-1} (x - alpha m)
        a = process.alpha(t.double())
        x0 = data.mean + a * (data.cov @ torch.linalg.solve(cov, (x - mean).T)).T
        torch.testing.assert_close(x0_star(data, process, x, t), x0, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("process,t", [(VPDiscrete("linear"), 150), (VPDiscrete("cosine"), 400),
                                       (VPContinuous(), 0.3), (VE(), 0.7)], ids=IDS)
def test_eps_star_mixture_1d_by_quadrature(process, t):
    """E[eps | x_t] = int (x_t - alpha x0)/sigma p(x0 | x_t) dx0 on a dense x0 grid (posterior by Bayes' rule)."""
    data = mixture1()
    t = torch.tensor(t)
    a, s = process.alpha(t.double()).item(), process.sigma(t.double()).item()
    x0 = np.linspace(-8.0, 8.0, 200_001)
    prior = sum(w * np.exp(-0.5 * (x0 - m) ** 2 / v) / math.sqrt(2 * math.pi * v)
                for w, m, v in zip(data.weights.tolist(), data.means[:, 0].tolist(), data.covs[:, 0, 0].tolist(),
                                   strict=True))
    xs = torch.tensor([-3.0, -1.0, 0.0, 0.4, 1.7, 3.5], dtype=F64)
    expected = []
    for xt in xs.tolist():
        post = prior * np.exp(-0.5 * (xt - a * x0) ** 2 / s**2)
        eps = (xt - a * x0) / s
        expected.append(np.trapezoid(eps * post, x0) / np.trapezoid(post, x0))
    got = eps_star(data, process, xs[:, None], t)[:, 0]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=F64), rtol=1e-6, atol=1e-7)


def test_outputs_follow_x_dtype_and_time_shapes():
    data, process = mixture2(), VPDiscrete("linear")
    x = torch.randn(5, 2)
    for t in (torch.tensor(10), torch.tensor(10.0), torch.tensor([1, 2, 3, 4, 5]), torch.tensor([7])):
        for fn in (score, eps_star, x0_star):
            out = fn(data, process, x, t)
            assert out.dtype == torch.float32 and out.shape == (5, 2)
        assert log_prob(data, process, x, t).shape == (5,)
    with pytest.raises(ValueError, match="^t[:,]"):
        score(data, process, x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="^t[:,]"):
        score(data, process, x, torch.tensor(1001))
    with pytest.raises(ValueError, match="^x[:,]"):
        score(data, process, torch.randn(5, 3), torch.tensor(1))


def test_eps_star_is_zero_at_t0_and_x0_star_is_identity():
    data = mixture2()
    x = torch.randn(4, 2, dtype=F64)
    for process in PROCESSES:
        t0 = torch.tensor(0)
        assert torch.equal(eps_star(data, process, x, t0), torch.zeros_like(x))
        torch.testing.assert_close(x0_star(data, process, x, t0), x)


def test_mixture_score_is_stable_far_from_the_modes():
    data, process = mixture2(), VE()
    x = torch.tensor([[1e3, -1e3], [0.0, 5e2]], dtype=F64)
    s = score(data, process, x, torch.tensor(0.01))
    assert torch.isfinite(s).all()
    lp = log_prob(data, process, x, torch.tensor(0.01))
    assert torch.isfinite(lp).all()


# ------------------------------------------------------------------------------------------------------------
# densities and sampling
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("process,t", [(VPDiscrete("linear"), 0), (VPDiscrete("cosine"), 30), (VPContinuous(), 0.5),
                                       (VE(), 0.0), (VE(), 3.0)])
def test_mixture_log_prob_integrates_to_one_1d(process, t):
    data = mixture1()
    t = torch.tensor(t)

    def density(x: float) -> float:
        return math.exp(log_prob(data, process, torch.tensor([[x]], dtype=F64), t).item())

    breaks = [-2.0, 0.5, 3.0]
    total, _ = scipy.integrate.quad(density, -60.0, 60.0, points=breaks, limit=200, epsabs=1e-12, epsrel=1e-10)
    assert total == pytest.approx(1.0, abs=1e-7)


@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
def test_log_prob_equals_that_of_the_marginal_law(process):
    data, g = mixture2(4), gen(5)
    t = random_times(process, 1, g, t_min=1)[0]
    x = torch.randn(9, 2, generator=g, dtype=F64)
    q_t = marginal(data, process, t)
    assert isinstance(q_t, GaussianMixture)
    torch.testing.assert_close(log_prob(data, process, x, t), log_prob(q_t, process, x, torch.tensor(0)))
    gq = marginal(gaussian3(), process, t)
    mean, cov = marginal_cov(gaussian3(), process, t)
    torch.testing.assert_close(gq.mean, mean)
    torch.testing.assert_close(gq.cov, cov)


def assert_moments(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, n_sigma: float = 5.0) -> None:
    """Sample mean and covariance within ``n_sigma`` Monte-Carlo standard errors (estimated from the sample)."""
    n = x.shape[0]
    torch.testing.assert_close(x.mean(0), mean, rtol=0, atol=float(n_sigma * (cov.diagonal().max() / n).sqrt()))
    c = x - mean
    prods = c[:, :, None] * c[:, None, :]
    se = prods.std(0) / math.sqrt(n)
    assert ((prods.mean(0) - cov).abs() <= n_sigma * se + 1e-12).all(), (prods.mean(0), cov)


@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
def test_sample_moments_match_closed_form(process):
    g = gen(6)
    t = random_times(process, 1, g, t_min=1)[0]
    data = gaussian3()
    x = sample(data, process, 40_000, t, generator=g, dtype=F64)
    assert_moments(x, *marginal_cov(data, process, t))
    mix = mixture2()
    x = sample(mix, process, 40_000, t, generator=g, dtype=F64)
    assert_moments(x, *mixture_moments(mix, process, t))
    # t = 0 gives the data
    x = sample(mix, process, 40_000, torch.tensor(0), generator=g, dtype=F64)
    assert_moments(x, *mixture_moments(mix, process, 0))


def test_sample_with_per_sample_times_and_default_dtype():
    data, process = gaussian3(), VE()
    t = torch.cat([torch.zeros(20_000, dtype=F64), torch.full((20_000,), 4.0, dtype=F64)])
    x = sample(data, process, 40_000, t, generator=gen(7))
    assert x.dtype == torch.get_default_dtype() and x.shape == (40_000, 3)
    assert_moments(x[:20_000].double(), data.mean, data.cov)
    assert_moments(x[20_000:].double(), *marginal_cov(data, process, 4.0))


def test_mixture_mode_frequencies():
    mix = GaussianMixture([0.25, 0.75], [[-10.0], [10.0]], [[[1.0]], [[1.0]]])
    x = sample(mix, VE(), 40_000, torch.tensor(0.0), generator=gen(8), dtype=F64)
    frac = (x[:, 0] > 0).double().mean().item()
    assert abs(frac - 0.75) < 5 * math.sqrt(0.25 * 0.75 / 40_000)


# ------------------------------------------------------------------------------------------------------------
# oracle as a model
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
def test_oracle_model_through_predict(process):
    data = mixture2()
    model = oracle_model(data, process)
    assert model.prediction == "eps"
    x = torch.randn(6, 2)
    t = random_times(process, 1, gen(9), t_min=1)[0].to(torch.float32)
    torch.testing.assert_close(predict(model, x, t, process, "eps"), eps_star(data, process, x, t))
    torch.testing.assert_close(predict(model, x, t, process, "x0"), x0_star(data, process, x, t), rtol=1e-4,
                               atol=1e-4)
    torch.testing.assert_close(predict(model, x, t, process, "score"), score(data, process, x, t), rtol=1e-4,
                               atol=1e-4)


# ------------------------------------------------------------------------------------------------------------
# probability-flow ODE
# ------------------------------------------------------------------------------------------------------------
def invariant(data: Gaussian, process, x: torch.Tensor, t) -> torch.Tensor:
    a, s = process.alpha(torch.as_tensor(t, dtype=F64)), process.sigma(torch.as_tensor(t, dtype=F64))
    lam_t = a**2 * data.evals + s**2
    return ((x - a * data.mean) @ data.evecs) / lam_t.sqrt()


def pf_velocity(data: Gaussian, process, x: torch.Tensor, t: float, h: float) -> torch.Tensor:
    """Probability-flow velocity ``f x - g^2/2 score`` with ``f = d log alpha/dt``, ``g^2 = d sigma^2/dt - 2 f sigma^2``
    (finite differences of the schedule; for VE this is ``-t score``)."""
    tp, tm, t0 = (torch.tensor(v, dtype=F64) for v in (t + h, t - h, t))
    f = (process.log_alpha(tp) - process.log_alpha(tm)) / (2 * h)
    dsig2 = (process.sigma(tp) ** 2 - process.sigma(tm) ** 2) / (2 * h)
    g2 = dsig2 - 2 * f * process.sigma(t0) ** 2
    return f * x - 0.5 * g2 * score(data, process, x, t0)


@pytest.mark.parametrize("process,t,h", [(VE(), 1.3, 1e-4), (VE(), 20.0, 1e-3), (VPContinuous(), 0.4, 1e-5),
                                         (VPDiscrete("linear"), 300.5, 1e-3), (VPDiscrete("cosine"), 700.5, 1e-3)])
def test_flow_map_solves_the_probability_flow_ode(process, t, h):
    data = gaussian3(10)
    x = torch.randn(5, 3, generator=gen(11), dtype=F64)
    tt = torch.tensor(t, dtype=F64)
    fd = (flow_map(data, process, x, tt, tt + h) - flow_map(data, process, x, tt, tt - h)) / (2 * h)
    v = pf_velocity(data, process, x, t, h)
    torch.testing.assert_close(fd, v, rtol=1e-5, atol=1e-7)
    if isinstance(process, VE):
        torch.testing.assert_close(v, -t * score(data, process, x, tt), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
@given(st.integers(0, 10_000))
def test_flow_map_invariant_and_composition(process, seed):
    data, g = gaussian3(seed % 7), gen(seed)
    t, u, s = random_times(process, 3, g).double()
    x = 2.0 * torch.randn(4, 3, generator=g, dtype=F64)
    xs = flow_map(data, process, x, t, s)
    torch.testing.assert_close(invariant(data, process, xs, s), invariant(data, process, x, t), rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(flow_map(data, process, flow_map(data, process, x, t, u), u, s), xs,
                               rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(flow_map(data, process, x, t, t), x)


@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
def test_flow_map_pushes_marginals_forward_exactly(process):
    """The flow map is affine; its Jacobian M must satisfy M C_t M^T = C_s, and it maps alpha_t m to alpha_s m."""
    data = gaussian3(12)
    t, s = random_times(process, 2, gen(13), t_min=1).double()
    m_t, c_t = marginal_cov(data, process, t)
    m_s, c_s = marginal_cov(data, process, s)
    torch.testing.assert_close(flow_map(data, process, m_t[None], t, s)[0], m_s)
    jac = flow_map(data, process, m_t + torch.eye(3, dtype=F64), t, s) - m_s  # rows: M e_i
    torch.testing.assert_close(jac.T @ c_t @ jac, c_s)
    # per-sample times
    x = torch.randn(2, 3, dtype=F64)
    both = flow_map(data, process, x, torch.stack([t, s]), torch.stack([s, t]))
    torch.testing.assert_close(both[0], flow_map(data, process, x[:1], t, s)[0])
    torch.testing.assert_close(both[1], flow_map(data, process, x[1:], s, t)[0])


# ------------------------------------------------------------------------------------------------------------
# Gaussian-to-Gaussian divergences
# ------------------------------------------------------------------------------------------------------------
finite = st.floats(-5.0, 5.0)
scales = st.floats(0.05, 5.0)


@given(finite, scales, finite, scales)
def test_kl_and_w2_match_1d_closed_forms(m0, s0, m1, s1):
    def as_g(m, s):
        return torch.tensor([m], dtype=F64), torch.tensor([[s**2]], dtype=F64)

    kl = kl_gaussians(*as_g(m0, s0), *as_g(m1, s1)).item()
    assert kl == pytest.approx(math.log(s1 / s0) + (s0**2 + (m0 - m1) ** 2) / (2 * s1**2) - 0.5, rel=1e-9, abs=1e-12)
    w2 = w2_gaussians(*as_g(m0, s0), *as_g(m1, s1)).item()
    assert w2 == pytest.approx(math.hypot(m0 - m1, s0 - s1), rel=1e-9, abs=1e-12)


@given(st.integers(0, 10_000), st.integers(1, 5))
def test_kl_and_w2_zero_at_equality_and_match_scipy(seed, d):
    g = gen(seed)
    m0, m1 = torch.randn(d, generator=g, dtype=F64), torch.randn(d, generator=g, dtype=F64)
    s0, s1 = random_spd(d, g), random_spd(d, g)
    assert abs(kl_gaussians(m0, s0, m0, s0).item()) < 1e-12
    assert w2_gaussians(m0, s0, m0, s0).item() < 1e-7
    assert kl_gaussians(m0, s0, m1, s1).item() > 0
    r1 = scipy.linalg.sqrtm(s1.numpy())
    cross = scipy.linalg.sqrtm(r1 @ s0.numpy() @ r1).real
    ref = math.sqrt(((m0 - m1) ** 2).sum().item() + np.trace(s0.numpy() + s1.numpy() - 2 * cross))
    assert w2_gaussians(m0, s0, m1, s1).item() == pytest.approx(ref, rel=1e-7, abs=1e-9)
    # commuting (diagonal) covariances: W2^2 = |dm|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = s0.diagonal(), s1.diagonal()
    diag_ref = math.sqrt(((m0 - m1) ** 2).sum().item() + ((a.sqrt() - b.sqrt()) ** 2).sum().item())
    assert w2_gaussians(m0, torch.diag(a), m1, torch.diag(b)).item() == pytest.approx(diag_ref, rel=1e-9)


def test_kl_against_monte_carlo_and_batching():
    g = gen(14)
    d = 3
    m0, m1 = torch.randn(d, generator=g, dtype=F64), torch.randn(d, generator=g, dtype=F64)
    s0, s1 = random_spd(d, g, 0.3), random_spd(d, g, 0.3)
    p0 = torch.distributions.MultivariateNormal(m0, s0)
    p1 = torch.distributions.MultivariateNormal(m1, s1)
    torch.manual_seed(0)
    x = p0.sample((200_000,))
    llr = p0.log_prob(x) - p1.log_prob(x)
    kl = kl_gaussians(m0, s0, m1, s1).item()
    assert abs(llr.mean().item() - kl) < 5 * llr.std().item() / math.sqrt(x.shape[0])
    assert kl == pytest.approx(torch.distributions.kl_divergence(p0, p1).item(), rel=1e-10)
    # batched: a stack of covariances against one reference
    batch = kl_gaussians(torch.stack([m0, m1]), torch.stack([s0, s1]), m1, s1)
    assert batch.shape == (2,)
    assert batch[0].item() == pytest.approx(kl, rel=1e-12) and abs(batch[1].item()) < 1e-12
    w = w2_gaussians(torch.stack([m0, m1]), torch.stack([s0, s1]), m1, s1)
    assert w.shape == (2,) and w[0].item() == pytest.approx(w2_gaussians(m0, s0, m1, s1).item(), rel=1e-12)


# ------------------------------------------------------------------------------------------------------------
# linear eps-models
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
def test_linear_eps_star_and_loss(process):
    data, g = gaussian3(15), gen(16)
    t = random_times(process, 1, g, t_min=1)[0]
    A, b = linear_eps_star(data, process, t)
    x = torch.randn(8, 3, generator=g, dtype=F64)
    torch.testing.assert_close(x @ A.T + b, eps_star(data, process, x, t))
    # Bayes risk: E||eps - E[eps|x_t]||^2 = tr(I - sigma^2 C^-1)
    _, cov = marginal_cov(data, process, t)
    sig = process.sigma(t.double())
    bayes = 3 - sig**2 * torch.trace(torch.linalg.inv(cov))
    torch.testing.assert_close(linear_eps_loss(data, process, t, A, b), bayes)
    # stationary at the optimum, larger elsewhere
    A1, b1 = A.clone().requires_grad_(True), b.clone().requires_grad_(True)
    grads = torch.autograd.grad(linear_eps_loss(data, process, t, A1, b1), (A1, b1))
    assert all(gr.abs().max() < 1e-10 for gr in grads)
    dA = 0.1 * torch.randn(3, 3, generator=g, dtype=F64)
    assert linear_eps_loss(data, process, t, A + dA, b) > bayes
    # Monte Carlo check of the loss of an arbitrary linear model
    A2, b2 = A + dA, b + 0.2
    n = 100_000
    x0 = sample(data, process, n, torch.tensor(0), generator=g, dtype=F64)
    eps = torch.randn(n, 3, generator=g, dtype=F64)
    xt = process.add_noise(x0, eps, t.double())
    per = ((xt @ A2.T + b2 - eps) ** 2).sum(1)
    exact = linear_eps_loss(data, process, t, A2, b2).item()
    assert abs(per.mean().item() - exact) < 5 * per.std().item() / math.sqrt(n)


# ------------------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_value_errors_naming_the_argument():
    with pytest.raises(ValueError, match="^cov[:,]"):
        Gaussian([0.0, 0.0], [[1.0, 2.0], [2.0, 1.0]])  # indefinite
    with pytest.raises(ValueError, match="^cov[:,]"):
        Gaussian([0.0, 0.0], [[1.0, 0.5], [0.0, 1.0]])  # not symmetric
    with pytest.raises(ValueError, match="^cov[:,]"):
        Gaussian([0.0, 0.0], [[1.0, 0.0], [0.0, 0.0]])  # singular
    with pytest.raises(ValueError, match="^cov[:,]"):
        Gaussian([0.0, 0.0], [[1.0]])
    with pytest.raises(ValueError, match="^mean[:,]"):
        Gaussian([[0.0]], [[1.0]])
    with pytest.raises(ValueError, match="^mean[:,]"):
        Gaussian([float("nan")], [[1.0]])
    covs = [[[1.0]], [[1.0]]]
    with pytest.raises(ValueError, match="^weights[:,]"):
        GaussianMixture([0.5, 0.6], [[0.0], [1.0]], covs)
    with pytest.raises(ValueError, match="^weights[:,]"):
        GaussianMixture([1.5, -0.5], [[0.0], [1.0]], covs)
    with pytest.raises(ValueError, match="^covs[:,]"):
        GaussianMixture([0.5, 0.5], [[0.0], [1.0]], [[[1.0]], [[-1.0]]])
    with pytest.raises(ValueError, match="^covs[:,]"):
        GaussianMixture([0.5, 0.5], [[0.0], [1.0]], [[[1.0]]])
    with pytest.raises(ValueError, match="^means[:,]"):
        GaussianMixture([0.5, 0.5], [[0.0]], covs)
    # a sum within 1e-6 is accepted and renormalised
    mix = GaussianMixture([0.5, 0.5 + 5e-7], [[0.0], [1.0]], covs)
    assert mix.weights.sum().item() == pytest.approx(1.0, abs=1e-15) and mix.weights.dtype == F64
    with pytest.raises(ValueError, match="S1"):
        kl_gaussians([0.0], [[1.0]], [0.0], [[-1.0]])
    with pytest.raises(ValueError, match="S0"):
        w2_gaussians([0.0], [[-1.0]], [0.0], [[1.0]])
    with pytest.raises(TypeError, match="^data[:,]"):
        flow_map(mixture1(), VE(), torch.zeros(1, 1), torch.tensor(1.0), torch.tensor(0.5))

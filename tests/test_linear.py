"""Tests of ``theory.linear``: exact chain marginals of affine eps-models against Monte Carlo runs of the real
samplers, and the exact reverse transitions against Bayes' rule and Monte Carlo."""

import math

import pytest
import torch

from atdiff.processes import VE, VPContinuous, VPDiscrete
from atdiff.samplers import karras_grid, respaced_grid, sample_ddim, sample_ddpm, uniform_grid
from theory.gaussian import Gaussian, GaussianMixture, kl_gaussians, log_prob, marginal, oracle_model, sample
from theory.linear import (
    AffineEpsModel,
    AffineStep,
    affine_map,
    bayes_coef,
    chain_marginals,
    ddim_chain_marginals,
    ddim_step_affine,
    ddpm_chain_marginals,
    ddpm_step_affine,
    expected_mixture_transition_kl_mc,
    expected_transition_kl,
    gaussian_reverse_step,
    mixture_reverse_transition,
    mixture_transition_kl_mc,
    mixture_transition_log_prob,
    perturbed_coef,
    sample_mixture_transition,
    step_log_prob,
    transition_kl,
    ve_teacher_step,
    ve_teacher_step_affine,
)

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (see conftest.py)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def data2(seed: int = 0) -> Gaussian:
    g = gen(seed)
    a = torch.randn(2, 2, generator=g, dtype=F64)
    return Gaussian(torch.randn(2, generator=g, dtype=F64), a @ a.T / 2 + 0.2 * torch.eye(2, dtype=F64))


def perturbed(data: Gaussian, process, size: float = 0.1, scale: float = 1.03) -> AffineEpsModel:
    g = gen(99)
    d = data.dim
    return AffineEpsModel(perturbed_coef(bayes_coef(data, process), scale=scale,
                                         dA=size * torch.randn(d, d, generator=g, dtype=F64),
                                         db=size * torch.randn(d, generator=g, dtype=F64)))


def assert_gaussian_matches_samples(x: torch.Tensor, m: torch.Tensor, C: torch.Tensor, z: float = 5.0) -> None:
    """Sample mean within ``z`` standard errors; sample covariance within ``z`` standard errors of each entry
    (``Var(x_i x_j) ~ C_ii C_jj + C_ij^2`` for Gaussian ``x``)."""
    n = x.shape[0]
    se_mean = (C.diagonal() / n).sqrt()
    assert ((x.mean(0) - m).abs() <= z * se_mean).all(), (x.mean(0), m)
    se_cov = ((C.diagonal()[:, None] * C.diagonal()[None, :] + C**2) / n).sqrt()
    assert ((torch.cov(x.T).reshape(C.shape) - C).abs() <= z * se_cov).all(), (torch.cov(x.T), C)


PROCESS_GRIDS = [
    pytest.param(VPDiscrete("linear"), lambda p: respaced_grid(p, 8), id="vp-linear"),
    pytest.param(VPDiscrete("cosine"), lambda p: respaced_grid(p, "ddim8")[:-1], id="vp-cosine"),
    pytest.param(VPContinuous(), lambda p: uniform_grid(p, 8, t_end=1e-3), id="vp-continuous"),
    pytest.param(VE(sigma_max=20.0), lambda p: karras_grid(0.01, 20.0, 8, append_zero=False), id="ve"),
]


@pytest.mark.parametrize(("process", "make_grid"), PROCESS_GRIDS)
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_chain_marginals_match_the_sampler(process, make_grid, eta):
    data = data2()
    model = perturbed(data, process)
    grid = make_grid(process)
    q_T = marginal(data, process, grid[0])
    marg = ddim_chain_marginals(model, process, grid, q_T.mean, q_T.cov, eta=eta)
    assert len(marg) == len(grid)
    n = 30000
    x_T = sample(data, process, n, grid[0], gen(1), dtype=F64)
    x = sample_ddim(model, x_T, process, grid, eta=eta, generator=gen(2)).x
    assert_gaussian_matches_samples(x, *marg[-1])


@pytest.mark.parametrize("variance", ["small", "large"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddpm_chain_marginals_match_the_sampler(variance, schedule):
    process = VPDiscrete(schedule)
    data = data2(3)
    model = perturbed(data, process, size=0.05)
    grid = respaced_grid(process, 6)
    marg = ddpm_chain_marginals(model, process, grid, torch.zeros(2), torch.eye(2), variance=variance)
    n = 30000
    x = sample_ddpm(model, torch.randn(n, 2, generator=gen(4), dtype=F64), process, grid, variance=variance,
                    generator=gen(5)).x
    assert_gaussian_matches_samples(x, *marg[-1])
    # the sampler's last step adds no noise; with final_noise it does (the model transition as a density)
    with_noise = ddpm_chain_marginals(model, process, grid, torch.zeros(2), torch.eye(2), variance=variance,
                                      final_noise=True)
    extra = with_noise[-1][1] - marg[-1][1]
    expected = process.transition(grid[-1], grid[-2])[1] ** 2 if variance == "large" else 0.0
    torch.testing.assert_close(extra, expected * torch.eye(2, dtype=F64), atol=1e-12, rtol=0)


def test_bayes_ddim_chain_tends_to_the_data_with_many_steps():
    process = VPDiscrete("linear")
    data = data2(1)
    model = AffineEpsModel(bayes_coef(data, process))
    q_T = marginal(data, process, torch.tensor(1000.0))
    kls = []
    for steps in (10, 100):
        m, C = ddim_chain_marginals(model, process, respaced_grid(process, steps), q_T.mean, q_T.cov)[-1]
        kls.append(float(kl_gaussians(m, C, data.mean, data.cov)))
    assert kls[1] < kls[0] / 10


def test_affine_eps_model_matches_the_oracle():
    process = VPDiscrete("cosine")
    data = data2()
    x = torch.randn(5, 2, generator=gen(), dtype=F64)
    t = torch.tensor([10.0, 10.0, 500.0, 999.0, 10.0], dtype=F64)
    torch.testing.assert_close(AffineEpsModel(bayes_coef(data, process))(x, t),
                               oracle_model(data, process)(x, t), rtol=1e-12, atol=1e-12)


def test_affine_map_reads_off_an_affine_function_and_rejects_others():
    M, c = torch.randn(3, 2, generator=gen(), dtype=F64), torch.randn(3, generator=gen(1), dtype=F64)
    M_hat, c_hat = affine_map(lambda x: x @ M.T + c, 2)
    torch.testing.assert_close(M_hat, M, rtol=0, atol=1e-14)
    torch.testing.assert_close(c_hat, c, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="^model: the step is not affine"):
        affine_map(lambda x: x**2, 2)
    process = VPDiscrete("linear")
    with pytest.raises(ValueError, match="^model:"):
        ddim_step_affine(lambda x, t: torch.tanh(x), process, 500, 400, 2)


def test_ddim_step_affine_noise_matches_the_posterior_variance_at_eta_one():
    process = VPDiscrete("linear")
    step = ddim_step_affine(oracle_model(data2(), process), process, 600, 500, 2, eta=1.0)
    ddpm = ddpm_step_affine(oracle_model(data2(), process), process, 600, 500, 2, variance="small")
    torch.testing.assert_close(step.Q, ddpm.Q, rtol=1e-12, atol=0)
    torch.testing.assert_close(step.M, ddpm.M, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(step.c, ddpm.c, rtol=1e-10, atol=1e-12)


def test_ve_teacher_steps_are_edm_euler_and_heun():
    process = VE()
    data = Gaussian(torch.tensor([0.3], dtype=F64), torch.tensor([[0.25]], dtype=F64))
    model = oracle_model(data, process)
    x = torch.randn(6, 1, generator=gen(), dtype=F64)
    t, s = 3.0, 1.7

    def velocity(x, t):  # dx/dt = (x - D(x, t)) / t, D the Bayes denoiser of N(0.3, 0.25)
        denoised = 0.3 + 0.25 / (0.25 + t**2) * (x - 0.3)
        return (x - denoised) / t

    euler = x + (s - t) * velocity(x, t)
    heun = x + (s - t) * 0.5 * (velocity(x, t) + velocity(euler, s))
    torch.testing.assert_close(ve_teacher_step(model, process, x, t, s, "euler"), euler, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ve_teacher_step(model, process, x, t, s, "heun"), heun, rtol=1e-12, atol=1e-12)
    step = ve_teacher_step_affine(model, process, t, s, 1, "heun")
    torch.testing.assert_close(x @ step.M.T + step.c, heun, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------------------
# reverse transitions
# ------------------------------------------------------------------------------------------------------------
def forward_log_prob(process, x_t, y, t, s):
    """``log q(x_t | x_s = y)``: the forward transition ``N(alpha_ts y, sigma_ts^2 I)``."""
    a, sig = process.transition(torch.tensor(float(s), dtype=F64), torch.tensor(float(t), dtype=F64))
    d = x_t.shape[1]
    return -0.5 * (((x_t - a * y) ** 2).sum(1) / sig**2 + d * math.log(2 * math.pi * sig**2))


@pytest.mark.parametrize("process", [VPDiscrete("linear"), VPDiscrete("cosine"), VE(sigma_max=20.0)],
                         ids=["vp-linear", "vp-cosine", "ve"])
def test_gaussian_reverse_step_is_bayes_rule(process):
    data = data2(2)
    t, s = (700, 450) if isinstance(process, VPDiscrete) else (5.0, 1.5)
    step = gaussian_reverse_step(data, process, t, s)
    x_t = sample(data, process, 7, t, gen(3), dtype=F64)
    y = sample(data, process, 7, s, gen(4), dtype=F64)
    bayes = log_prob(data, process, y, s) + forward_log_prob(process, x_t, y, t, s) - log_prob(data, process, x_t, t)
    torch.testing.assert_close(step_log_prob(step, y, x_t), bayes, rtol=1e-10, atol=1e-10)


def mixture2() -> GaussianMixture:
    return GaussianMixture([0.3, 0.7], [[-1.5, 0.5], [1.0, -0.5]],
                           [[[0.2, 0.05], [0.05, 0.1]], [[0.15, 0.0], [0.0, 0.3]]])


def test_mixture_reverse_transition_is_bayes_rule():
    process = VPDiscrete("linear")
    data = mixture2()
    t, s = 300, 120
    x_t = sample(data, process, 9, t, gen(5), dtype=F64)
    y = x_t * 1.1 + 0.3 * torch.randn(9, 2, generator=gen(6), dtype=F64)
    trans = mixture_reverse_transition(data, process, x_t, t, s)
    bayes = log_prob(data, process, y, s) + forward_log_prob(process, x_t, y, t, s) - log_prob(data, process, x_t, t)
    torch.testing.assert_close(mixture_transition_log_prob(trans, y), bayes, rtol=1e-10, atol=1e-10)


def test_mixture_reverse_transition_samples_match_the_forward_process():
    """Monte Carlo: draw (x_s, x_t) jointly from the forward process, keep the pairs with x_t in a small box, and
    compare the mean of x_s with the transition's mean averaged over those x_t."""
    process = VPDiscrete("linear")
    data = mixture2()
    t, s = 250, 100
    n = 400000
    x_s = sample(data, process, n, s, gen(7), dtype=F64)
    a, sig = process.transition(torch.tensor(float(s), dtype=F64), torch.tensor(float(t), dtype=F64))
    x_t = a * x_s + sig * torch.randn(n, 2, generator=gen(8), dtype=F64)
    box = ((x_t - torch.tensor([0.0, 0.0], dtype=F64)).abs() < 0.1).all(1)
    assert box.sum() > 2000
    trans = mixture_reverse_transition(data, process, x_t[box], t, s)
    draws = sample_mixture_transition(trans, gen(9))
    exact_mean = (trans.log_weights.exp()[..., None] * trans.means).sum(1).mean(0)
    se = x_s[box].std(0) / math.sqrt(int(box.sum()))
    assert ((x_s[box].mean(0) - exact_mean).abs() < 5 * se).all()
    assert ((draws.mean(0) - exact_mean).abs() < 5 * se).all()


def test_expected_transition_kl_matches_monte_carlo_and_the_pointwise_kl():
    process = VPDiscrete("linear")
    data = data2(4)
    t, s = 400, 300
    q_step = gaussian_reverse_step(data, process, t, s)
    p_step = ddpm_step_affine(perturbed(data, process), process, t, s, 2, variance="large")
    q_t = marginal(data, process, t)
    exact = expected_transition_kl(q_step, p_step, q_t.mean, q_t.cov)
    x = sample(data, process, 20000, t, gen(10), dtype=F64)
    pointwise = transition_kl(q_step, p_step, x)
    assert abs(float(pointwise.mean() - exact)) < 5 * float(pointwise.std()) / math.sqrt(len(x))
    # a one-component mixture: the Monte Carlo mixture KL estimates the same expectation
    mix = GaussianMixture([1.0], data.mean[None], data.cov[None])
    est, se = expected_mixture_transition_kl_mc(mix, process, p_step, t, s, 20000, gen(11))
    assert abs(float(est - exact)) < 5 * float(se)
    kl_at, se_at = mixture_transition_kl_mc(mix, process, p_step, x[:3], t, s, 4000, gen(12))
    assert (abs(kl_at - pointwise[:3]) < 5 * se_at + 1e-12).all()


def test_chain_marginals_push_gaussians():
    step = AffineStep(2 * torch.eye(2, dtype=F64), torch.ones(2, dtype=F64), 0.5 * torch.eye(2, dtype=F64))
    out = chain_marginals([step, step], torch.zeros(2), torch.eye(2))
    torch.testing.assert_close(out[2][0], torch.full((2,), 3.0, dtype=F64))
    torch.testing.assert_close(out[2][1], (4 * (4 + 0.5) + 0.5) * torch.eye(2, dtype=F64))


def test_bad_inputs_name_the_argument():
    process = VPDiscrete("linear")
    data = data2()
    model = AffineEpsModel(bayes_coef(data, process))
    grid = respaced_grid(process, 4)
    with pytest.raises(ValueError, match="^C_T:"):
        ddim_chain_marginals(model, process, grid, torch.zeros(2), torch.eye(3))
    with pytest.raises(ValueError, match="^C_T:"):
        ddim_chain_marginals(model, process, grid, torch.zeros(2), -torch.eye(2))
    with pytest.raises(ValueError, match="^m_T:"):
        ddim_chain_marginals(model, process, grid, torch.tensor([0.0, float("nan")]), torch.eye(2))
    with pytest.raises(ValueError, match="^eta:"):
        ddim_chain_marginals(model, process, grid, torch.zeros(2), torch.eye(2), eta=-1.0)
    with pytest.raises(ValueError, match="^variance:"):
        ddpm_chain_marginals(model, process, grid, torch.zeros(2), torch.eye(2), variance="huge")
    with pytest.raises(ValueError, match="^grid:"):
        ddpm_chain_marginals(model, process, torch.tensor([10.0, 20.0]), torch.zeros(2), torch.eye(2))
    with pytest.raises(ValueError, match="^s:"):
        gaussian_reverse_step(data, process, 100, 200)
    with pytest.raises(ValueError, match="^t:"):
        gaussian_reverse_step(data, process, 2000, 200)
    with pytest.raises(ValueError, match="^dim:"):
        ddim_step_affine(model, process, 100, 50, 0)
    with pytest.raises(TypeError, match="^data:"):
        gaussian_reverse_step(mixture2(), process, 100, 50)
    with pytest.raises(TypeError, match="^data:"):
        mixture_reverse_transition(data, process, torch.zeros(1, 2), 100, 50)
    with pytest.raises(ValueError, match="^x_t:"):
        mixture_reverse_transition(mixture2(), process, torch.zeros(1, 3), 100, 50)
    with pytest.raises(ValueError, match="^process:"):
        ve_teacher_step(model, process, torch.zeros(1, 2), 100, 50)
    with pytest.raises(ValueError, match="^method:"):
        ve_teacher_step(model, VE(), torch.zeros(1, 2), 10.0, 5.0, "rk4")
    with pytest.raises(ValueError, match="^n:"):
        expected_mixture_transition_kl_mc(mixture2(), process, ddpm_step_affine(model, process, 100, 50, 2),
                                          100, 50, 1)

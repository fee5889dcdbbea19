import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from atdiff.param import convert, predict
from atdiff.precond import DiffusionModel
from atdiff.processes import VE, VPContinuous, VPDiscrete, discrete_betas, make_process

PROCESSES = [VPDiscrete("linear"), VPDiscrete("cosine"), VPDiscrete("linear", T=50), VPContinuous(),
             VPContinuous("cosine"), VE()]


def random_times(process, n, gen):
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    if isinstance(process, VPDiscrete):
        return (1 + u * (process.T - 1)).round()
    return 1e-3 + u * (process.t_max - 1e-3)


@pytest.mark.parametrize("process", PROCESSES, ids=repr)
def test_schedule_monotone_and_in_range(process):
    t = torch.linspace(process.t_min, process.t_max, 2001, dtype=torch.float64)
    if isinstance(process, VPDiscrete):
        t = torch.arange(process.T + 1, dtype=torch.float64)
    abar, sigma, log_snr = process.abar(t), process.sigma(t), process.log_snr(t[1:])
    assert (abar > 0).all() and (abar <= 1).all()
    assert abar[0] == 1.0
    assert (abar[1:] <= abar[:-1]).all()
    assert (sigma[1:] > sigma[:-1]).all()
    assert (log_snr[1:] < log_snr[:-1]).all()
    if process.variance_preserving:
        torch.testing.assert_close(process.alpha(t) ** 2 + sigma**2, torch.ones_like(t))


def test_linear_and_cosine_betas_match_their_definitions():
    b = discrete_betas("linear", 1000)
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)
    c = VPDiscrete("cosine", T=1000)
    t = torch.arange(0, 1000, dtype=torch.float64)
    f = torch.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    # below the cap the cumulative product equals the cosine formula; the cap only bites at the very end
    torch.testing.assert_close(c.abar(t[:990]), f[:990], rtol=1e-10, atol=0)
    assert c.betas.max().item() == pytest.approx(0.999)
    # abar_t = prod (1 - beta_s)
    torch.testing.assert_close(c.abar(torch.tensor(37.0, dtype=torch.float64)), torch.prod(1 - c.betas[:37]))


def test_discrete_interpolation_is_exact_at_integers_and_between_neighbours():
    p = VPDiscrete("linear")
    t = torch.tensor([10.0, 10.5, 11.0], dtype=torch.float64)
    a = p.abar(t)
    assert a[2] < a[1] < a[0]
    torch.testing.assert_close(a[1], (a[0] * a[2]).sqrt())  # log-linear interpolation


@pytest.mark.parametrize("process", PROCESSES, ids=repr)
def test_add_noise_moments(process):
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
    t = random_times(process, 1, gen).expand(n)
    eps = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    x_t = process.add_noise(x0, eps, t)
    a, s = process.alpha(t[0]).item(), process.sigma(t[0]).item()
    se = s / math.sqrt(n)
    assert abs(x_t.mean().item() - 0.7 * a) < 5 * se + 1e-12
    assert abs(x_t.std().item() - s) < 5 * s * math.sqrt(2 / n) + 1e-12


@pytest.mark.parametrize("process", PROCESSES, ids=repr)
def test_posterior_matches_gaussian_conditioning(process):
    # q(x_s | x_t, x0) by conditioning the joint Gaussian of (x_s, x_t) given x0, derived independently
    gen = torch.Generator().manual_seed(1)
    t = random_times(process, 4, gen)
    s = t * torch.rand(4, generator=gen, dtype=torch.float64)
    if isinstance(process, VPDiscrete):
        s = s.floor()
    x0 = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    x_t = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    mean, var = process.posterior(x_t, x0, t, s)
    a_t, a_s = process.alpha(t), process.alpha(s)
    v_s, v_t = process.sigma(s) ** 2, process.sigma(t) ** 2
    cov_st = (a_t / a_s) * v_s  # Cov(x_s, x_t | x0)
    ref_mean = (a_s[:, None] * x0) + (cov_st / v_t)[:, None] * (x_t - a_t[:, None] * x0)
    ref_var = v_s - cov_st**2 / v_t
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(var.flatten(), ref_var)


def test_posterior_is_ddpm_beta_tilde():
    p = VPDiscrete("linear")
    t = torch.arange(2, 1001, dtype=torch.float64)
    _, var = p.posterior(torch.zeros(len(t), 1, dtype=torch.float64), torch.zeros(len(t), 1, dtype=torch.float64),
                         t, t - 1)
    beta = p.betas[1:]
    abar = torch.cumprod(1 - p.betas, 0)
    beta_tilde = beta * (1 - abar[:-1]) / (1 - abar[1:])
    torch.testing.assert_close(var.flatten(), beta_tilde)


@given(kind_src=st.sampled_from(["eps", "x0", "v", "score"]), kind_dst=st.sampled_from(["eps", "x0", "v", "score"]),
       pidx=st.integers(0, len(PROCESSES) - 1), seed=st.integers(0, 2**16))
def test_conversions_round_trip(kind_src, kind_dst, pidx, seed):
    process = PROCESSES[pidx]
    gen = torch.Generator().manual_seed(seed)
    t = random_times(process, 5, gen).clamp(max=process.t_max * 0.98)
    x0 = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    eps = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    x_t = process.add_noise(x0, eps, t)
    truth = {"eps": eps, "x0": x0, "v": process.alpha(t)[:, None] * eps - process.sigma(t)[:, None] * x0,
             "score": -eps / process.sigma(t)[:, None]}
    out = convert(truth[kind_src], x_t, t, process, kind_src, kind_dst)
    torch.testing.assert_close(out, truth[kind_dst], rtol=1e-7, atol=1e-7)
    back = convert(out, x_t, t, process, kind_dst, kind_src)
    torch.testing.assert_close(back, truth[kind_src], rtol=1e-7, atol=1e-7)


def test_predict_uses_declared_prediction():
    p = VPDiscrete("cosine")

    class Net(torch.nn.Module):
        def forward(self, x, t):
            return 2 * x

    t = torch.full((3,), 300.0)
    x = torch.randn(3, 2)
    model = DiffusionModel(Net(), p, prediction="x0")
    torch.testing.assert_close(predict(model, x, t, p, "x0"), 2 * x)
    torch.testing.assert_close(predict(model, x, t, p, "eps"), convert(2 * x, x, t, p, "x0", "eps"))


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="^schedule:"):
        VPDiscrete("quadratic")
    with pytest.raises(ValueError, match="^T:"):
        VPDiscrete("linear", T=0)
    with pytest.raises(ValueError, match="^name:"):
        make_process("vp-weird")
    p = VPDiscrete("linear")
    with pytest.raises(ValueError, match="^t:"):
        p.add_noise(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="^eps:"):
        p.add_noise(torch.zeros(3, 2), torch.zeros(3, 3), torch.zeros(3))
    with pytest.raises(ValueError, match="^t:"):
        p.check_time(torch.tensor([1001.0]))
    with pytest.raises(ValueError, match="^s:"):
        p.posterior(torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([5.0]), torch.tensor([7.0]))
    with pytest.raises(ValueError, match="^src:"):
        convert(torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([5.0]), p, "noise", "eps")
    with pytest.raises(ValueError, match="^sigma_min, sigma_max:"):
        VE(sigma_min=-1.0)
    with pytest.raises(ValueError, match="^x0:"):
        p.add_noise(torch.tensor([[float("nan"), 0.0]]), torch.zeros(1, 2), torch.tensor([5.0]))
    with pytest.raises(ValueError, match="^eps:"):
        p.add_noise(torch.zeros(1, 2), torch.tensor([[0.0, float("inf")]]), torch.tensor([5.0]))
    with pytest.raises(ValueError, match="^t:"):  # beyond T: an error, not a silent clamp to T
        p.add_noise(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([1500.0]))
    with pytest.raises(ValueError, match="^t:"):
        p.add_noise(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([float("nan")]))
    # validate=False skips only the value checks (an inner loop that has checked once)
    assert p.add_noise(torch.ones(1, 2), torch.zeros(1, 2), torch.tensor([0.0]), validate=False).eq(1).all()


def test_infinite_process_parameters_are_refused():
    from atdiff.processes import VE, VPContinuous

    with pytest.raises(ValueError, match="^sigma_min, sigma_max:"):
        VE(sigma_max=float("inf"))
    with pytest.raises(ValueError, match="^sigma_min, sigma_max:"):
        VE(sigma_min=float("nan"))
    with pytest.raises(ValueError, match="^beta_min, beta_max:"):
        VPContinuous(beta_max=float("inf"))

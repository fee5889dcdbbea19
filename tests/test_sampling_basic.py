"""DDPM / DDIM and grids against closed forms for Gaussian data (the oracle is written inline here, as an
independent derivation of eps* = sigma (alpha^2 S + sigma^2 I)^-1 (x - alpha m))."""

import math

import numpy as np
import pytest
import torch

from atdiff.precond import declare
from atdiff.processes import VE, VPContinuous, VPDiscrete
from atdiff.samplers import (
    check_grid,
    karras_grid,
    respaced_grid,
    respacing_timesteps,
    sample,
    sample_ddim,
    sample_ddpm,
    uniform_grid,
)

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (see conftest.py)


def gaussian_eps_model(process, m, S):
    m, S = torch.as_tensor(m, dtype=torch.float64), torch.as_tensor(S, dtype=torch.float64)
    d = m.numel()

    def model(x, t):
        t = t[:1] if bool((t == t[0]).all()) else t  # the samplers' case: one time for the batch, one solve
        a = process.alpha(t).double()[:, None, None]
        s = process.sigma(t).double()[:, None, None]
        cov = a**2 * S + s**2 * torch.eye(d, dtype=torch.float64)
        r = x.double() - a[:, :, 0] * m
        return (s[:, :, 0] * torch.linalg.solve(cov[0], r.T).T if len(t) == 1 else
                s[:, :, 0] * torch.linalg.solve(cov, r[..., None])[..., 0]).to(x.dtype)

    model.prediction = "eps"
    return model


def exact_flow(process, x_T, t_T, m, S):
    """The probability-flow map from t_T to 0 for N(m, S): in S's eigenbasis, (x - alpha m)/sqrt(alpha^2 lam +
    sigma^2) is constant along the flow."""
    m, S = torch.as_tensor(m, dtype=torch.float64), torch.as_tensor(S, dtype=torch.float64)
    lam, U = torch.linalg.eigh(S)
    a, s = process.alpha(t_T).double(), process.sigma(t_T).double()
    z = ((x_T - a * m) @ U) / torch.sqrt(a**2 * lam + s**2)
    return m + (z * lam.sqrt()) @ U.T


CASES = [
    (VPDiscrete("linear"), [0.5], [[0.3]]),
    (VPContinuous(), [1.0, -2.0], [[1.0, 0.4], [0.4, 0.5]]),
    (VE(sigma_max=20.0), [1.0, -2.0], [[1.0, 0.4], [0.4, 0.5]]),
]


@pytest.mark.parametrize(("process", "m", "S"), CASES, ids=lambda c: repr(c)[:30])
def test_ddim_converges_to_the_probability_flow_map_at_first_order(process, m, S):
    model = gaussian_eps_model(process, m, S)
    gen = torch.Generator().manual_seed(0)
    d = len(m)
    x_T = torch.randn(64, d, generator=gen, dtype=torch.float64) * process.sigma(process.t_max).double()
    t0 = 1e-3 * process.t_max if not isinstance(process, VPDiscrete) else 1.0
    errors, steps = [], [25, 50, 100, 200]
    for n in steps:
        grid = torch.cat([torch.linspace(process.t_max, t0, n, dtype=torch.float64), torch.zeros(1, dtype=F64)])
        out = sample_ddim(model, x_T, process, grid)
        assert out.nfe == n
        exact = exact_flow(process, x_T, torch.tensor(process.t_max, dtype=torch.float64), m, S)
        errors.append((out.x - exact).norm(dim=1).mean().item())
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    print(f"DDIM slope {type(process).__name__}: {slope:.3f} (steps {steps}, errors {errors})")  # pytest -s
    # the last step (t0 -> 0) is exact for any model with the oracle, so the order is that of the rest
    assert 0.8 < slope < 1.3, (errors, slope)


def test_ddpm_reproduces_data_moments_at_1000_steps():
    process = VPDiscrete("linear")
    m, S = [1.0, -0.5], [[0.5, 0.2], [0.2, 0.3]]
    model = gaussian_eps_model(process, m, S)
    gen = torch.Generator().manual_seed(3)
    n = 4000
    x_T = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    out = sample_ddpm(model, x_T, process, uniform_grid(process, 1000), generator=gen)
    assert out.nfe == 1000
    mean, cov = out.x.mean(0), torch.cov(out.x.T)
    S_t = torch.tensor(S, dtype=torch.float64)
    se_mean = (torch.diag(S_t) / n).sqrt()
    assert ((mean - torch.tensor(m, dtype=torch.float64)).abs() < 4 * se_mean).all(), mean
    # sampling error of a covariance entry: sqrt((S_ij^2 + S_ii S_jj) / n)
    se_cov = ((S_t**2 + torch.outer(torch.diag(S_t), torch.diag(S_t))) / n).sqrt()
    assert ((cov - S_t).abs() < 4 * se_cov).all(), cov


@pytest.mark.parametrize("variance", ["small", "large"])
def test_ddpm_step_has_the_stated_variance(variance):
    # one ancestral step from a fixed x_t with a fixed x0-prediction: empirical variance = the stated one
    process = VPDiscrete("linear")
    grid = torch.tensor([500.0, 400.0, 0.0], dtype=torch.float64)
    n = 100_000
    captured = []

    def model(x, t):
        return torch.zeros_like(x)  # eps = 0, so x0_hat = x_t / alpha_t

    model.prediction = "eps"
    gen = torch.Generator().manual_seed(0)
    sample_ddpm(model, torch.ones(n, 1, dtype=torch.float64), process, grid, variance=variance, generator=gen,
                callback=lambda info: captured.append(info["x"].clone()))
    t, s = grid[0], grid[1]
    if variance == "small":
        want = process.posterior(torch.zeros(1, 1), torch.zeros(1, 1), t, s)[1].item()
    else:
        want = 1 - (process.abar(t) / process.abar(s)).item()
    got = captured[0].var().item()
    assert abs(got - want) < 5 * want * math.sqrt(2 / n)


def test_ddim_eta_one_has_the_ddpm_posterior_variance():
    process = VPDiscrete("cosine")
    grid = respaced_grid(process, "ddim10")
    n = 100_000
    captured = []
    gen = torch.Generator().manual_seed(1)
    sample_ddim(declare(lambda x, t: torch.zeros_like(x), "eps"), torch.ones(n, 1, dtype=torch.float64), process, grid,
                eta=1.0,
                generator=gen, callback=lambda info: captured.append(info["x"].clone()))
    want = process.posterior(torch.zeros(1, 1), torch.zeros(1, 1), grid[0], grid[1])[1].item()
    assert abs(captured[0].var().item() - want) < 5 * want * math.sqrt(2 / n)


@pytest.mark.parametrize("spacing", ["ddim10", "ddim50"])
def test_ddim_eta_one_is_ddpm_small_variance_at_every_step(spacing):
    # DDIM's eta = 1 transition N(sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat, sigma^2) is the DDPM
    # posterior N(mu_tilde(x_t, x0_hat), beta_tilde) of the same grid step: with the same noise the two chains
    # agree at every step, for any eps-model (here a nonlinear one)
    process = VPDiscrete("linear")
    grid = respaced_grid(process, spacing)

    def model(x, t):
        return 0.7 * torch.tanh(x) + 0.2 * torch.sin(3 * x)

    model.prediction = "eps"

    x_T = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    steps = {"ddim": [], "ddpm": []}
    sample_ddim(model, x_T, process, grid, eta=1.0, generator=torch.Generator().manual_seed(3),
                callback=lambda info: steps["ddim"].append(info["x"].clone()))
    sample_ddpm(model, x_T, process, grid, variance="small", generator=torch.Generator().manual_seed(3),
                callback=lambda info: steps["ddpm"].append(info["x"].clone()))
    assert len(steps["ddim"]) == len(steps["ddpm"]) == len(grid) - 1
    for a, b in zip(steps["ddim"], steps["ddpm"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # and eta = 0 is a different chain (the check can fail)
    x0 = sample_ddim(model, x_T, process, grid, eta=0.0).x
    assert (x0 - steps["ddpm"][-1]).abs().max() > 1e-2


def test_respacing_matches_improved_diffusion_rules():
    assert respacing_timesteps(1000, "ddim50") == [1 + 20 * i for i in range(50)]
    assert len(respacing_timesteps(1000, "ddim7")) == 7
    kept = respacing_timesteps(300, "10,15,20")
    assert len(kept) == 45 and kept[0] == 1 and kept[9] == 100 and kept[10] == 101 and kept[-1] == 300
    assert respacing_timesteps(1000, "1000") == list(range(1, 1001))
    grid = respaced_grid(VPDiscrete("linear"), "ddim4")
    assert grid.tolist() == [751.0, 501.0, 251.0, 1.0, 0.0]


def test_grids():
    p = VPDiscrete("linear")
    g = uniform_grid(p, 10)
    assert g[0] == 1000 and g[-1] == 0 and len(g) == 11 and (g == g.round()).all()
    k = karras_grid(0.002, 80.0, 18)
    assert k[0].item() == pytest.approx(80.0) and k[-2].item() == pytest.approx(0.002) and k[-1] == 0
    # rho-spacing: the rho-th roots are evenly spaced
    r = k[:-1] ** (1 / 7)
    torch.testing.assert_close(r[1:] - r[:-1], (r[1] - r[0]).expand(17))


def test_bad_inputs_name_the_argument():
    p = VPDiscrete("linear")
    model = gaussian_eps_model(p, [0.0], [[1.0]])
    x = torch.randn(4, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="^grid:"):
        sample_ddim(model, x, p, torch.tensor([10.0, 20.0, 0.0]))
    with pytest.raises(ValueError, match="^grid:"):
        sample_ddim(model, x, p, torch.tensor([2000.0, 0.0]))
    with pytest.raises(ValueError, match="^x_T:"):
        sample_ddim(model, torch.full((4, 1), float("nan")), p, uniform_grid(p, 5))
    with pytest.raises(ValueError, match="^steps:"):
        uniform_grid(p, 0)
    with pytest.raises(ValueError, match="^name: unknown sampler .*ddim"):
        sample("euler-magic", model, x, p, uniform_grid(p, 5))
    with pytest.raises(ValueError, match="^variance:"):
        sample_ddpm(model, x, p, uniform_grid(p, 5), variance="medium")
    with pytest.raises(ValueError, match="^spec:"):
        respacing_timesteps(1000, "ddimX")
    with pytest.raises(ValueError, match="^model:"):
        sample_ddim(declare(lambda x, t: x[:, :0], "eps"), x, p, uniform_grid(p, 5))
    assert check_grid(torch.tensor([5.0, 0.0]), p).dtype == torch.float64

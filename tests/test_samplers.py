"""Samplers against closed forms: convergence orders and exact flow maps for Gaussian data, sample statistics
of the stochastic samplers for a Gaussian and a Gaussian mixture, respacing / ES identities, NFE counts, the
dispatcher and bad inputs.

The oracles are written inline (an independent derivation): for data N(m, S) with S = U diag(l) U^T,
eps*(x, t) = sigma U diag(1 / (alpha^2 l + sigma^2)) U^T (x - alpha m), and along the probability flow
U^T (x - alpha m) / sqrt(alpha^2 l + sigma^2) is constant. For a 1-D mixture sum_k w_k N(mu_k, s_k^2),
eps* = -sigma sum_k r_k(x) (-(x - alpha mu_k) / (alpha^2 s_k^2 + sigma^2)) with responsibilities r_k.
"""

import math

import numpy as np
import pytest
import torch

from atdiff.precond import declare
from atdiff.processes import VE, VPContinuous, VPDiscrete
from atdiff.samplers import (
    DIFFUSION_SAMPLERS,
    REGISTRY,
    EpsilonScaling,
    RespacedModel,
    default_grid,
    dpm_grid,
    edm_sigma,
    karras_grid,
    karras_time_grid,
    ode_log_likelihood,
    respace,
    respaced_grid,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_dpm_solver,
    sample_euler,
    sample_heun,
    sample_iddpm,
    sample_ode,
    sample_sde,
    sampler_help,
    uniform_grid,
)
from atdiff.samplers.dpm_solver import step_orders

F64 = torch.float64
M2, S2 = [1.0, -2.0], [[1.0, 0.4], [0.4, 0.5]]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (see conftest.py)


def _coef(process, t):
    """alpha, sigma at t (B,) as (B, 1); computed once when all times agree (the samplers' case)."""
    t1 = t[:1] if bool((t == t[0]).all()) else t
    return process.alpha(t1).double()[:, None], process.sigma(t1).double()[:, None]


def gaussian_eps_model(process, m, S):
    m, S = torch.as_tensor(m, dtype=F64), torch.as_tensor(S, dtype=F64)
    lam, U = torch.linalg.eigh(S)

    def model(x, t):
        a, s = _coef(process, t)
        z = (x.double() - a * m) @ U
        return ((s * z / (a**2 * lam + s**2)) @ U.T).to(x.dtype)

    model.prediction = "eps"
    return model


def exact_flow(process, x, t_from, t_to, m, S):
    m, S = torch.as_tensor(m, dtype=F64), torch.as_tensor(S, dtype=F64)
    lam, U = torch.linalg.eigh(S)
    a, s = process.alpha(t_from).double(), process.sigma(t_from).double()
    z = ((x - a * m) @ U) / torch.sqrt(a**2 * lam + s**2)
    a2, s2 = process.alpha(t_to).double(), process.sigma(t_to).double()
    return a2 * m + (z * torch.sqrt(a2**2 * lam + s2**2)) @ U.T


def mixture_eps_model(process, w, mu, sd):
    w, mu, sd = (torch.as_tensor(v, dtype=F64) for v in (w, mu, sd))

    def model(x, t):
        a, s = _coef(process, t)
        var = a**2 * sd**2 + s**2
        logp = torch.log(w) - 0.5 * (x.double() - a * mu) ** 2 / var - 0.5 * torch.log(var)
        score = (torch.softmax(logp, dim=1) * (-(x.double() - a * mu) / var)).sum(1, keepdim=True)
        return (-s * score).to(x.dtype)

    model.prediction = "eps"
    return model


def with_variance(model, v):
    """A learned-variance model: the oracle's eps and a constant variance interpolation v."""

    def f(x, t):
        eps = model(x, t)
        return torch.cat([eps, torch.full_like(eps, v)], dim=1)

    f.prediction, f.learned_variance = "eps", True
    return f


def counted(model):
    def f(x, t):
        f.calls += 1
        return model(x, t)

    f.calls = 0
    f.prediction = model.prediction
    return f


def _prior(process, n, d, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=F64) * process.sigma(process.t_max).double(), gen


# --- convergence orders ------------------------------------------------------------------------------------
def _dpm(order, solver, method):
    return lambda m, x, p, g: sample_dpm_solver(m, x, p, g, order=order, solver=solver, method=method)


def _quadratic(p, n):
    return dpm_grid(p, n, "time-quadratic")


def _karras(p, n):
    return karras_time_grid(p, n + 1, append_zero=False)


VP_PROCESSES = [VPContinuous(), VPDiscrete("linear")]
DPM_CASES = [
    (f"{solver}-{method}-{order}", _dpm(order, solver, method), _quadratic, order,
     [20, 40, 80, 160] if order == 2 else [40, 80, 160, 320])
    for solver in ("dpmsolver", "dpmsolver++") for method in ("multistep", "singlestep") for order in (2, 3)
]
ORDER_CASES = [
    (case, process)
    for case in [
        ("ddim", lambda m, x, p, g: sample_ddim(m, x, p, g), _quadratic, 1, [20, 40, 80, 160]),
        ("euler", lambda m, x, p, g: sample_euler(m, x, p, g), _karras, 1, [20, 40, 80, 160]),
        ("heun", lambda m, x, p, g: sample_heun(m, x, p, g), _karras, 2, [20, 40, 80, 160]),
    ]
    for process in [*VP_PROCESSES, VE(sigma_max=20.0)]
] + [(case, process) for case in DPM_CASES for process in VP_PROCESSES]


def _errors(run, make_grid, process, steps):
    """Mean l2 error against the exact flow map at the end of the grid, for each number of steps."""
    model = gaussian_eps_model(process, M2, S2)
    x_T, _ = _prior(process, 16, 2, 0)
    errors = []
    for n in steps:
        grid = make_grid(process, n)
        out = run(model, x_T, process, grid)
        errors.append((out.x - exact_flow(process, x_T, grid[0], grid[-1], M2, S2)).norm(dim=1).mean().item())
    return errors


@pytest.mark.parametrize(("case", "process"), ORDER_CASES,
                         ids=[f"{c[0]}-{type(p).__name__}" for c, p in ORDER_CASES])
def test_convergence_order_against_the_exact_flow(case, process):
    """Log-log slope of the final error over the last three step counts (asymptotic regime, float64; the
    grids: Karras for EDM, time-quadratic for DDIM / DPM-Solver, whose steps are uneven in lambda)."""
    name, run, make_grid, order, steps = case
    errors = _errors(run, make_grid, process, steps)
    assert min(errors) > 1e-11, errors  # above the float64 floor
    slope = -np.polyfit(np.log(steps[1:]), np.log(errors[1:]), 1)[0]
    print(f"ORDER {name} {type(process).__name__} {slope:.2f} {errors}")
    assert abs(slope - order) < 0.3, (name, slope, errors)


@pytest.mark.parametrize("case", DPM_CASES, ids=[c[0] for c in DPM_CASES])
def test_dpm_solver_converges_on_ve(case):
    # on VE the error curves are not yet clean power laws at these step counts (the lambda range is wide);
    # check convergence to the exact map at the order's rate over the whole range instead
    name, run, _, order, steps = case
    errors = _errors(run, _karras, VE(sigma_max=80.0), steps)
    assert errors[-1] < 1e-3 and all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[0] / errors[-1] > 0.5 * 8.0 ** (order - 0.3), errors


@pytest.mark.parametrize("process", [VPContinuous(), VPDiscrete("linear"), VE(sigma_max=20.0)], ids=repr)
def test_dopri5_matches_the_exact_map_and_reports_its_evaluations(process):
    model = counted(gaussian_eps_model(process, M2, S2))
    x_T, _ = _prior(process, 32, 2, 1)
    grid = torch.tensor([process.t_max, process.t_min], dtype=F64)
    out = sample_ode(model, x_T, process, grid, rtol=1e-6, atol=1e-6)
    exact = exact_flow(process, x_T, grid[0], grid[-1], M2, S2)
    print(f"DOPRI5 {type(process).__name__} max error {(out.x - exact).abs().max().item():.2e} nfe {out.nfe}")
    assert (out.x - exact).abs().max().item() < 1e-4
    assert out.nfe == model.calls and out.nfe > 20
    rk4 = counted(gaussian_eps_model(process, M2, S2))
    out = sample_ode(rk4, x_T, process, karras_time_grid(process, 50), method="rk4")
    assert out.nfe == rk4.calls == 4 * 50
    assert (out.x - exact).abs().max().item() < 1e-3


def test_ode_sampling_is_differentiable():
    process = VPContinuous()
    x_T = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(7)).requires_grad_(True)
    grid = torch.tensor([process.t_max, process.t_min], dtype=F64)
    out = sample_ode(gaussian_eps_model(process, M2, S2), x_T, process, grid, rtol=1e-7, atol=1e-7)
    out.x.sum().backward()
    # the flow map is linear: d x_0 / d x_T = U diag(sqrt(l) / sqrt(alpha^2 l + sigma^2)) U^T
    lam, U = torch.linalg.eigh(torch.tensor(S2, dtype=F64))
    a, s = process.alpha(process.t_max).double(), process.sigma(process.t_max).double()
    J = U @ torch.diag(lam.sqrt() / torch.sqrt(a**2 * lam + s**2)) @ U.T
    # backprop through the adaptive solver also differentiates its step-size control: agreement ~1e-5..1e-4
    torch.testing.assert_close(x_T.grad, J.sum(0).expand(4, 2), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("process", [VPContinuous(), VE(sigma_max=100.0)], ids=repr)
def test_ode_log_likelihood_of_gaussian_data(process):
    m, S = torch.tensor(M2, dtype=F64), torch.tensor(S2, dtype=F64)
    gen = torch.Generator().manual_seed(4)
    x = m + torch.randn(6, 2, generator=gen, dtype=F64) @ torch.linalg.cholesky(S).T
    exact = torch.distributions.MultivariateNormal(m, S).log_prob(x)
    res = ode_log_likelihood(gaussian_eps_model(process, M2, S2), x, process, rtol=1e-7, atol=1e-7)
    # swap the N(0, sigma_T^2) prior for the exact q_T to check the integration itself
    sig_T = edm_sigma(process, process.t_max).double()
    eye = torch.eye(2, dtype=F64)
    used = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=F64), sig_T**2 * eye).log_prob(res.y_T)
    true = torch.distributions.MultivariateNormal(m, S + sig_T**2 * eye).log_prob(res.y_T)
    torch.testing.assert_close(res.log_likelihood - used + true, exact, rtol=0, atol=1e-4)
    assert (res.log_likelihood - exact).abs().max() < 0.05  # the prior approximation itself is small
    # Hutchinson: unbiased; its mean over many probes of one point approaches the exact value
    xs = x[:1].expand(400, 2)
    hut = ode_log_likelihood(gaussian_eps_model(process, M2, S2), xs, process, trace="hutchinson",
                             generator=torch.Generator().manual_seed(5))
    exact_res = res.log_likelihood[0]
    se = hut.log_likelihood.std() / math.sqrt(400)
    assert abs(hut.log_likelihood.mean() - exact_res) < 4 * se + 1e-3, (hut.log_likelihood.mean(), exact_res)


# --- stochastic samplers: statistics ----------------------------------------------------------------------
STOCHASTIC = [
    ("ddpm", VPDiscrete("linear"), 1000, {}),
    ("iddpm", VPDiscrete("cosine"), 250, {}),
    ("sde", VPContinuous(), 500, {}),
    ("pc", VE(sigma_max=20.0), 300, {}),
    ("heun", VE(sigma_max=80.0), 128, {"S_churn": 30.0}),
    ("euler", VE(sigma_max=80.0), 400, {"S_churn": 40.0, "S_min": 0.05, "S_max": 50.0}),
    ("heun-vp", VPContinuous(), 128, {"S_churn": 20.0, "S_min": 0.05, "S_max": 10.0}),
]


def _model_for(name, model):
    return with_variance(model, 0.0) if name == "iddpm" else model


@pytest.mark.parametrize(("name", "process", "steps", "opts"), STOCHASTIC, ids=[c[0] for c in STOCHASTIC])
def test_stochastic_samplers_reproduce_gaussian_moments(name, process, steps, opts):
    m, S = [1.0, -0.5], [[0.5, 0.2], [0.2, 0.3]]
    n = 3000
    x_T, gen = _prior(process, n, 2, 10)
    model = _model_for(name, gaussian_eps_model(process, m, S))
    out = sample(name.removesuffix("-vp"), model, x_T, process, steps, generator=gen, **opts)
    S_t = torch.tensor(S, dtype=F64)
    se_mean = (torch.diag(S_t) / n).sqrt()
    assert ((out.x.mean(0) - torch.tensor(m, dtype=F64)).abs() < 4 * se_mean).all(), out.x.mean(0)
    se_cov = ((S_t**2 + torch.outer(torch.diag(S_t), torch.diag(S_t))) / n).sqrt()
    assert ((torch.cov(out.x.T) - S_t).abs() < 4 * se_cov).all(), torch.cov(out.x.T)


@pytest.mark.parametrize(("name", "process", "steps", "opts"), STOCHASTIC, ids=[c[0] for c in STOCHASTIC])
def test_stochastic_samplers_reproduce_mixture_weights(name, process, steps, opts):
    w, mu, sd = [0.3, 0.7], [-1.5, 1.0], [0.4, 0.3]
    n = 3000
    x_T, gen = _prior(process, n, 1, 11)
    out = sample(name.removesuffix("-vp"), _model_for(name, mixture_eps_model(process, w, mu, sd)), x_T, process,
                 steps, generator=gen, **opts)
    left = out.x[:, 0] < -0.25  # the modes are 4 and 4 standard deviations from this boundary
    frac = left.double().mean().item()
    assert abs(frac - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n), frac
    assert abs(out.x[left, 0].mean().item() + 1.5) < 4 * 0.4 / math.sqrt(left.sum().item())


@pytest.mark.parametrize("name", ["euler", "heun"])
def test_churn_acts_only_inside_its_sigma_window(name):
    # a window [S_min, S_max] that misses every grid sigma gives the deterministic sampler bit for bit;
    # a window that covers them changes the result; S_noise = 0 with churn is deterministic
    process = VE(sigma_max=80.0)
    model = gaussian_eps_model(process, M2, S2)
    x_T, _ = _prior(process, 50, 2, 6)
    plain = sample(name, model, x_T, process, 20).x
    outside = sample(name, model, x_T, process, 20, S_churn=40.0, S_min=100.0, S_max=200.0,
                     generator=torch.Generator().manual_seed(0)).x
    assert torch.equal(plain, outside)
    inside = sample(name, model, x_T, process, 20, S_churn=40.0, S_min=0.0, S_max=100.0,
                    generator=torch.Generator().manual_seed(0)).x
    assert (inside - plain).abs().max() > 1e-3
    quiet = [sample(name, model, x_T, process, 20, S_churn=40.0, S_noise=0.0,
                    generator=torch.Generator().manual_seed(k)).x for k in (0, 1)]
    assert torch.equal(quiet[0], quiet[1])


# --- identities: respacing, ES, learned variance -----------------------------------------------------------
def test_respacing_all_steps_equals_plain_ddpm():
    process = VPDiscrete("linear")
    new, kept = respace(process, "1000")
    assert kept == list(range(1, 1001)) and new.T == 1000
    torch.testing.assert_close(new.log_abar_table, process.log_abar_table, rtol=0, atol=1e-13)
    model = gaussian_eps_model(process, [0.5], [[0.3]])
    x_T, _ = _prior(process, 200, 1, 2)
    plain = sample_ddpm(model, x_T, process, uniform_grid(process, 1000),
                        generator=torch.Generator().manual_seed(0))
    resp = sample_ddpm(RespacedModel(model, kept), x_T, new, uniform_grid(new, 1000),
                       generator=torch.Generator().manual_seed(0))
    assert plain.nfe == resp.nfe == 1000
    # equal up to float64 rounding of the rebuilt betas (the same noise, the same model times)
    torch.testing.assert_close(resp.x, plain.x, rtol=0, atol=1e-11)


@pytest.mark.parametrize("variance", ["learned", "small", "large"])
def test_respaced_process_equals_the_respaced_grid(variance):
    process = VPDiscrete("cosine")
    new, kept = respace(process, "ddim25")
    torch.testing.assert_close(new.abar(torch.arange(1, 26, dtype=F64)),
                               process.abar(torch.tensor(kept, dtype=F64)), rtol=1e-12, atol=0)
    model = with_variance(gaussian_eps_model(process, [0.5], [[0.3]]), 0.4)
    x_T, _ = _prior(process, 100, 1, 3)
    a = sample_iddpm(model, x_T, process, respaced_grid(process, "ddim25"), variance=variance,
                     generator=torch.Generator().manual_seed(1))
    b = sample_iddpm(RespacedModel(model, kept), x_T, new, uniform_grid(new, 25), variance=variance,
                     generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a.x, b.x, rtol=0, atol=1e-10)


def test_learned_variance_step_has_the_interpolated_variance():
    process = VPDiscrete("linear")
    grid = torch.tensor([500.0, 400.0, 0.0], dtype=F64)
    n, v = 100_000, 0.3
    captured = []
    model = with_variance(declare(lambda x, t: torch.zeros_like(x), "eps"), v)
    sample_iddpm(model, torch.ones(n, 1, dtype=F64), process, grid,
                 generator=torch.Generator().manual_seed(0), callback=lambda info: captured.append(info["x"].clone()))
    beta = 1 - (process.abar(grid[0]) / process.abar(grid[1])).item()
    beta_tilde = beta * (1 - process.abar(grid[1]).item()) / (1 - process.abar(grid[0]).item())
    frac = (v + 1) / 2
    want = math.exp(frac * math.log(beta) + (1 - frac) * math.log(beta_tilde))
    assert abs(captured[0].var().item() - want) < 5 * want * math.sqrt(2 / n)


@pytest.mark.parametrize("name", ["ddpm", "iddpm", "ddim", "dpm-solver++", "heun", "sde"])
def test_epsilon_scaling_with_lambda_one_is_exactly_plain_sampling(name):
    process = VPDiscrete("linear")
    model = _model_for(name, gaussian_eps_model(process, M2, S2))
    x_T, _ = _prior(process, 50, 2, 4)
    plain = sample(name, model, x_T, process, 20, generator=torch.Generator().manual_seed(0))
    es = sample(name, EpsilonScaling(model, process, lam=1.0), x_T, process, 20,
                generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain.x, es.x) and plain.nfe == es.nfe


def test_epsilon_scaling_divides_eps_by_the_schedule():
    process = VPDiscrete("linear")
    model = with_variance(gaussian_eps_model(process, M2, S2), 0.2)
    x = torch.randn(4, 2, dtype=F64)
    t = torch.tensor([1.0, 250.0, 500.0, 1000.0], dtype=F64)
    es = EpsilonScaling(model, process, lam=1.017, slope=0.01)
    out = es(x, t)
    lam = 1.017 + 0.01 * t / 1000
    torch.testing.assert_close(out[:, :2], model(x, t)[:, :2] / lam[:, None])
    torch.testing.assert_close(out[:, 2:], model(x, t)[:, 2:])
    assert es.learned_variance and es.prediction == "eps"
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(64, 2, generator=gen, dtype=F64)
    plain = sample("iddpm-es", model, x_T, process, 10, es_lam=1.0,
                   generator=torch.Generator().manual_seed(1))
    ref = sample("iddpm", model, x_T, process, 10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(plain.x, ref.x)


# --- NFE, dispatcher, common options -----------------------------------------------------------------------
def test_nfe_counts():
    process = VE(sigma_max=20.0)
    x_T, _ = _prior(process, 8, 2, 5)
    for n in (1, 2, 7):
        grid = karras_time_grid(process, n)
        model = counted(gaussian_eps_model(process, M2, S2))
        assert sample_heun(model, x_T, process, grid).nfe == 2 * n - 1 == model.calls
        assert sample_euler(model, x_T, process, grid).nfe == n
    for order in (1, 2, 3):
        model = counted(gaussian_eps_model(process, M2, S2))
        out = sample_dpm_solver(model, x_T, process, dpm_grid(process, 12), order=order)
        assert out.nfe == 12 == model.calls
        model = counted(gaussian_eps_model(process, M2, S2))
        out = sample_dpm_solver(model, x_T, process, dpm_grid(process, 12), order=order, method="singlestep")
        assert out.nfe == 12 * order == model.calls
    # into sigma = 0 the last step is first order
    out = sample_dpm_solver(gaussian_eps_model(process, M2, S2), x_T, process,
                            dpm_grid(process, 12, denoise_to_zero=True), order=3, method="singlestep")
    assert out.nfe == 12 * 3 + 1
    assert sample("pc", gaussian_eps_model(process, M2, S2), x_T, process, 10).nfe == 20
    assert sample_sde(gaussian_eps_model(process, M2, S2), x_T, process, uniform_grid(process, 10),
                      corrector_steps=2).nfe == 30


@pytest.mark.parametrize("method", ["multistep", "singlestep"])
def test_dpm_solver_lowers_the_final_orders_only_for_short_runs(method):
    """DPM-Solver's rule: below 10 steps the last steps use order <= steps left; multistep warms up. The
    sampler runs exactly these orders: its samples equal those of the explicit ``orders=`` schedule (and differ
    from another schedule), and single-step spends ``order`` evaluations per step (callback ``nfe``)."""
    process = VPDiscrete("linear")
    x_T, _ = _prior(process, 8, 2, 3)

    def orders(n, lower):
        want = step_orders(n, 3, method, lower, [1.0] * n)
        seen = []
        model = counted(gaussian_eps_model(process, M2, S2))
        grid = dpm_grid(process, n)
        out = sample_dpm_solver(model, x_T, process, grid, order=3, method=method, lower_order_final=lower,
                                callback=lambda d: seen.append(d["nfe"]))
        assert out.nfe == model.calls == seen[-1] == (n if method == "multistep" else sum(want))
        if method == "singlestep":
            assert np.diff([0, *seen]).tolist() == want
        explicit = sample_dpm_solver(model, x_T, process, grid, method=method, orders=want)
        assert torch.equal(out.x, explicit.x)
        other = sample_dpm_solver(model, x_T, process, grid, method=method, orders=[1] * n)
        assert (other.x - out.x).abs().max() > 1e-6
        return want

    warm = [1, 2] if method == "multistep" else [3, 3]
    assert orders(5, True) == warm + [3, 2, 1]
    assert orders(5, False) == warm + [3, 3, 3]
    assert orders(12, True) == orders(12, False) == warm + [3] * 10


def _smoke_model(name, process):
    model = gaussian_eps_model(process, M2, S2)
    return with_variance(model, 0.0) if name.startswith("iddpm") else model


@pytest.mark.parametrize("name", DIFFUSION_SAMPLERS)
def test_every_sampler_by_name_is_reproducible_differentiable_and_reports(name):
    process = VPContinuous()
    model = _smoke_model(name, process)
    x_T = torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    a = sample(name, model, x_T, process, 6, generator=torch.Generator().manual_seed(1))
    b = sample(name, model, x_T, process, 6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.x, b.x) and a.nfe == b.nfe >= 6 and a.x.dtype == F64
    seen = []
    c = sample(name, model, x_T.float(), process, 6, callback=seen.append, progress=True, dtype=F64,
               generator=torch.Generator().manual_seed(1))
    # dtype=F64 runs the chain in float64 from a float32 start: only x_T's rounding separates it from `a`
    assert c.x.dtype == F64 and c.nfe == a.nfe
    torch.testing.assert_close(c.x, a.x, rtol=1e-5, atol=1e-5)
    assert seen and all(isinstance(info, dict) for info in seen)
    assert all("x" in info for info in seen)
    x_req = x_T.clone().requires_grad_(True)
    out = sample(name, model, x_req, process, 6, generator=torch.Generator().manual_seed(1))
    out.x.sum().backward()
    assert x_req.grad is not None and torch.isfinite(x_req.grad).all() and x_req.grad.abs().sum() > 0


def test_samplers_run_a_float32_network():
    from atdiff.networks.mlp import MLP
    from atdiff.precond import DiffusionModel

    torch.manual_seed(0)
    process = VPDiscrete("cosine")
    model = DiffusionModel(MLP(2, hidden=16, depth=2), process)
    torch.nn.init.normal_(model.net.out.weight, std=0.1)
    x_T = torch.randn(4, 2)
    for name in DIFFUSION_SAMPLERS:
        if name.startswith("iddpm"):
            continue
        out = sample(name, model, x_T, process, 4, generator=torch.Generator().manual_seed(0))
        assert out.x.dtype == torch.float32 and torch.isfinite(out.x).all(), name


def test_default_grids():
    p = VPDiscrete("linear")
    g = default_grid("dpm-solver++", p, 10)
    lam = 0.5 * p.log_snr(g)
    torch.testing.assert_close(lam[1:] - lam[:-1], (lam[1] - lam[0]).expand(10))  # logSNR: even in lambda
    assert g[0] == 1000 and g[-1] == 1
    g = default_grid("heun", VE(), 18)
    torch.testing.assert_close(g, karras_grid(0.002, 80.0, 18))
    g = default_grid("heun", p, 18)  # VP: the Karras grid in sigma / alpha
    want = karras_grid(edm_sigma(p, 1.0).item(), edm_sigma(p, 1000.0).item(), 18, append_zero=False)
    torch.testing.assert_close(edm_sigma(p, g[:-1]), want)
    assert default_grid("iddpm", p, 4).tolist() == [1000.0, 667.0, 334.0, 1.0, 0.0]
    uniform = default_grid("dpm-solver", p, 5, skip_type="time-uniform")
    torch.testing.assert_close(uniform, torch.tensor([1000.0, 800.2, 600.4, 400.6, 200.8, 1.0], dtype=F64))
    for process in (p, VPDiscrete("cosine"), VPContinuous(), VPContinuous("cosine"), VE()):
        t = torch.linspace(process.t_min, process.t_max, 101, dtype=F64)[1:]
        torch.testing.assert_close(process.t_from_log_snr(process.log_snr(t)), t, rtol=1e-10, atol=1e-10)


def test_sampler_help_and_bad_inputs_name_the_argument():
    text = sampler_help()
    assert all(name in text for name in REGISTRY) and len(text.splitlines()) == len(REGISTRY)
    p = VPDiscrete("linear")
    model = gaussian_eps_model(p, M2, S2)
    x = torch.randn(4, 2, dtype=F64)
    with pytest.raises(ValueError, match="valid samplers: .*dpm-solver\\+\\+.*heun"):
        sample("rk45-magic", model, x, p, 10)
    torch.testing.assert_close(sample("ddim", model, x, p, np.int64(5)).x, sample("ddim", model, x, p, 5).x)
    for bad in (0, -3, True, np.int64(0)):
        with pytest.raises(ValueError, match="^steps:"):
            sample("heun", model, x, p, bad)
    for name in ("ddim", "dpm-solver++", "heun", "sde", "ode"):
        with pytest.raises(ValueError, match="^grid:"):
            sample(name, model, x, p, torch.tensor([10.0, 20.0, 0.0]))
        with pytest.raises(ValueError, match="^grid:"):
            sample(name, model, x, p, torch.tensor([2000.0, 0.0]))
    for order in (0, 4, 2.5):
        with pytest.raises(ValueError, match="^order:"):
            sample_dpm_solver(model, x, p, dpm_grid(p, 5), order=order)
    with pytest.raises(ValueError, match="^solver:"):
        sample_dpm_solver(model, x, p, dpm_grid(p, 5), solver="unipc")
    with pytest.raises(ValueError, match="^skip_type:"):
        dpm_grid(p, 5, "logsnr-ish")
    with pytest.raises(ValueError, match="^S_churn:"):
        sample_heun(model, x, p, karras_time_grid(p, 5), S_churn=-1.0)
    with pytest.raises(ValueError, match="^corrector_steps:"):
        sample_sde(model, x, p, uniform_grid(p, 5), corrector_steps=-1)
    with pytest.raises(ValueError, match="^rtol, atol:"):
        sample_ode(model, x, p, uniform_grid(p, 5), rtol=0.0)
    with pytest.raises(ValueError, match="^variance:"):
        sample_iddpm(model, x, p, uniform_grid(p, 5))  # a model without learned variance
    with pytest.raises(ValueError, match="^grid_opts:"):
        sample("heun", model, x, p, karras_time_grid(p, 5), grid_opts={"rho": 3.0})
    with pytest.raises(ValueError, match="^process:"):
        respace(VE(), "10")
    with pytest.raises(ValueError, match="^lam, slope:"):
        EpsilonScaling(model, p, lam=0.0)

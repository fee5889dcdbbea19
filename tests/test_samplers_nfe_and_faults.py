"""The samplers' common contract: one callback schema, exact NFE budgets (``nfe=`` / ``steps_for_nfe``),
non-finite model output reported with its step and time, the ODE sampler on an x0-predicting model, and
argument errors that name the argument. The oracle is the exact eps (or x0) of Gaussian data N(m, S), written
inline as in tests/test_samplers.py."""

import math
import time

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from atdiff.precond import declare
from atdiff.processes import VE, VPContinuous, VPDiscrete
from atdiff.samplers import (
    CALLBACK_KEYS,
    DIFFUSION_SAMPLERS,
    REGISTRY,
    EpsilonScaling,
    default_grid,
    karras_time_grid,
    ode_log_likelihood,
    sample,
    sample_ddim,
    sample_heun,
    sample_ode,
    steps_for_nfe,
    uniform_grid,
)

F64 = torch.float64
M2, S2 = [1.0, -2.0], [[1.0, 0.4], [0.4, 0.5]]

pytestmark = pytest.mark.usefixtures("one_thread")


def gaussian_model(process, m, S, kind="eps", learned=False):
    """The exact eps (``kind="eps"``) or x0 (``"x0"``) of N(m, S); with ``learned`` a zero variance output
    is appended (for the IDDPM samplers). Counts its calls."""
    m, S = torch.as_tensor(m, dtype=F64), torch.as_tensor(S, dtype=F64)
    lam, U = torch.linalg.eigh(S)

    def model(x, t):
        model.calls += 1
        a, s = process.alpha(t).double()[:, None], process.sigma(t).double()[:, None]
        z = (x.double() - a * m) @ U
        eps = (s * z / (a**2 * lam + s**2)) @ U.T
        out = eps if kind == "eps" else (x.double() - s * eps) / a
        out = out.to(x.dtype)
        return torch.cat([out, torch.zeros_like(out)], dim=1) if learned else out

    model.calls, model.prediction, model.learned_variance = 0, kind, learned
    return model


def exact_flow(process, x_T, t_from, m, S):
    """The probability-flow map from ``t_from`` to the data."""
    m, S = torch.as_tensor(m, dtype=F64), torch.as_tensor(S, dtype=F64)
    lam, U = torch.linalg.eigh(S)
    a, s = process.alpha(t_from).double(), process.sigma(t_from).double()
    z = ((x_T - a * m) @ U) / torch.sqrt(a**2 * lam + s**2)
    return m + (z * lam.sqrt()) @ U.T


def _model_for(name, process, **kw):
    return gaussian_model(process, M2, S2, learned=name.startswith("iddpm"), **kw)


# --- one callback schema ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", DIFFUSION_SAMPLERS)
def test_every_callback_has_the_same_keys_and_the_final_nfe(name):
    process = VPDiscrete("linear")
    model = _model_for(name, process)
    x_T = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    seen = []
    out = sample(name, model, x_T, process, 5, callback=seen.append, generator=torch.Generator().manual_seed(1))
    assert seen and all(tuple(info) == CALLBACK_KEYS for info in seen)
    assert seen[-1]["nfe"] == out.nfe == model.calls
    assert [info["i"] for info in seen] == list(range(len(seen)))
    nfes = [info["nfe"] for info in seen]
    assert all(b > a for a, b in zip(nfes, nfes[1:], strict=False))
    assert all(isinstance(info["t"], float) for info in seen)
    assert all(info["x"].shape == x_T.shape and info["x0"].shape == x_T.shape for info in seen)
    if name == "ode":  # adaptive: one report per evaluation (x: the state evaluated), no next time
        assert all(info["s"] is None for info in seen)
    else:  # the grid: s of one step is t of the next; x after the last step is the result
        grid = default_grid(name, process, 5).tolist()
        assert [info["t"] for info in seen] == grid[:-1] and [info["s"] for info in seen] == grid[1:]
        torch.testing.assert_close(seen[-1]["x"], out.x, rtol=0, atol=0)


def test_callback_x0_is_the_denoised_estimate():
    # with the exact oracle the denoised estimate at each step is E[x0 | x_t], whose mean over a batch of prior
    # draws far from the data is close to m; at the last step it is the sample's own denoising
    process = VE(sigma_max=20.0)
    model = gaussian_model(process, M2, S2)
    x_T = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(2)) * 20
    seen = []
    sample("euler", model, x_T, process, 10, callback=seen.append)
    t = torch.tensor(seen[3]["t"], dtype=F64)
    x_t = seen[2]["x"]  # the state at the start of step 3
    s = process.sigma(t).double()
    m, S = torch.tensor(M2, dtype=F64), torch.tensor(S2, dtype=F64)
    want = m + (x_t - m) @ torch.linalg.solve(S + s**2 * torch.eye(2, dtype=F64), S)  # posterior mean, VE
    torch.testing.assert_close(seen[3]["x0"], want, rtol=1e-10, atol=1e-10)


# --- NFE budgets ------------------------------------------------------------------------------------------
NFES = (5, 8, 10, 20, 50)


def _attainable(name, n):
    """The documented rules: Heun 2N - 1 (odd), pc 2N (even), ode adaptive (never); the rest any N."""
    if name == "heun":
        return n % 2 == 1
    if name == "pc":
        return n % 2 == 0
    return name != "ode"


@pytest.mark.parametrize("name", DIFFUSION_SAMPLERS)
def test_nfe_budget_is_spent_exactly(name):
    process = VPDiscrete("cosine")
    x_T = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    for n in NFES:
        model = _model_for(name, process)
        if not _attainable(name, n):
            with pytest.raises(ValueError, match="^nfe: "):
                sample(name, model, x_T, process, nfe=n)
            assert model.calls == 0
            continue
        out = sample(name, model, x_T, process, nfe=n, generator=torch.Generator().manual_seed(1))
        assert out.nfe == model.calls == n, (name, n, out.nfe, model.calls)
        assert torch.isfinite(out.x).all()


def test_nfe_rules():
    assert steps_for_nfe("heun", 9).steps == 5 and steps_for_nfe("pc", 20).steps == 10
    assert steps_for_nfe("sde", 30, corrector_steps=2).steps == 10
    with pytest.raises(ValueError, match="^nfe: .*multiple of 3"):
        steps_for_nfe("sde", 10, corrector_steps=2)
    with pytest.raises(ValueError, match="^nfe: heun .*use 7 or 9"):
        steps_for_nfe("heun", 8)
    with pytest.raises(ValueError, match="^nfe: the ode sampler .*adaptively"):
        steps_for_nfe("ode", 10)
    # DPM-Solver-fast: K = nfe // 3 + 1 steps, order 3 but the last ones
    for n, orders in [(5, [3, 2]), (6, [3, 2, 1]), (7, [3, 3, 1]), (10, [3, 3, 3, 1]), (1, [1]), (2, [2])]:
        plan = steps_for_nfe("dpm-solver", n)
        assert plan.opts["orders"] == orders and plan.steps == len(orders) and sum(orders) == n
    assert steps_for_nfe("dpm-solver", 7, order=2).opts["orders"] == [2, 2, 2, 1]
    assert steps_for_nfe("dpm-solver++", 7) == (7, {})
    for bad in (0, -1, 2.5, True, "10"):
        with pytest.raises(ValueError, match="^nfe: "):
            steps_for_nfe("ddim", bad)
    with pytest.raises(ValueError, match="^nfe: "):
        steps_for_nfe("ddim", 10**11)
    p = VPDiscrete("linear")
    x = torch.randn(2, 2, dtype=F64)
    with pytest.raises(ValueError, match="^nfe: give either"):
        sample("ddim", gaussian_model(p, M2, S2), x, p, 10, nfe=10)
    with pytest.raises(ValueError, match="^orders: set by the NFE plan"):
        sample("dpm-solver", gaussian_model(p, M2, S2), x, p, nfe=10, orders=[1])
    with pytest.raises(ValueError, match="^grid_opts: "):
        sample("dpm-solver", gaussian_model(p, M2, S2), x, p, nfe=10, grid_opts={"denoise_to_zero": True})
    # DDIM's 'ddimN' respacing on T = 1000 has no integer stride for N = 300 (strides 3 and 4 give 334, 250)
    with pytest.raises(ValueError, match="^steps: improved-diffusion's 'ddim300'"):
        sample("ddim", gaussian_model(p, M2, S2), x, p, nfe=300)
    with pytest.raises(ValueError, match="^corrector_steps: "):
        steps_for_nfe("pc", 10, corrector_steps=-1)


def test_dpm_solver_fast_orders_converge_on_the_exact_flow():
    # the adaptive-order schedule is a real solver: error against the exact flow falls steeply with the NFE
    process = VPContinuous()
    x_T = torch.randn(16, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    errs = []
    for n in (10, 20, 40):
        out = sample("dpm-solver", gaussian_model(process, M2, S2), x_T, process, nfe=n)
        end = torch.tensor(1e-3, dtype=F64)
        a, s = process.alpha(end).double(), process.sigma(end).double()
        lam, U = torch.linalg.eigh(torch.tensor(S2, dtype=F64))
        m = torch.tensor(M2, dtype=F64)
        a0, s0 = process.alpha(torch.tensor(1.0, dtype=F64)).double(), process.sigma(
            torch.tensor(1.0, dtype=F64)).double()
        z = ((x_T - a0 * m) @ U) / torch.sqrt(a0**2 * lam + s0**2)
        exact = a * m + (z * torch.sqrt(a**2 * lam + s**2)) @ U.T
        errs.append((out.x - exact).norm(dim=1).mean().item())
    slope = -np.polyfit(np.log([10, 20, 40]), np.log(errs), 1)[0]
    assert slope > 2.5, (errs, slope)


# --- non-finite model output ------------------------------------------------------------------------------
def poisoned(model, t_bad, row=0):
    """``model`` with NaN in one row at every time ``t <= t_bad``."""

    def f(x, t, **cond):
        out = model(x, t, **cond)
        if bool((t <= t_bad).any()):
            out = out.clone()
            out[row] = float("nan")
        return out

    f.prediction, f.learned_variance = model.prediction, model.learned_variance
    return f


@pytest.mark.parametrize("name", DIFFUSION_SAMPLERS)
def test_non_finite_model_output_names_the_sampler_step_and_time(name):
    """The first step with an evaluation at ``t <= 0.45`` (found from a clean run's evaluation times and its
    callbacks' running NFE) is the one the error names, with that step's time."""
    process = VPContinuous()
    x_T = torch.randn(6, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    grid = uniform_grid(process, 10) if name != "ode" else torch.tensor([1.0, 0.0], dtype=F64)
    clean_model, times, reports = _model_for(name, process), [], []

    def spy(x, t):
        times.append(t[0].item())
        return clean_model(x, t)

    spy.prediction, spy.learned_variance = clean_model.prediction, clean_model.learned_variance
    sample(name, spy, x_T, process, grid, callback=reports.append, generator=torch.Generator().manual_seed(1))
    k = next(j for j, t in enumerate(times) if t <= 0.45)
    first = next(info for info in reports if info["nfe"] > k)
    fn_name = {"iddpm": "sample_ddpm", "iddpm-es": "sample_ddpm", "dpm-solver": "sample_dpm_solver",
               "dpm-solver++": "sample_dpm_solver"}.get(name, f"sample_{name}")
    bad = poisoned(_model_for(name, process), 0.45)
    with pytest.raises(FloatingPointError, match=rf"^{fn_name}: .* at step {first['i']} \(t = ") as err:
        sample(name, bad, x_T, process, grid, generator=torch.Generator().manual_seed(1))
    t_msg = float(str(err.value).split("t = ")[1].split(")")[0])
    assert math.isclose(t_msg, first["t"], rel_tol=1e-5), (str(err.value), first)
    if name == "ode":  # unchecked, dopri5's step control meets the NaN and gives up ("underflow in dt")
        return
    # with the check off the sampler runs through; the bad row is NaN and, pc included, the others are finite
    out = sample(name, bad, x_T, process, grid, generator=torch.Generator().manual_seed(1), check_finite=False)
    assert not torch.isfinite(out.x[0]).all() and torch.isfinite(out.x[1:]).all()


def test_pc_langevin_step_keeps_a_bad_row_to_itself():
    # the corrector's step size averages norms over the batch: a NaN row must not change the others
    process = VE(sigma_max=20.0)
    model = gaussian_model(process, M2, S2)
    x_T = torch.randn(6, 2, dtype=F64, generator=torch.Generator().manual_seed(0)) * 20
    ok = sample("pc", model, x_T[1:], process, 5, generator=torch.Generator().manual_seed(1))
    x_bad = x_T.clone()
    bad = poisoned(model, 100.0)  # every evaluation, row 0
    out = sample("pc", bad, x_bad, process, 5, generator=torch.Generator().manual_seed(1), check_finite=False)
    assert torch.isnan(out.x[0]).all() and torch.isfinite(out.x[1:]).all()
    # the good rows see the same step sizes as a batch without the bad row (the noise differs by one row)
    assert out.x[1:].abs().max() < 10 * ok.x.abs().max()


# --- ODE on x0-predicting models --------------------------------------------------------------------------
@pytest.mark.parametrize("process", [VPContinuous(), VPDiscrete("linear"), VE(sigma_max=20.0)], ids=repr)
def test_ode_sampler_handles_an_x0_model(process):
    """An x0-model's field divides by sigma: the ODE stops at the last grid time with sigma > 0 and denoises
    (like Euler / Heun's last step). It matches the exact flow as the eps-model does and agrees with Heun."""
    x_T = torch.randn(16, 2, dtype=F64, generator=torch.Generator().manual_seed(1)) * process.sigma(
        process.t_max).double()
    exact = exact_flow(process, x_T, torch.tensor(process.t_max, dtype=F64), M2, S2)
    x0_model = gaussian_model(process, M2, S2, kind="x0")
    out = sample("ode", x0_model, x_T, process, 40, rtol=1e-7, atol=1e-7)
    assert torch.isfinite(out.x).all() and out.nfe == x0_model.calls
    assert (out.x - exact).abs().max() < 2e-3, (out.x - exact).abs().max()
    rk4 = sample("ode", gaussian_model(process, M2, S2, kind="x0"), x_T, process, 40, method="rk4")
    assert rk4.nfe == 4 * 39 + 1 and (rk4.x - exact).abs().max() < 2e-3
    heun = sample_heun(gaussian_model(process, M2, S2, kind="x0"), x_T, process, karras_time_grid(process, 40))
    assert (out.x - heun.x).abs().max() < (heun.x - exact).abs().max() + 2e-3  # within Heun's own error
    # a two-point grid: integrate to default_t_end, then denoise
    two = sample_ode(gaussian_model(process, M2, S2, kind="x0"), x_T, process,
                     torch.tensor([process.t_max, process.t_min], dtype=F64), rtol=1e-7, atol=1e-7)
    assert (two.x - exact).abs().max() < 2e-3
    # the eps-model's ODE still integrates all the way to sigma = 0
    eps = sample("ode", gaussian_model(process, M2, S2), x_T, process, 40, rtol=1e-7, atol=1e-7)
    assert (eps.x - exact).abs().max() < 1e-4


def test_ode_log_likelihood_refuses_an_x0_model_at_sigma_zero():
    process = VPContinuous()
    x = torch.randn(3, 2, dtype=F64)
    with pytest.raises(ValueError, match="^t_start: an x0-predicting model"):
        ode_log_likelihood(gaussian_model(process, M2, S2, kind="x0"), x, process)
    res = ode_log_likelihood(gaussian_model(process, M2, S2, kind="x0"), x, process, t_start=1e-3)
    assert torch.isfinite(res.log_likelihood).all()


# --- argument errors --------------------------------------------------------------------------------------
def test_bad_arguments_name_the_argument():
    p = VPDiscrete("linear")
    model = gaussian_model(p, M2, S2)
    x = torch.randn(4, 2, dtype=F64)
    grid = uniform_grid(p, 5)
    for bad in (-1.0, 0.0, float("nan"), float("inf"), True):
        for fn in (sample_ddim,):
            with pytest.raises(ValueError, match="^clip_x0: "):
                fn(model, x, p, grid, clip_x0=bad)
        with pytest.raises(ValueError, match="^clip_x0: "):
            sample("ddpm", model, x, p, 5, clip_x0=bad)
    for bad in (float("inf"), float("nan"), -1.0):
        with pytest.raises(ValueError, match="^S_noise: "):
            sample("heun", model, x, p, 5, S_noise=bad)
        with pytest.raises(ValueError, match="^S_churn: "):
            sample("euler", model, x, p, 5, S_churn=bad)
        with pytest.raises(ValueError, match="^eta: "):
            sample("ddim", model, x, p, 5, eta=bad)
    with pytest.raises(ValueError, match="^snr: "):
        sample("pc", model, x, p, 5, snr=float("inf"))
    with pytest.raises(ValueError, match="^lam: "):
        EpsilonScaling(model, p, lam=float("inf"))
    for bad in ("10", 2.5, None, object()):
        with pytest.raises(ValueError, match="^steps_or_grid: "):
            sample("ddim", model, x, p, bad)
    for bad in (True, 0, -2):
        with pytest.raises(ValueError, match="^steps: "):
            sample("ddim", model, x, p, bad)
    start = time.perf_counter()
    for name in REGISTRY:  # refused before anything is allocated
        with pytest.raises(ValueError, match="^steps: "):
            sample(name, model, x, p, 10**11)
    assert time.perf_counter() - start < 1.0
    for name in ("ddpm", "iddpm", "ddim", "sde"):  # integer grids of a 1000-step process
        with pytest.raises(ValueError, match="^steps: .*1000"):
            sample(name, model, x, p, 2000)
    # dtypes: half precision and integers refused, or cast by dtype=; B = 0 refused
    with pytest.raises(ValueError, match="^x_T: samplers run in float32 or float64"):
        sample("ddim", model, x.half(), p, 5)
    with pytest.raises(ValueError, match="^x_T: expected a floating-point tensor"):
        sample("ddim", model, torch.ones(4, 2, dtype=torch.int64), p, 5)
    half = sample("ddim", model, x.half(), p, 5, dtype=F64)
    torch.testing.assert_close(half.x, sample("ddim", model, x.half().double(), p, 5).x, rtol=0, atol=0)
    with pytest.raises(ValueError, match="^dtype: "):
        sample("ddim", model, x, p, 5, dtype=torch.float16)
    with pytest.raises(ValueError, match="^x_T: expected shape \\(B, ...\\) with B >= 1"):
        sample("ddim", model, x[:0], p, 5)
    net = torch.nn.Linear(2, 2)
    net_model = declare(lambda x, t: net(x), "eps")
    with pytest.raises(RuntimeError):  # a plain function hides its parameters: torch's own error
        sample("ddim", net_model, x, p, 5)

    class Net(torch.nn.Module):
        prediction = "eps"

        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, x, t):
            return self.lin(x)

    with pytest.raises(ValueError, match="^dtype: the sampler runs in torch.float64 but the model's parameters "
                                         "are torch.float32; pass dtype=torch.float32"):
        sample("ddim", Net(), x.float(), p, 5, dtype=F64)
    assert sample("ddim", Net(), x, p, 5, dtype=torch.float32).x.dtype == torch.float32


@given(value=st.floats(allow_nan=True, allow_infinity=True, width=64))
def test_clip_and_churn_noise_accept_exactly_the_finite_values_in_range(value):
    """Property: ``clip_x0`` takes any finite number > 0 and clamps the denoised estimate to it; ``S_noise`` any
    finite number >= 0; everything else is a ``ValueError`` naming the argument."""
    p = VPDiscrete("linear")
    model = gaussian_model(p, M2, S2)
    x = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(0)) * 5
    finite = math.isfinite(value)
    seen = []
    if finite and value > 0:
        sample("ddim", model, x, p, 2, clip_x0=value, callback=seen.append)
        assert all(info["x0"].abs().max() <= value for info in seen)
    else:
        with pytest.raises(ValueError, match="^clip_x0: "):
            sample("ddim", model, x, p, 2, clip_x0=value)
    if finite and value >= 0:
        try:
            out = sample("euler", model, x, p, 2, S_churn=1.0, S_noise=value, generator=torch.Generator())
            assert torch.isfinite(out.x).all()
        except FloatingPointError:  # accepted, but noise scaled by ~1e300 overflows: reported, not silent
            assert value > 1e100
    else:
        with pytest.raises(ValueError, match="^S_noise: "):
            sample("euler", model, x, p, 2, S_churn=1.0, S_noise=value)


# --- DPM-Solver++ data-prediction clipping -----------------------------------------------------------------
@pytest.mark.parametrize("method", ["multistep", "singlestep"])
def test_dpm_solver_pp_clips_every_data_prediction_and_order_one_equals_clipped_ddim(method):
    """``clip_x0`` clamps each x0 prediction before it enters an update: every reported x0 lies in the box; a bound
    above every unclipped prediction changes nothing (bitwise); and first-order DPM-Solver++ is DDIM, also clipped."""
    from atdiff.samplers.dpm_solver import sample_dpm_solver

    p = VPDiscrete("cosine")
    model = gaussian_model(p, M2, S2)
    x = torch.randn(16, 2, dtype=F64, generator=torch.Generator().manual_seed(3)) * 3
    grid = uniform_grid(p, 8)
    free, clipped = [], []
    plain = sample_dpm_solver(model, x, p, grid, method=method, callback=free.append).x
    widest = max(float(info["x0"].abs().max()) for info in free)
    assert widest > 0.5  # the bound below must bite
    out = sample_dpm_solver(model, x, p, grid, method=method, clip_x0=0.5, callback=clipped.append).x
    assert all(float(info["x0"].abs().max()) <= 0.5 for info in clipped)
    assert not torch.equal(out, plain)
    loose = sample_dpm_solver(model, x, p, grid, method=method, clip_x0=2 * widest).x
    assert torch.equal(loose, plain)
    first = sample_dpm_solver(model, x, p, grid, order=1, method=method, clip_x0=0.5).x
    torch.testing.assert_close(first, sample_ddim(model, x, p, grid, clip_x0=0.5).x, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="^clip_x0: clipping applies to the data prediction"):
        sample_dpm_solver(model, x, p, grid, solver="dpmsolver", clip_x0=1.0)
    with pytest.raises(ValueError, match="^clip_x0: "):
        sample("dpm-solver++", model, x, p, 5, clip_x0=-1.0)


@pytest.mark.parametrize("name", sorted(DIFFUSION_SAMPLERS))
def test_registry_says_which_samplers_clip(name):
    """``SamplerSpec.clips`` is true exactly for the samplers that accept ``clip_x0`` (and then honour it); the
    consistency sampler has no x0 prediction to clip (its f is the sample)."""
    assert not REGISTRY["consistency"].clips
    p = VPDiscrete("cosine")
    model = gaussian_model(p, M2, S2)
    x = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(0)) * 4
    opts = {"method": "rk4"} if name == "ode" else {"variance": "small"} if name.startswith("iddpm") else {}
    if REGISTRY[name].clips:
        seen = []
        sample(name, model, x, p, 3, clip_x0=0.25, callback=seen.append, generator=torch.Generator(), **opts)
        assert seen and all(float(info["x0"].abs().max()) <= 0.25 for info in seen)
    else:
        with pytest.raises((TypeError, ValueError)):
            sample(name, model, x, p, 3, clip_x0=0.25, generator=torch.Generator(), **opts)

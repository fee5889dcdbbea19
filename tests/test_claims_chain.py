"""Tests of the chain claims (C1, C2, C3, C9, C10 in ``theory.claims``): each check holds at random
configurations and fails when fed deliberately wrong quantities; every claim returns a JSON-ready verdict."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from atdiff.processes import VE, VPDiscrete
from atdiff.samplers import karras_grid, respaced_grid
from theory.claims import CLAIMS, Verdict, run_claims
from theory.claims.c1_c3 import check_prop1, check_propagation, prop1_rhs_gradient, prop1_terms, propagation_terms
from theory.claims.c2 import mismatch_path
from theory.claims.c9 import (
    check_drift,
    coupling_drift_exact,
    coupling_drift_mc,
    drift_draws,
    drift_formula,
    drift_independent,
    drift_paper,
)
from theory.claims.c10 import (
    cd_fixed_point,
    check_consistency_map,
    consistency_map,
    consistency_residuals,
    teacher_coefficients,
)
from theory.claims.chain_common import model_steps, perturbed_model, random_gaussian
from theory.gaussian import Gaussian, oracle_model
from theory.linear import gaussian_reverse_step

F64 = torch.float64
CHAIN_IDS = ["C1", "C2", "C3", "C9", "C10"]
FEW = settings(max_examples=6, deadline=None)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (see conftest.py)


def noisy_chain(process, nfe: int, sampler: str):
    """A grid on which every model transition of ``sampler`` has noise (those that end noiseless stop at t_1)."""
    grid = respaced_grid(process, nfe)
    return grid if sampler == "ddpm-large+" else grid[:-1]


config = st.fixed_dictionaries({
    "d": st.integers(1, 4),
    "schedule": st.sampled_from(["linear", "cosine"]),
    "nfe": st.integers(2, 12),
    "size": st.floats(0.0, 0.3),
    "seed": st.integers(0, 10_000),
})


# ------------------------------------------------------------------------------------------------------------
# C1
# ------------------------------------------------------------------------------------------------------------
@FEW
@given(cfg=config, sampler=st.sampled_from(["ddpm-small+", "ddpm-large+"]))
def test_prop1_bound_holds_at_random_configurations(cfg, sampler):
    process = VPDiscrete(cfg["schedule"])
    data = random_gaussian(cfg["d"], cfg["seed"])
    grid = noisy_chain(process, cfg["nfe"], sampler)
    steps = model_steps(perturbed_model(data, process, cfg["size"], cfg["seed"]), process, grid, cfg["d"], sampler)
    terms = prop1_terms(data, process, grid, steps)
    holds, slack = check_prop1(*terms)
    assert holds, slack
    assert abs(float(slack[0])) <= 1e-12 * (1 + float(terms.prior_kl))  # an identity at t = T


def c1_terms(size: float = 0.1, sampler: str = "ddpm-large+"):
    process = VPDiscrete("linear")
    data = random_gaussian(3, 1)
    grid = noisy_chain(process, 8, sampler)
    steps = model_steps(perturbed_model(data, process, size, 1), process, grid, 3, sampler)
    return process, data, grid, steps, prop1_terms(data, process, grid, steps)


def test_prop1_check_detects_dropped_terms():
    *_, terms = c1_terms()
    assert check_prop1(*terms)[0]
    assert not check_prop1(terms.lhs, torch.zeros((), dtype=F64), terms.step_kls)[0]  # prior KL dropped
    assert not check_prop1(terms.lhs, terms.prior_kl, torch.zeros_like(terms.step_kls))[0]  # path terms dropped
    # an inflated left side (e.g. KL in the wrong direction scaled up) beyond the slack fails
    _, slack = check_prop1(*terms)
    assert not check_prop1(terms.lhs + 1.01 * slack.clamp_min(0).max(), terms.prior_kl, terms.step_kls)[0]


def test_prop1_check_detects_a_wrong_reverse_transition():
    """With q(x_s | x_t) replaced by the model's own transition the path terms vanish and the bound fails."""
    process, data, grid, steps, terms = c1_terms()
    q = [gaussian_reverse_step(data, process, t, s) for t, s in zip(grid[:-1], grid[1:], strict=True)]
    assert check_prop1(*prop1_terms(data, process, grid, steps, reverse=q))[0]
    assert not check_prop1(*prop1_terms(data, process, grid, steps, reverse=steps))[0]


@pytest.mark.parametrize("sampler", ["ddpm-small+", "ddpm-large+"])
def test_bayes_eps_minimises_the_prop1_right_side(sampler):
    process = VPDiscrete("cosine")
    data = random_gaussian(2, 3)
    grid = noisy_chain(process, 5, sampler)
    n = len(grid) - 1
    rhs_star, grad_star, _ = prop1_rhs_gradient(data, process, grid, sampler, torch.zeros(n, 2, 3, dtype=F64))
    g = torch.Generator().manual_seed(0)
    for scale in (1e-3, 0.1):
        delta = scale * torch.randn(n, 2, 3, generator=g, dtype=F64)
        rhs, grad, _ = prop1_rhs_gradient(data, process, grid, sampler, delta)
        assert rhs > rhs_star
        assert float(grad_star.norm()) < 1e-6 * float(grad.norm())


# ------------------------------------------------------------------------------------------------------------
# C2
# ------------------------------------------------------------------------------------------------------------
def test_mismatch_path_vanishes_for_the_exact_reverse_chain():
    """Sanity of the C2 pipeline: the chain of the true reverse transitions started at q(x_T) is exact."""
    process = VPDiscrete("linear")
    data = random_gaussian(2, 5)
    grid = respaced_grid(process, 6)
    steps = [gaussian_reverse_step(data, process, t, s) for t, s in zip(grid[:-1], grid[1:], strict=True)]
    kl, w2 = mismatch_path(data, process, grid, steps)
    assert float(kl[1:].max()) < 1e-3 and float(w2[0]) > 0  # only the prior mismatch N(0, I) vs q(x_T) remains
    assert bool((kl[1:] <= kl[0] + 1e-12).all())  # a common Markov kernel contracts KL


# ------------------------------------------------------------------------------------------------------------
# C3
# ------------------------------------------------------------------------------------------------------------
@FEW
@given(cfg=config, sampler=st.sampled_from(["ddpm-small+", "ddpm-large+", "ddim-0.5", "ddim-1"]))
def test_propagation_holds_at_random_configurations(cfg, sampler):
    process = VPDiscrete(cfg["schedule"])
    data = random_gaussian(cfg["d"], cfg["seed"])
    grid = noisy_chain(process, cfg["nfe"], sampler)
    steps = model_steps(perturbed_model(data, process, cfg["size"], cfg["seed"]), process, grid, cfg["d"], sampler)
    holds, slack = check_propagation(*propagation_terms(data, process, grid, steps))
    assert holds, slack


def test_propagation_check_detects_a_wrong_reverse_transition():
    process = VPDiscrete("linear")
    data = random_gaussian(3, 2)
    grid = noisy_chain(process, 8, "ddpm-large+")
    steps = model_steps(perturbed_model(data, process, 0.1, 2), process, grid, 3, "ddpm-large+")
    assert check_propagation(*propagation_terms(data, process, grid, steps))[0]
    # the model's own transition as the reference: the one-step terms vanish, and the KL does grow
    by_index = {(float(t), float(s)): st_ for t, s, st_ in zip(grid[:-1], grid[1:], steps, strict=True)}
    own = propagation_terms(data, process, grid, steps, reverse=lambda t, s: by_index[(float(t), float(s))])
    assert not check_propagation(*own)[0]
    # the reverse transition of another data law
    other = random_gaussian(3, 77)
    wrong = propagation_terms(data, process, grid, steps, reverse=lambda t, s: gaussian_reverse_step(other, process,
                                                                                                    t, s))
    right = propagation_terms(data, process, grid, steps)
    assert not check_propagation(right.kl, wrong.step_kls * 0.0)[0]
    assert not torch.allclose(wrong.step_kls, right.step_kls)


# ------------------------------------------------------------------------------------------------------------
# C9
# ------------------------------------------------------------------------------------------------------------
@FEW
@given(schedule=st.sampled_from(["linear", "cosine"]), t=st.integers(2, 1000), frac=st.floats(0.0, 0.99),
       eta=st.floats(0.0, 1.0))
def test_drift_identity_holds_exactly(schedule, t, frac, eta):
    process = VPDiscrete(schedule)
    s = int(frac * (t - 1))
    exact = torch.tensor([coupling_drift_exact(process, t, s, eta), coupling_drift_exact(process, t, s, "independent")],
                         dtype=F64)
    formula = torch.tensor([drift_formula(process, t, s, eta), drift_independent(process, t, s)], dtype=F64)
    assert check_drift(exact, formula, exact, torch.zeros(2, dtype=F64))[0]
    assert abs(drift_formula(process, t, s, 1.0) - drift_paper(process, t, s)) < 1e-14


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_drift_monte_carlo_agrees_and_a_wrong_formula_is_detected(eta):
    process = VPDiscrete("linear")
    data = Gaussian(torch.zeros(4, dtype=F64), torch.eye(4, dtype=F64))
    t, s = 400, 300
    mean, se = coupling_drift_mc(data, process, t, s, eta, drift_draws(data, 20000, torch.Generator().manual_seed(1)))
    exact = torch.tensor([coupling_drift_exact(process, t, s, eta)], dtype=F64)
    formula = torch.tensor([drift_formula(process, t, s, eta)], dtype=F64)
    mc, se_t = torch.tensor([mean], dtype=F64), torch.tensor([se], dtype=F64)
    assert check_drift(exact, formula, mc, se_t)[0]
    # the paper's formula is the eta = 1 drift; at eta = 0 it is wrong and the check says so
    md = torch.tensor([drift_paper(process, t, s)], dtype=F64)
    assert check_drift(exact, md, mc, se_t)[0] == (eta == 1.0)
    # a Monte Carlo mean far from the exact value fails too
    assert not check_drift(exact, formula, mc + 20 * se_t, se_t)[0]


# ------------------------------------------------------------------------------------------------------------
# C10
# ------------------------------------------------------------------------------------------------------------
def c10_points(s_data: float, n: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    process = VE(sigma_min=0.002, sigma_max=80.0)
    data = Gaussian(torch.zeros(1, dtype=F64), torch.tensor([[s_data**2]], dtype=F64))
    x = 2.0 * torch.randn(n, 1, generator=g, dtype=F64)
    t = 0.002 + 80.0 * torch.rand(n, generator=g, dtype=F64) ** 3
    return process, data, x, t


@FEW
@given(s_data=st.floats(0.1, 3.0), seed=st.integers(0, 1000))
def test_consistency_map_checks_hold(s_data, seed):
    process, data, x, t = c10_points(s_data, seed=seed)
    res = consistency_residuals(lambda x, t: consistency_map(x, t, s_data, 0.002), data, process, x, t, 0.002)
    assert check_consistency_map(res)[0], res


@pytest.mark.parametrize("wrong", [
    lambda x, t: x * 0.5 / (0.25 + t[:, None] ** 2).sqrt(),  # t_min term dropped: f(x, t_min) != x
    lambda x, t: x * math.sqrt(0.25 + 0.002**2) / (0.25 + t[:, None] ** 2),  # wrong exponent: not a flow invariant
    lambda x, t: x * math.sqrt(0.3 + 0.002**2) / (0.3 + t[:, None] ** 2).sqrt(),  # the map of another data law
], ids=["no-t_min", "exponent", "wrong-s"])
def test_consistency_map_check_detects_wrong_maps(wrong):
    process, data, x, t = c10_points(0.5)
    assert not check_consistency_map(consistency_residuals(wrong, data, process, x, t, 0.002))[0]


@FEW
@given(s_data=st.floats(0.2, 2.0), n_points=st.integers(3, 25))
def test_cd_fixed_point_with_the_exact_teacher_is_the_consistency_map(s_data, n_points):
    process = VE(sigma_min=0.002, sigma_max=80.0)
    data = Gaussian(torch.zeros(1, dtype=F64), torch.tensor([[s_data**2]], dtype=F64))
    grid = karras_grid(0.002, 80.0, n_points, append_zero=False)
    g = cd_fixed_point(teacher_coefficients(oracle_model(data, process), process, grid, "exact"))
    exact = consistency_map(torch.ones(len(grid), 1, dtype=F64), grid, s_data, 0.002)[:, 0]
    torch.testing.assert_close(g, exact, rtol=1e-12, atol=0)
    # the Euler teacher's fixed point is not the consistency map
    euler = cd_fixed_point(teacher_coefficients(oracle_model(data, process), process, grid, "euler"))
    assert float((euler / exact - 1).abs().max()) > 1e-6


# ------------------------------------------------------------------------------------------------------------
# the claims themselves
# ------------------------------------------------------------------------------------------------------------
def test_chain_claims_are_registered():
    run_claims([], quick=True)  # loads the claim modules
    assert all(cid in CLAIMS for cid in CHAIN_IDS)


@pytest.mark.parametrize("cid", CHAIN_IDS)
def test_quick_claims_return_json_ready_verdicts(cid, tmp_path):
    (v,) = run_claims([cid], quick=True, seed=1, out=tmp_path)
    assert isinstance(v, Verdict) and v.id == cid
    j = v.to_json()
    assert json.loads(json.dumps(j, allow_nan=False)) == j
    assert v.figures and all((tmp_path / p.split("/")[-1]).is_file() for p in v.figures)
    if v.kind == "check":
        assert v.holds, (v.margin, v.notes)
    assert math.isfinite(v.margin)

"""Consistency models: distances, levels, curricula, the CD teacher's order, shared dropout, CM-AT target modes,
resume, the consistency sampler, bad input. Closed forms for Gaussian data are re-derived here (VE path)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from atdiff.consistency import (
    CM_AT_PRESETS,
    ConsistencyDraw,
    ConsistencyLoss,
    Curriculum,
    chain_updates,
    cm_at_preset,
    consistency_distance,
    ct_ema_decay,
    ct_loss,
    ct_num_levels,
    ict_loss,
    ict_num_levels,
    karras_sigmas,
    lognormal_level_probs,
    pseudo_huber_c,
)
from atdiff.precond import ConsistencyModel, declare
from atdiff.processes import VE, VPDiscrete
from atdiff.samplers.consistency import consistency_grid, sample_consistency
from atdiff.train import free_at_step, train_step

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64
SMIN, SMAX = 0.002, 80.0


# --- Gaussian closed forms on the VE path x = x0 + sigma z -----------------------------------------------------
def exact_map(m: torch.Tensor, S: torch.Tensor):
    """The exact consistency function of N(m, S): f(x, s) = m + U diag(sqrt((lam + smin^2)/(lam + s^2))) U^T (x - m)
    (the probability-flow ODE keeps (x - m) in eigen-coordinates over sqrt(lam + s^2) constant)."""
    lam, U = torch.linalg.eigh(S)

    def f(x, s):
        ratio = ((lam + SMIN**2) / (lam + s.to(F64)[:, None] ** 2)).sqrt()
        return m + (((x - m) @ U) * ratio) @ U.T
    return declare(f, prediction="x0")


def oracle_eps(m: torch.Tensor, S: torch.Tensor):
    """E[z | x_sigma = x] = sigma (S + sigma^2 I)^{-1} (x - m) for data N(m, S)."""
    eye = torch.eye(len(m), dtype=F64)

    def eps(x, s):
        s = s.to(F64)
        C = S + s[:, None, None] ** 2 * eye
        return s[:, None] * torch.linalg.solve(C, (x - m)[..., None])[..., 0]
    return declare(eps, prediction="eps")


def cd_chain_error(solver: str, N: int, m, S, n: int = 64) -> float:
    """Sum over the N - 1 pairs of the mean per-sample RMS CD error of the exact consistency map with the exact
    (oracle) teacher step: the discretisation error accumulated along the chain."""
    process = VE(SMIN, SMAX)
    loss = ConsistencyLoss(process, Curriculum("fixed", N=N, mu0=0.0), teacher=oracle_eps(m, S), solver=solver,
                           share_dropout=False)
    sig = loss.sigmas()
    g = torch.Generator().manual_seed(0)
    x0 = m + torch.randn(n, len(m), generator=g, dtype=F64) @ torch.linalg.cholesky(S).T
    z = torch.randn(n, len(m), generator=g, dtype=F64)
    pairs = N - 1
    t = sig[1:].repeat_interleave(n)
    s = sig[:-1].repeat_interleave(n)
    record = ConsistencyDraw(t, z.repeat(pairs, 1), None, s, None)
    per = loss.evaluate(exact_map(m, S), x0.repeat(pairs, 1), record).sqrt()
    return float(per.reshape(pairs, n).mean(1).sum())


DATA = {"1d": (torch.tensor([0.5], dtype=F64), torch.tensor([[0.09]], dtype=F64)),
        "aniso": (torch.tensor([0.3, -0.2], dtype=F64), torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=F64))}


@pytest.mark.parametrize("data", sorted(DATA))
@pytest.mark.parametrize("solver, order", [("euler", 1), ("heun", 2)])
def test_cd_loss_of_exact_map_is_teacher_discretisation_error_of_the_step_order(data, solver, order):
    m, S = DATA[data]
    Ns = [16, 32, 64, 128]
    errs = [cd_chain_error(solver, N, m, S) for N in Ns]
    slope = np.polyfit(np.log(Ns), np.log(errs), 1)[0]
    print(f"{data} {solver}: chain errors {errs}, slope {slope:.3f}")
    assert abs(slope + order) < 0.2, (slope, errs)
    # not a vacuous zero: an inconsistent map (the identity) has a chain error of order the data scale
    wrong = declare(lambda x, s: x, prediction="x0")
    process = VE(SMIN, SMAX)
    loss = ConsistencyLoss(process, Curriculum("fixed", N=16, mu0=0.0), teacher=oracle_eps(m, S), solver=solver)
    x0 = m.expand(32, -1).clone()
    rec = loss.draw(x0, torch.Generator().manual_seed(1))
    assert loss.evaluate(wrong, x0, rec).mean() > 1e3 * errs[-1] ** 2


def test_exact_map_helper_is_constant_along_the_exact_flow():
    """The reference map of these tests: f(x_t, t) = f(x_s, s) when x_s is the exact flow image of x_t (for the
    data N(m, S): x_s = m + U diag(sqrt((lam + s^2) / (lam + t^2))) U^T (x_t - m)), and f(x, smin) = x."""
    m, S = DATA["aniso"]
    f = exact_map(m, S)
    lam, U = torch.linalg.eigh(S)
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(16, 2, generator=g, dtype=F64) * 3
    t = karras_sigmas(20)[torch.randint(1, 20, (16,), generator=g)]
    s = t * torch.rand(16, generator=g, dtype=F64).clamp_min(0.01)
    x_s = m + (((x_t - m) @ U) * ((lam + s[:, None] ** 2) / (lam + t[:, None] ** 2)).sqrt()) @ U.T
    assert torch.allclose(f(x_t, t), f(x_s, s), atol=1e-12)
    assert torch.allclose(f(x_t, torch.full((16,), SMIN, dtype=F64)), x_t, atol=1e-15)


# --- distances, levels, curricula ----------------------------------------------------------------------------
def test_distances_against_formulas():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, 4, generator=g, dtype=F64), torch.randn(5, 3, 4, generator=g, dtype=F64)
    diff = (a - b).reshape(5, -1)
    assert torch.allclose(consistency_distance(a, b, "l2"), (diff**2).sum(1) / 12)
    assert torch.allclose(consistency_distance(a, b, "l1"), diff.abs().sum(1) / 12)
    c = 0.00054 * math.sqrt(12)
    assert pseudo_huber_c(12) == pytest.approx(c)
    ph = consistency_distance(a, b, "pseudo-huber")
    assert torch.allclose(ph, torch.tensor([math.sqrt(float((r**2).sum()) + c * c) - c for r in diff], dtype=F64))
    tiny = consistency_distance(a * 1e-7, b * 1e-7, "pseudo-huber")  # quadratic regime: ||d||^2 / (2c)
    assert torch.allclose(tiny, ((diff * 1e-7) ** 2).sum(1) / (2 * c), rtol=1e-3)


def test_karras_sigmas_formula_and_end_points():
    sig = karras_sigmas(7, SMIN, SMAX, 7.0)
    i = torch.arange(7, dtype=F64)
    ref = (SMIN ** (1 / 7) + i / 6 * (SMAX ** (1 / 7) - SMIN ** (1 / 7))) ** 7
    assert torch.allclose(sig, ref, rtol=1e-12)
    assert sig[0].item() == SMIN and sig[-1].item() == SMAX
    assert bool((sig[1:] > sig[:-1]).all())


def test_ct_curriculum_endpoints_and_monotone():
    K, s0, s1, mu0 = 1000, 2, 150, 0.9
    assert ct_num_levels(0, K, s0, s1) == s0 and ct_num_levels(K, K, s0, s1) == s1 + 1
    assert ct_ema_decay(0, K, s0, s1, mu0) == pytest.approx(mu0)
    assert ct_ema_decay(K, K, s0, s1, mu0) == pytest.approx(math.exp(s0 * math.log(mu0) / (s1 + 1)))
    Ns = [ct_num_levels(k, K, s0, s1) for k in range(K + 1)]
    mus = [ct_ema_decay(k, K, s0, s1, mu0) for k in range(K + 1)]
    assert all(b >= a for a, b in zip(Ns, Ns[1:], strict=False))
    assert all(b >= a for a, b in zip(mus, mus[1:], strict=False))
    k = 437  # a middle point against the formula written out
    assert Ns[k] == math.ceil(math.sqrt(k / K * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1


def test_ict_curriculum_doubles_between_its_endpoints():
    K, s0, s1 = 8000, 10, 1280
    Ns = [ict_num_levels(k, K, s0, s1) for k in range(K + 1)]
    assert Ns[0] == s0 + 1 and Ns[-1] == s1 + 1
    assert all(b >= a for a, b in zip(Ns, Ns[1:], strict=False))
    assert sorted(set(Ns)) == [s0 * 2**j + 1 for j in range(8)]  # 10, 20, ..., 1280 (+1): K' = K / 8 each
    assert Ns[999] == 11 and Ns[1000] == 21


def test_lognormal_level_probs_match_erf_formula():
    sig = karras_sigmas(11)
    p = lognormal_level_probs(sig, -1.1, 2.0)
    e = [math.erf((math.log(s) + 1.1) / (math.sqrt(2) * 2.0)) for s in sig.tolist()]
    raw = torch.tensor([e[i + 1] - e[i] for i in range(10)], dtype=F64)
    assert torch.allclose(p, raw / raw.sum(), rtol=1e-12) and p.sum().item() == pytest.approx(1.0)


def test_inverse_gap_weighting_and_draw_levels_are_adjacent():
    process = VE(SMIN, SMAX)
    net = ConsistencyModel(_Net(2), sigma_data=0.5).double()
    loss = ict_loss(process, total_steps=100)
    x0 = torch.randn(32, 2, dtype=F64)
    rec = loss.draw(x0, torch.Generator().manual_seed(3))
    sig = loss.sigmas().tolist()
    for t, s in zip(rec.t.tolist(), rec.s.tolist(), strict=True):
        assert sig.index(s) + 1 == sig.index(t)
    uniform = ConsistencyLoss(process, loss.curriculum, distance="pseudo-huber", sampling="lognormal")
    assert torch.allclose(loss.evaluate(net, x0, rec), uniform.evaluate(net, x0, rec) / (rec.t - rec.s))


def test_curriculum_state_dict_round_trip():
    c = Curriculum("ct", s0=2, s1=150, mu0=0.9, total_steps=500, k=123)
    d = Curriculum()
    d.load_state_dict(c.state_dict())
    assert d == c and d.num_levels() == c.num_levels() and d.ema_decay() == c.ema_decay()
    with pytest.raises(ValueError, match="^kind"):
        d.load_state_dict({**c.state_dict(), "kind": "nope"})
    assert d == c  # nothing changed by the refused state


# --- networks used below ------------------------------------------------------------------------------------
class _Net(nn.Module):
    """A small network F(x, c_noise) with optional dropout."""

    def __init__(self, d: int, p: float = 0.0, hidden: int = 16) -> None:
        super().__init__()
        self.inp, self.emb = nn.Linear(d, hidden), nn.Linear(1, hidden)
        self.drop, self.out = nn.Dropout(p), nn.Linear(hidden, d)

    def forward(self, x, c):
        return self.out(self.drop(torch.tanh(self.inp(x) + self.emb(c[:, None].to(x.dtype) / 1000))))


def test_online_and_target_share_the_dropout_mask():
    """With an EMA target equal to the online network and s = t, the loss is zero exactly iff both see the same
    dropout mask."""
    torch.manual_seed(0)
    model = ConsistencyModel(_Net(3, p=0.5, hidden=64), sigma_data=0.5).double().train()
    process = VE(SMIN, SMAX)
    x0 = torch.randn(16, 3, dtype=F64)
    for share, zero in ((True, True), (False, False)):
        loss = ct_loss(model, process, total_steps=10, share_dropout=share)
        rec = loss.draw(x0, torch.Generator().manual_seed(1))
        rec = rec._replace(s=rec.t)
        value = loss.evaluate(model, x0, rec)
        assert bool((value == 0).all()) is zero
        if share:  # and every free-AT pass with this record sees that same mask
            assert torch.equal(loss.evaluate(model, x0, rec, torch.zeros_like(x0)), value)


# --- CM-AT target modes --------------------------------------------------------------------------------------
def _at_setup(seed: int = 0):
    torch.manual_seed(seed)
    model = ConsistencyModel(_Net(2, hidden=8), sigma_data=0.5).double()
    process = VE(SMIN, SMAX)
    x0 = torch.randn(4, 2, dtype=F64)
    return model, process, x0


@pytest.mark.parametrize("mode, side", [("equivariant", "student"), ("invariant", "target"),
                                        ("equivariant-detached", "student"), ("invariant", "student")])
def test_delta_gradient_matches_finite_differences_of_the_defined_loss(mode, side):
    """The loss as a function of delta is the one the module defines (target input x0 + s (z + dz) with dz =
    delta / t for the equivariant modes and the target side), and its delta gradient is the full derivative for
    ``equivariant`` / ``target`` and the student part only for the detached / invariant modes."""
    model, process, x0 = _at_setup()
    loss = ict_loss(process, total_steps=10, target_mode=mode, perturb=side, distance="l2", weighting="uniform")
    rec = loss.draw(x0, torch.Generator().manual_seed(2))
    t, s, z = rec.t[:, None], rec.s[:, None], rec.noise
    d0 = 0.1 * torch.randn(x0.shape, dtype=F64)

    def manual(d, target_d):
        stu = model(x0 + t * z + (d if side == "student" else 0), rec.t)
        tgt_in = x0 + s * z + (s / t) * target_d
        return ((stu - model(tgt_in, rec.s)) ** 2).mean(1)

    follows = side == "target" or mode != "invariant"
    value = loss.evaluate(model, x0, rec, d0)
    assert torch.allclose(value, manual(d0, d0 if follows else 0 * d0))
    leaf = d0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss.evaluate(model, x0, rec, leaf).sum(), leaf)
    full = mode == "equivariant" or side == "target"
    ref_leaf = d0.clone().requires_grad_(True)
    ref = manual(ref_leaf, ref_leaf if full else (d0 if follows else 0 * d0))
    (g_ref,) = torch.autograd.grad(ref.sum(), ref_leaf)
    assert torch.allclose(g, g_ref, atol=1e-12)


def test_equivariant_target_passes_no_parameter_gradient_through_the_stop_gradient_target():
    model, process, x0 = _at_setup(1)
    loss = ict_loss(process, total_steps=10, target_mode="equivariant", distance="l2", weighting="uniform")
    rec = loss.draw(x0, torch.Generator().manual_seed(4))
    d = (0.1 * torch.randn(x0.shape, dtype=F64)).requires_grad_(True)
    loss.evaluate(model, x0, rec, d).sum().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    t, s = rec.t[:, None], rec.s[:, None]
    tgt = model(x0 + s * rec.noise + (s / t) * d.detach(), rec.s).detach()
    ((model(x0 + t * rec.noise + d.detach(), rec.t) - tgt) ** 2).mean(1).sum().backward()
    for a, b in zip(got, (p.grad for p in model.parameters()), strict=True):
        assert torch.allclose(a, b, atol=1e-12)


def test_presets_and_free_at_step_with_target_updates():
    assert set(CM_AT_PRESETS) == {"paper", "paper-target", "kl"}
    preset = cm_at_preset("paper")
    assert preset["replay"] == 3 and preset["target_mode"] == "equivariant-detached"
    model, process, x0 = _at_setup(2)
    loss = ct_loss(model, process, total_steps=100, target_mode=preset["target_mode"])
    before = [p.clone() for p in loss.target.model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = free_at_step(model, x0, loss, opt, replay=3, perturber=preset["perturber"], ema=chain_updates(loss))
    assert out["updates"] == 3 and loss.curriculum.k == 3
    assert 0 < out["delta_norm"] <= 0.1 * math.sqrt(2) * (1 + 1e-9)
    mu = loss.curriculum  # the target moved towards the online weights by three EMA steps
    assert any(not torch.equal(a, b) for a, b in zip(before, loss.target.model.parameters(), strict=True))
    assert mu.num_levels() == ct_num_levels(3, 100)
    assert cm_at_preset("kl", eta0=0.05)["perturber"].radius == 0.05


def test_resume_is_exact():
    """Two steps, checkpoint (model, optimizer, loss: curriculum + target, generator), two more steps equals four
    uninterrupted steps exactly."""
    process = VE(SMIN, SMAX)

    def fresh():
        torch.manual_seed(5)
        model = ConsistencyModel(_Net(2, hidden=8), sigma_data=0.5).double()
        loss = ct_loss(model, process, total_steps=50, s0=2, s1=30)
        return model, loss, torch.optim.Adam(model.parameters(), lr=1e-2)

    data = torch.randn(4, 8, 2, dtype=F64)
    model, loss, opt = fresh()
    gen = torch.Generator().manual_seed(9)
    for i in range(4):
        train_step(model, data[i], loss, opt, ema=loss, generator=gen)
    model2, loss2, opt2 = fresh()
    gen2 = torch.Generator().manual_seed(9)
    for i in range(2):
        train_step(model2, data[i], loss2, opt2, ema=loss2, generator=gen2)
    state = {"model": model2.state_dict(), "opt": opt2.state_dict(), "loss": loss2.state_dict(),
             "gen": gen2.get_state()}
    model3, loss3, opt3 = fresh()
    model3.load_state_dict(state["model"])
    opt3.load_state_dict(state["opt"])
    loss3.load_state_dict(state["loss"])
    gen3 = torch.Generator()
    gen3.set_state(state["gen"])
    for i in range(2, 4):
        train_step(model3, data[i], loss3, opt3, ema=loss3, generator=gen3)
    assert loss3.curriculum == loss.curriculum and loss.curriculum.k == 4
    for a, b in zip(model.parameters(), model3.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(loss.target.model.parameters(), loss3.target.model.parameters(), strict=True):
        assert torch.equal(a, b)


# --- sampler -------------------------------------------------------------------------------------------------
def test_one_step_sampling_applies_the_map_once_and_reports():
    m, S = DATA["aniso"]
    f = exact_map(m, S)
    process = VE(SMIN, SMAX)
    x_T = SMAX * torch.randn(8, 2, dtype=F64)
    seen = []
    out = sample_consistency(f, x_T, process, consistency_grid(process, 1), callback=seen.append)
    assert out.nfe == 1 and torch.allclose(out.x, f(x_T, torch.full((8,), SMAX, dtype=F64)))
    assert set(seen[0]) == {"i", "t", "s", "x", "x0", "nfe"} and seen[0]["t"] == SMAX and seen[0]["s"] == 0.0


def test_two_step_sampling_law_matches_closed_form():
    """1-D N(m, v): x = f(T z, T) ~ N(m - a_T m, a_T^2 T^2); re-noised to tau and mapped: mean m + a_tau (mu1 - m),
    variance a_tau^2 (a_T^2 T^2 + tau^2 - smin^2), with a_s = sqrt((v + smin^2) / (v + s^2))."""
    m, S = DATA["1d"]
    v, mv, tau, T, n = S.item(), m.item(), 0.8, SMAX, 200_000
    process = VE(SMIN, SMAX)
    g = torch.Generator().manual_seed(0)
    x_T = T * torch.randn(n, 1, generator=g, dtype=F64)
    out = sample_consistency(exact_map(m, S), x_T, process, torch.tensor([T, tau], dtype=F64), generator=g)
    a = lambda s: math.sqrt((v + SMIN**2) / (v + s**2))  # noqa: E731
    mu1 = mv - a(T) * mv
    mean, var = mv + a(tau) * (mu1 - mv), a(tau) ** 2 * (a(T) ** 2 * T**2 + tau**2 - SMIN**2)
    assert out.nfe == 2
    assert abs(out.x.mean().item() - mean) < 5 * math.sqrt(var / n)
    assert abs(out.x.var().item() / var - 1) < 5 * math.sqrt(2 / n)


# --- bad input -----------------------------------------------------------------------------------------------
def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="^N"):
        karras_sigmas(1)
    with pytest.raises(ValueError, match="^rho"):
        karras_sigmas(10, rho=0.0)
    with pytest.raises(ValueError, match="^sigma_min"):
        karras_sigmas(10, sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="^sigma_min"):
        VE(1.0, 0.5)
    with pytest.raises(ValueError, match="^distance"):
        consistency_distance(torch.zeros(2, 2), torch.zeros(2, 2), "l3")
    with pytest.raises(ValueError, match="^distance"):
        ConsistencyLoss(VE(), Curriculum(), distance="lpips")
    with pytest.raises(ValueError, match="^N"):
        Curriculum("fixed", N=1)
    with pytest.raises(ValueError, match="^rho"):
        ConsistencyLoss(VE(), Curriculum(), rho=-1.0)
    with pytest.raises(ValueError, match="^process"):
        ConsistencyLoss(VPDiscrete("linear", T=1000), Curriculum())
    with pytest.raises(ValueError, match="^target_mode"):
        ConsistencyLoss(VE(), Curriculum(), target_mode="sideways")
    with pytest.raises(ValueError, match="^grid"):
        sample_consistency(exact_map(*DATA["1d"]), torch.zeros(2, 1, dtype=F64), VE(), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="^name"):
        cm_at_preset("pgd-100")
    nan_model = declare(lambda x, t: x * float("nan"), prediction="x0")
    with pytest.raises(FloatingPointError, match="consistency.*step 0"):
        sample_consistency(nan_model, torch.zeros(2, 1), VE(), torch.tensor([80.0]))
    with pytest.raises(ValueError, match="^x_T"):
        sample_consistency(nan_model, torch.zeros(2, 1, dtype=torch.int64), VE(), torch.tensor([80.0]))

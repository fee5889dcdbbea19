import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from atdiff.losses import DenoisingLoss, LossDraw, denoising_loss
from atdiff.networks.mlp import MLP
from atdiff.perturb import (
    GRAD_NORM_FLOOR,
    PAPER_REPLAY,
    PAPER_TARGET_MODE,
    Perturber,
    gaussian_std,
    input_perturbation,
    kl_ball_at,
    kl_ball_radius,
    mean_shift_kl,
    noise_rms_radius,
    paper_at,
    per_sample_norm,
    rms_radius,
)
from atdiff.precond import DiffusionModel, declare
from atdiff.processes import VPDiscrete


def declare_eps(fn):
    """Declare a test function an eps-model (the library refuses models that declare nothing)."""
    fn.prediction = "eps"
    return fn


def gaussian_kl(m1, v1, m2, v2):
    """KL(N(m1, v1 I) || N(m2, v2 I)) per sample, written out from the definition. m: (B, d), v: (B, 1)."""
    d = m1.shape[1]
    quad = ((m2 - m1) ** 2).sum(1) / v2[:, 0]
    return 0.5 * (d * v1[:, 0] / v2[:, 0] + quad - d + d * torch.log(v2[:, 0] / v1[:, 0]))


def linear_model(W, b):
    def model(x, t):
        return x @ W.T + b
    return declare(model, "eps")


# --- C4: DRO = AT identity -------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("seed", [0, 1])
def test_c4_kl_of_perturbed_transition_equals_equivariant_at_loss(schedule, seed):
    p = VPDiscrete(schedule)
    gen = torch.Generator().manual_seed(seed)
    B, d = 8, 5
    t = torch.randint(2, p.T + 1, (B,), generator=gen).double()
    t[0], t[1] = 2.0, float(p.T)
    x0 = torch.randn(B, d, generator=gen, dtype=torch.float64)
    eps = torch.randn(B, d, generator=gen, dtype=torch.float64)
    delta = 0.3 * torch.randn(B, d, generator=gen, dtype=torch.float64)
    model = linear_model(torch.randn(d, d, generator=gen, dtype=torch.float64) / math.sqrt(d),
                         torch.randn(d, generator=gen, dtype=torch.float64))

    beta = p.betas[t.long() - 1][:, None]
    alpha = 1 - beta
    abar, abar_prev = p.abar(t)[:, None], p.abar(t - 1)[:, None]
    beta_tilde = beta * (1 - abar_prev) / (1 - abar)
    x_pert = p.add_noise(x0, eps, t) + delta
    mean_q, var_q = p.posterior(x_pert, x0, t, t - 1)  # true posterior at the perturbed input, x0 fixed
    torch.testing.assert_close(var_q.expand(B, 1), beta_tilde, rtol=1e-10, atol=0)
    eps_theta = model(x_pert, t)
    mean_p = (x_pert - beta / (1 - abar).sqrt() * eps_theta) / alpha.sqrt()
    kl = gaussian_kl(mean_q, var_q.expand(B, 1), mean_p, beta_tilde)

    c_t = (beta**2 / (2 * beta_tilde * alpha * (1 - abar)))[:, 0]
    rhs = c_t * ((eps_theta - (eps + delta / (1 - abar).sqrt())) ** 2).sum(1)
    torch.testing.assert_close(kl, rhs, rtol=1e-8, atol=1e-12)
    loss = denoising_loss(model, x0, t, eps, p, delta=delta, target_mode="equivariant")
    torch.testing.assert_close(kl, c_t * d * loss, rtol=1e-8, atol=1e-12)
    # the invariant target is not the KL (a check that the identity above can fail)
    inv = denoising_loss(model, x0, t, eps, p, delta=delta, target_mode="invariant")
    assert not torch.allclose(kl, c_t * d * inv, rtol=1e-3)


@pytest.mark.parametrize("eta0", [1e-3, 0.05, 2.0])
def test_kl_ball_radius_has_kl_eta0(eta0):
    p = VPDiscrete("cosine")
    gen = torch.Generator().manual_seed(0)
    B, d = 6, 7
    t = torch.randint(1, p.T + 1, (B,), generator=gen).double()
    sigma = p.sigma(t)
    x0 = torch.randn(B, d, generator=gen, dtype=torch.float64)
    pert = kl_ball_at(eta0)
    r = pert.radius_for(x0, t, p)
    torch.testing.assert_close(r, torch.sqrt(2 * eta0 * (1 - p.abar(t))))
    # the delta the attack returns lies on the sphere, and the mean shift it makes has KL exactly eta0
    model = linear_model(torch.randn(d, d, generator=gen, dtype=torch.float64),
                         torch.zeros(d, dtype=torch.float64))
    eps = torch.randn(B, d, generator=gen, dtype=torch.float64)
    loss = DenoisingLoss(p, target_mode="equivariant")
    record = LossDraw(t, eps)
    delta = pert(lambda dl: loss.evaluate(model, x0, record, dl), x0, t, p)
    m = p.add_noise(x0, eps, t)
    var = sigma[:, None] ** 2
    want = torch.full((B,), eta0, dtype=torch.float64)
    torch.testing.assert_close(gaussian_kl(m + delta, var, m, var), want)
    torch.testing.assert_close(mean_shift_kl(per_sample_norm(delta), sigma), torch.full_like(sigma, eta0))


def test_budget_formulas():
    assert rms_radius(0.1, 3072) == pytest.approx(0.1 * math.sqrt(3072))
    assert noise_rms_radius(0.1, 0.5, 4) == pytest.approx(0.1)
    assert kl_ball_radius(0.02, 0.3) == pytest.approx(math.sqrt(0.04) * 0.3)
    assert float(kl_ball_radius(torch.tensor(0.02), 0.3)) == pytest.approx(0.06)
    assert gaussian_std(6.0, 9) == pytest.approx(2.0)
    x0 = torch.zeros(3, 3, 8, 8)
    t = torch.full((3,), 10.0)
    r = paper_at().radius_for(x0, t, VPDiscrete("linear"))
    torch.testing.assert_close(r, torch.full((3,), 0.1 * math.sqrt(192)))
    # one ascent step of 0.1 per pass; K = PAPER_REPLAY passes are free_at_step's argument, given once
    assert paper_at().kind == "fgsm" and paper_at().steps == 1 and paper_at().step_size == 0.1
    assert PAPER_REPLAY == 3 and PAPER_TARGET_MODE == "equivariant-detached"


# --- projection and step rules ---------------------------------------------------------------------------
grads = arrays(np.float64, (4, 6), elements=st.floats(allow_nan=True, allow_infinity=True, width=64))


@given(g1=grads, g2=grads, radius=st.floats(0.0, 10.0), step=st.floats(1e-6, 20.0),
       norm=st.sampled_from(["l2", "linf"]), rule=st.sampled_from(["l2", "sign"]),
       init=st.sampled_from(["zero", "uniform", "gaussian"]))
def test_every_delta_stays_in_its_ball(g1, g2, radius, step, norm, rule, init):
    pert = Perturber("pgd", norm=norm, radius=radius, steps=2, step_size=step, step_rule=rule, init=init)
    x0 = torch.zeros(4, 6, dtype=torch.float64)
    r = pert.radius_for(x0, torch.ones(4), VPDiscrete("linear"))
    delta = pert.init_delta(x0, r, torch.Generator().manual_seed(0))
    tol = radius * 1e-12 + 1e-300
    for g in (g1, g2):
        assert (per_sample_norm(delta, norm) <= radius + tol).all()
        delta = pert.ascend(delta, torch.from_numpy(g), r)
        assert torch.isfinite(delta).all()
    assert (per_sample_norm(delta, norm) <= radius + tol).all()


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_sign_steps_have_linf_norm_step_size_and_l2_steps_l2_norm(norm):
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(5, 3, 4, 4, generator=gen)
    zero, r = torch.zeros_like(g), torch.full((5,), 100.0)
    sign = Perturber("pgd", norm=norm, radius=100.0, steps=1, step_size=0.25, step_rule="sign")
    torch.testing.assert_close(per_sample_norm(sign.ascend(zero, g, r), "linf"), torch.full((5,), 0.25))
    l2 = Perturber("pgd", norm=norm, radius=100.0, steps=1, step_size=0.25, step_rule="l2")
    torch.testing.assert_close(per_sample_norm(l2.ascend(zero, g, r), "l2"), torch.full((5,), 0.25))
    # a step beyond the radius is projected back onto the sphere / box
    small = torch.full((5,), 0.1)
    torch.testing.assert_close(per_sample_norm(sign.ascend(zero, g, small), norm), small)


def test_non_finite_gradient_keeps_delta():
    pert = Perturber("pgd", radius=1.0, steps=1, step_size=0.5)
    delta = torch.full((2, 3), 0.1)
    g = torch.tensor([[1.0, float("nan"), 0.0], [1.0, 0.0, 0.0]])
    out = pert.ascend(delta, g, torch.ones(2))
    torch.testing.assert_close(out[0], delta[0])
    assert not torch.equal(out[1], delta[1])


def test_uniform_and_gaussian_inits_fill_the_ball():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.zeros(2000, 10)
    for norm in ("l2", "linf"):
        for init in ("uniform", "gaussian"):
            pert = Perturber("pgd", norm=norm, radius=2.0, steps=1, step_size=0.1, init=init)
            n = per_sample_norm(pert.init_delta(x0, torch.full((2000,), 2.0), gen), norm)
            assert (n <= 2.0 + 1e-6).all() and n.mean() > 0.5, (norm, init)
    # uniform in the l2 ball of dimension 10: P(||delta|| <= r/2) = 2^-10
    pert = Perturber("pgd", radius=2.0, steps=1, step_size=0.1, init="uniform")
    n = per_sample_norm(pert.init_delta(x0, torch.full((2000,), 2.0), gen))
    assert abs((n <= 2.0 * 0.9).float().mean().item() - 0.9**10) < 0.03


# --- IP is the gaussian kind with the invariant target ---------------------------------------------------
def test_gaussian_invariant_perturber_reproduces_input_perturbation():
    p, gamma = VPDiscrete("linear"), 0.1
    seen = []

    @declare_eps
    def model(x, t):
        seen.append(x)
        return 0.5 * x

    x0 = torch.randn(16, 2, 3, 3, generator=torch.Generator().manual_seed(3))
    loss = DenoisingLoss(p)
    got = loss(model, x0, perturber=input_perturbation(gamma), generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    t, eps, _ = loss.draw(x0, gen)
    xi = torch.randn(x0.shape, generator=gen)
    a = p.abar(t).sqrt()[:, None, None, None]
    ip_input = a * x0 + (1 - a**2).sqrt() * (eps + gamma * xi)
    torch.testing.assert_close(seen[-1], ip_input, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, ((0.5 * ip_input - eps) ** 2).flatten(1).mean(1), rtol=1e-5, atol=1e-6)
    assert loss.target_mode == "invariant"  # IP's clean target is the loss's default


# --- C5: linear-Gaussian AT closed form ------------------------------------------------------------------
def c5_closed_form(a, eta, sigma, v):
    V = a * a * v - 2 * a * sigma + 1
    return V + 2 * eta * abs(a - 1 / sigma) * math.sqrt(2 * V / math.pi) + eta**2 * (a - 1 / sigma) ** 2


@pytest.mark.parametrize("rule", ["sign", "l2"])
def test_c5_at_loss_matches_the_linear_gaussian_closed_form(rule):
    p, s2, eta, n = VPDiscrete("linear"), 0.25, 0.3, 100_000
    t = torch.full((n,), 100.0, dtype=torch.float64)
    abar, sigma = p.abar(t[0]).item(), p.sigma(t[0]).item()
    v = abar * s2 + sigma**2
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(n, 1, generator=gen, dtype=torch.float64) * math.sqrt(s2)
    eps = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    loss = DenoisingLoss(p, target_mode="equivariant")
    pert = Perturber("fgsm", radius=eta, step_size=eta, step_units="absolute", step_rule=rule)

    def at_loss(a):
        return loss(declare(lambda x, _t: a * x, "eps"), x0, record=LossDraw(t, eps), perturber=pert)

    lo, hi = sigma / v, 1 / sigma  # Bayes value and the delta-insensitive value
    for a in (0.5 * lo, lo, 0.5 * (lo + hi), hi, 1.5 * hi):
        per_sample = at_loss(a)
        se = per_sample.std().item() / math.sqrt(n)
        assert abs(per_sample.mean().item() - c5_closed_form(a, eta, sigma, v)) < 5 * se, a
    grid = np.linspace(lo - 0.3 * (hi - lo), hi + 0.3 * (hi - lo), 41)
    mc = [at_loss(float(a)).mean().item() for a in grid]
    a_hat = grid[int(np.argmin(mc))]
    assert lo < a_hat < hi, (lo, a_hat, hi)
    closed = [c5_closed_form(a, eta, sigma, v) for a in grid]
    assert abs(a_hat - grid[int(np.argmin(closed))]) <= 2 * (grid[1] - grid[0])


# --- C7: detached-target ascent vs the full equivariant objective ---------------------------------------
def test_c7_detached_ascent_vs_true_gradient_step(record_property, capsys):
    """Bayes-optimal linear denoiser eps*(x) = sigma C^-1 x, C = abar S + sigma^2 I,
    S = diag(logspace(-1, 1, 20)), t = 50 of linear VP T = 1000. Objective: batch mean of the per-sample
    squared residual summed over d (the equivariant AT loss times d). One l2-normalised step of length 0.1
    (the reference step) from delta = 0."""
    p, d, n, step = VPDiscrete("linear"), 20, 20_000, 0.1
    lam = torch.logspace(-1, 1, d, dtype=torch.float64)
    t = torch.full((n,), 50.0, dtype=torch.float64)
    abar, sigma = p.abar(t[0]).item(), p.sigma(t[0]).item()
    J = sigma / (abar * lam + sigma**2)

    @declare_eps
    def model(x, _t):
        return x * J

    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(n, d, generator=gen, dtype=torch.float64) * lam.sqrt()
    eps = torch.randn(n, d, generator=gen, dtype=torch.float64)
    record = LossDraw(t, eps)
    losses = {mode: DenoisingLoss(p, target_mode=mode) for mode in ("equivariant", "equivariant-detached")}

    def objective(delta):
        return d * losses["equivariant"].evaluate(model, x0, record, delta)

    results, deltas = {"clean": objective(torch.zeros_like(x0)).mean().item()}, {}
    for mode, loss in losses.items():
        pert = Perturber("fgsm", radius=1.0, step_size=step, step_units="absolute")
        deltas[mode] = pert(lambda dl, lo=loss: lo.evaluate(model, x0, record, dl), x0, t, p)
        results[mode] = objective(deltas[mode]).mean().item()
    # clean value = sum_i Var(eps_i | x_t) = sum abar lam / (abar lam + sigma^2), up to Monte Carlo error
    exact = (abar * lam / (abar * lam + sigma**2)).sum().item()
    assert abs(results["clean"] - exact) < 0.05 * exact
    # the true-gradient step must raise the full objective
    assert results["equivariant"] > results["clean"]
    # first order: the full-objective gradient at 0 is 2 (J - I/sigma) r0, the detached one 2 J r0; as J > 0
    # and J - I/sigma < 0 (diagonal), the detached direction has a negative directional derivative, per sample
    r0 = model(p.add_noise(x0, eps, t), t) - eps
    full_grad = 2 * (J - 1 / sigma) * r0
    assert ((full_grad * deltas["equivariant-detached"]).sum(1) < 0).all()
    record_property("c7", results)
    with capsys.disabled():
        print(f"\nC7 (d=20, logspace(-1,1), t=50, step 0.1): clean {results['clean']:.2f} -> detached "
              f"{results['equivariant-detached']:.2f}, true gradient {results['equivariant']:.2f}")


# --- PGD attack ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["invariant", "equivariant"])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pgd_raises_the_loss_stays_in_the_ball_and_leaves_grads_alone(norm, mode):
    # (with the detached target the ascent is on a different function than the one evaluated: see C7)
    torch.manual_seed(0)
    p = VPDiscrete("linear", T=100)
    model = DiffusionModel(MLP(6, hidden=32, depth=2), p)
    torch.nn.init.normal_(model.net.out.weight, std=0.3)
    x0 = torch.randn(64, 6)
    gen = torch.Generator().manual_seed(1)
    loss = DenoisingLoss(p, target_mode=mode)
    record = loss.draw(x0, gen)
    t = record.t
    radius = 0.5 if norm == "l2" else 0.2
    pert = Perturber("pgd", norm=norm, radius=radius, steps=5)
    sentinel = [torch.full_like(q, 3.0) for q in model.parameters()]
    for q, s in zip(model.parameters(), sentinel, strict=True):
        q.grad = s.clone()
    delta = pert(lambda dl: loss.evaluate(model, x0, record, dl), x0, t, p)
    for q, s in zip(model.parameters(), sentinel, strict=True):
        assert torch.equal(q.grad, s)
    assert not delta.requires_grad
    assert (per_sample_norm(delta, norm) <= radius * (1 + 1e-5)).all()
    clean = loss.evaluate(model, x0, record).detach()
    attacked = loss.evaluate(model, x0, record, delta).detach()
    random_delta = Perturber("gaussian", radius=radius).init_delta(x0, torch.full((64,), radius), gen) \
        if norm == "l2" else (2 * torch.rand(x0.shape, generator=gen) - 1) * radius
    randomly = loss.evaluate(model, x0, record, random_delta).detach()
    assert attacked.mean() > randomly.mean() > 0 and attacked.mean() > clean.mean()
    assert (attacked >= clean - 1e-6).float().mean() > 0.9


# --- bad inputs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "name"), [
    (dict(kind="bim", radius=1.0), "kind"),
    (dict(kind="pgd", norm="l1", radius=1.0), "norm"),
    (dict(kind="pgd", budget="pixels", radius=1.0), "budget"),
    (dict(kind="pgd", radius=1.0, step_size=0.0), "step_size"),  # a zero step would make PGD a silent no-op
    (dict(kind="fgsm", radius=1.0, step_size=0.0, step_units="absolute"), "step_size"),
    (dict(kind="pgd", radius=1.0, init="ones"), "init"),
    (dict(kind="pgd", radius=1.0, step_rule="adam"), "step_rule"),
    (dict(kind="pgd", radius=1.0, step_units="pixels"), "step_units"),
    (dict(kind="pgd", radius=-1.0), "radius"),
    (dict(kind="pgd", radius=float("nan")), "radius"),
    (dict(kind="pgd", radius=1.0, step_size=-0.1), "step_size"),
    (dict(kind="pgd", radius=1.0, steps=0), "steps"),
    (dict(kind="pgd", radius=1.0, steps=2.5), "steps"),
    (dict(kind="pgd"), "radius"),
    (dict(kind="pgd", radius=1.0, step_units="absolute"), "step_size"),
    (dict(kind="fgsm", radius=1.0, steps=3), "steps"),
    (dict(kind="gaussian", radius=1.0, norm="linf"), "norm"),
    (dict(kind="gaussian", radius=1.0, steps=2), "steps"),
    (dict(kind="gaussian", radius=1.0, init="uniform"), "init"),
    (dict(kind="none", radius=1.0), "radius"),
    (dict(kind="none", norm="linf"), "norm"),
    (dict(kind="none", budget="kl"), "budget"),
    (dict(kind="pgd", norm="linf", budget="kl", radius=1.0), "budget"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        Perturber(**kwargs)
    with pytest.raises(TypeError):
        Perturber("pgd", radius=1.0, target_mode="equivariant")  # the target mode is the loss's


def test_kl_ball_preset_is_single_step_for_free_at_and_pgd_otherwise():
    one, many = kl_ball_at(0.05), kl_ball_at(0.05, steps=4)
    assert (one.kind, one.steps, one.step_size, one.step_units) == ("fgsm", 1, 1.0, "radius")
    assert (many.kind, many.steps, many.step_size) == ("pgd", 4, 2.5 / 4)


def test_l2_normalisation_floor_follows_the_reference():
    # g / max(||g||, 1e-8): a gradient far below the floor takes a proportionally short step, not a full one
    pert = Perturber("fgsm", radius=10.0, step_size=0.1, step_units="absolute")
    g = torch.tensor([[1e-12, 0.0], [3.0, 4.0]])
    out = pert.ascend(torch.zeros(2, 2), g, torch.full((2,), 10.0))
    torch.testing.assert_close(out[0], torch.tensor([0.1 * 1e-12 / GRAD_NORM_FLOOR, 0.0]))
    torch.testing.assert_close(out[1], torch.tensor([0.06, 0.08]))


def test_bad_preset_arguments():
    with pytest.raises(ValueError, match="^eta0:"):
        kl_ball_at(-0.1)
    with pytest.raises(TypeError):
        paper_at(3)  # K is free_at_step's `replay`, given in one place
    with pytest.raises(ValueError, match="^steps:"):
        kl_ball_at(0.1, steps=0)

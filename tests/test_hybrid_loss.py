"""The IDDPM hybrid loss against closed forms computed here independently (numpy / scipy), its gradient
structure, the importance sampler, and the plumbing (perturbers, free AT, predict for learned variance)."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from atdiff.losses import (
    DenoisingLoss,
    HybridLoss,
    LossDraw,
    LossSecondMomentSampler,
    discretized_gaussian_log_likelihood,
    normal_kl,
)
from atdiff.networks.mlp import MLP
from atdiff.param import predict, predict_with_variance, split_learned_variance
from atdiff.perturb import paper_at
from atdiff.precond import DiffusionModel, declare
from atdiff.processes import VE, VPDiscrete
from atdiff.train import free_at_step, train_step

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (see conftest.py)


class LinearLearnedVariance(torch.nn.Module):
    """eps_hat = a x + c t / T, v = tanh(b x): a learned-variance model with two scalar parameters."""

    prediction = "eps"
    learned_variance = True

    def __init__(self, T, a=0.3, b=0.7):
        super().__init__()
        self.T = T
        self.a = torch.nn.Parameter(torch.tensor(a, dtype=F64))
        self.b = torch.nn.Parameter(torch.tensor(b, dtype=F64))

    def forward(self, x, t):
        eps = self.a * x + 0.1 * (t / self.T)[:, None]
        return torch.cat([eps, torch.tanh(self.b * x)], dim=1)


def _eight_bit(n, d, gen):
    k = torch.randint(0, 256, (n, d), generator=gen)
    k[0, 0], k[1, 0] = 0, 255  # both edge bins
    return (k.double() / 255) * 2 - 1


def _reference_vb(process, model, x0, t, eps, delta):
    """The VB term in bits/dim from the betas alone (numpy / scipy): posterior q(x_{t-1} | x_in, x0), the
    learned-range variance with beta_tilde_1 -> beta_tilde_2, Gaussian KL for t > 1, 8-bit decoder at
    t = 1."""
    betas = process.betas.numpy()
    abar = np.concatenate([[1.0], np.cumprod(1 - betas)])
    x0n, epsn, tn = x0.numpy(), eps.numpy(), t.numpy().astype(int)
    x_in = np.sqrt(abar[tn])[:, None] * x0n + np.sqrt(1 - abar[tn])[:, None] * epsn + delta.numpy()
    with torch.no_grad():
        out = model(torch.from_numpy(x_in), t).numpy()
    d = x0n.shape[1]
    eps_hat, v = out[:, :d], out[:, d:]
    b = betas[tn - 1][:, None]
    ab, ab_prev = abar[tn][:, None], abar[tn - 1][:, None]
    beta_tilde = betas * (1 - abar[:-1]) / (1 - abar[1:])  # index t-1 -> beta_tilde_t
    bt = np.where(tn == 1, beta_tilde[1], beta_tilde[tn - 1])[:, None]

    def post_mean(x_start):
        c_x0 = np.sqrt(ab_prev) * b / (1 - ab)
        c_xt = np.sqrt(1 - b) * (1 - ab_prev) / (1 - ab)
        return c_x0 * x_start + c_xt * x_in

    x0_hat = (x_in - np.sqrt(1 - ab) * eps_hat) / np.sqrt(ab)
    mu_true, mu_model = post_mean(x0n), post_mean(x0_hat)
    frac = (v + 1) / 2
    var_model = np.exp(frac * np.log(b) + (1 - frac) * np.log(bt))
    kl = 0.5 * np.log(var_model / bt) + (bt + (mu_true - mu_model) ** 2) / (2 * var_model) - 0.5
    sd = np.sqrt(var_model)
    hi = np.where(x0n > 0.999, 1.0, norm.cdf((x0n + 1 / 255 - mu_model) / sd))
    lo = np.where(x0n < -0.999, 0.0, norm.cdf((x0n - 1 / 255 - mu_model) / sd))
    with np.errstate(divide="ignore"):  # far-tail bins at t > 1 are not used
        nll = -np.log(hi - lo)
    vb = np.where((tn == 1)[:, None], nll, kl).mean(1) / np.log(2)
    return vb, eps_hat


@pytest.mark.parametrize("target_mode", ["invariant", "equivariant"])
@pytest.mark.parametrize("perturbed", [False, True])
def test_vb_term_equals_the_closed_form_kl_and_decoder_nll(target_mode, perturbed):
    process = VPDiscrete("cosine", T=100)
    model = LinearLearnedVariance(process.T)
    gen = torch.Generator().manual_seed(0)
    n, d = 64, 3
    x0 = _eight_bit(n, d, gen)
    t = torch.randint(1, 101, (n,), generator=gen).double()
    t[:8] = 1.0
    eps = torch.randn(n, d, generator=gen, dtype=F64)
    delta = 0.05 * torch.randn(n, d, generator=gen, dtype=F64) if perturbed else torch.zeros(n, d, dtype=F64)
    loss = HybridLoss(process, target_mode=target_mode)
    terms = loss.terms(model, x0, t, eps, delta if perturbed else None)
    vb_ref, eps_hat = _reference_vb(process, model, x0, t, eps, delta)
    np.testing.assert_allclose(terms["vb"].detach().numpy(), vb_ref, rtol=1e-7, atol=1e-10)
    sig = np.sqrt(1 - np.exp(process.log_abar_table.numpy()[t.numpy().astype(int)]))[:, None]
    target = eps.numpy() + (delta.numpy() / sig if target_mode == "equivariant" else 0.0)
    mse_ref = ((eps_hat - target) ** 2).mean(1)
    np.testing.assert_allclose(terms["mse"].detach().numpy(), mse_ref, rtol=1e-10)
    np.testing.assert_allclose(terms["loss"].detach().numpy(), mse_ref + 0.001 * 100 * vb_ref, rtol=1e-7)
    at = loss.evaluate(model, x0, LossDraw(t, eps), delta if perturbed else None)
    torch.testing.assert_close(at, terms["loss"])


def test_vb_term_trains_the_variance_only():
    process = VPDiscrete("linear", T=50)
    model = LinearLearnedVariance(process.T)
    gen = torch.Generator().manual_seed(1)
    x0 = _eight_bit(32, 2, gen)
    t = torch.randint(1, 51, (32,), generator=gen).double()
    eps = torch.randn(32, 2, generator=gen, dtype=F64)
    HybridLoss(process).terms(model, x0, t, eps)["vb"].sum().backward()
    assert model.a.grad is None or model.a.grad.item() == 0.0  # the mean is stop-gradient in the VB term
    assert model.b.grad is not None and abs(model.b.grad.item()) > 0
    model.zero_grad()
    HybridLoss(process).terms(model, x0, t, eps)["mse"].sum().backward()
    assert abs(model.a.grad.item()) > 0 and (model.b.grad is None or model.b.grad.item() == 0.0)


def test_discretized_decoder_matches_scipy_and_normalises():
    gen = torch.Generator().manual_seed(2)
    levels = torch.linspace(-1, 1, 256, dtype=F64)
    mean = 0.3 * torch.randn(5, 1, generator=gen, dtype=F64)
    log_scale = torch.tensor([[-6.0], [-3.0], [-1.0], [0.0], [1.0]], dtype=F64)
    logp = discretized_gaussian_log_likelihood(levels[None, :], mean, log_scale)
    total = logp.exp().sum(1)
    torch.testing.assert_close(total, torch.ones(5, dtype=F64), rtol=0, atol=1e-9)
    sd = log_scale.exp().numpy()
    x, mu = levels.numpy()[None, :], mean.numpy()
    z_hi = np.where(x > 0.999, np.inf, (x + 1 / 255 - mu) / sd)
    z_lo = np.where(x < -0.999, -np.inf, (x - 1 / 255 - mu) / sd)
    # bin mass from scipy, on the side of the smaller tail; IDDPM's floor at 1e-12
    mass = np.where(z_lo > 0, norm.sf(z_lo) - norm.sf(z_hi), norm.cdf(z_hi) - norm.cdf(z_lo))
    ref = np.log(np.maximum(mass, 1e-12))
    assert (ref > np.log(1e-12)).sum() > 300  # most bins are above the floor
    np.testing.assert_allclose(logp.numpy(), ref, rtol=1e-9, atol=1e-9)
    # gradients are finite everywhere, including floored and edge bins
    m = mean.clone().requires_grad_(True)
    discretized_gaussian_log_likelihood(levels[None, :], m, log_scale).sum().backward()
    assert torch.isfinite(m.grad).all()


def test_normal_kl_matches_torch_distributions():
    gen = torch.Generator().manual_seed(3)
    m1, m2 = torch.randn(10, generator=gen, dtype=F64), torch.randn(10, generator=gen, dtype=F64)
    lv1, lv2 = torch.randn(10, generator=gen, dtype=F64), torch.randn(10, generator=gen, dtype=F64)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), ref)


def test_second_moment_sampler_is_uniform_until_warm_then_unbiased():
    T = 6
    s = LossSecondMomentSampler(T, history=3, uniform_prob=0.01)
    torch.testing.assert_close(s.probabilities(), torch.full((T,), 1 / T, dtype=F64))
    for _ in range(2):
        s.update(torch.arange(1, T + 1), torch.arange(1, T + 1).double())
    assert not s.warm
    s.update(torch.arange(1, T + 1), torch.arange(1, T + 1).double())
    s.update(torch.tensor([1]), torch.tensor([4.0]))  # history of t=1 becomes [1, 1, 4] (the oldest dropped)
    assert s.warm
    rms = torch.arange(1, T + 1).double()
    rms[0] = math.sqrt((1 + 1 + 16) / 3)
    want = rms / rms.sum() * 0.99 + 0.01 / T
    torch.testing.assert_close(s.probabilities(), want)
    # sum_t p_t w_t L_t = mean_t L_t: the weighted loss is unbiased for the uniform-t loss
    losses = torch.rand(T, dtype=F64)
    t_all = torch.arange(1, T + 1).double()
    torch.testing.assert_close((s.probabilities() * s.weights(t_all) * losses).sum(), losses.mean())
    t, w = s.sample(60_000, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(t.long() - 1, minlength=T).double() / 60_000
    assert ((freq - want).abs() < 4 * (want * (1 - want) / 60_000).sqrt()).all(), (freq, want)
    torch.testing.assert_close(w.double(), s.weights(t.double()), rtol=1e-6, atol=0)
    state = s.state_dict()
    s2 = LossSecondMomentSampler(T, history=3, uniform_prob=0.01)
    s2.load_state_dict(state)
    torch.testing.assert_close(s2.probabilities(), s.probabilities())


def _mlp_learned(process, dim=2):
    net = MLP(dim, hidden=32, depth=2)
    net.out = torch.nn.Linear(32, 2 * dim)  # eps and v
    return DiffusionModel(net, process, learned_variance=True)


def test_importance_sampling_is_fed_by_the_caller_and_weights_the_drawn_times():
    torch.manual_seed(0)
    process = VPDiscrete("cosine", T=20)
    model = _mlp_learned(process)
    loss = HybridLoss(process, importance_sampling=True, history=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = torch.rand(16, 2) * 2 - 1
    gen = torch.Generator().manual_seed(0)
    recorded = []
    update = loss.time_sampler.update
    loss.time_sampler.update = lambda t, losses: (recorded.append((t.clone(), losses.clone())), update(t, losses))
    stats = train_step(model, data, loss, opt, generator=gen)
    assert recorded == []  # the step itself records nothing: the caller decides (after a DDP all-gather)
    loss.observe(stats["record"], stats["losses"])
    assert len(recorded) == 1 and torch.equal(recorded[0][0], stats["record"].t)
    stats = free_at_step(model, data, loss, opt, replay=3, perturber=paper_at(), generator=gen)
    assert len(recorded) == 1
    loss.observe(stats["record"], stats["losses"])
    assert len(recorded) == 2 and torch.equal(recorded[1][1], stats["losses"])
    assert stats["losses"].shape == (16,) and bool((stats["losses"] > 0).all())
    for _ in range(40):
        stats = train_step(model, data, loss, opt, generator=gen)
        loss.observe(stats["record"], stats["losses"])
    assert loss.time_sampler.warm
    record = loss.draw(data, gen)
    torch.testing.assert_close(record.weight, loss.time_sampler.weights(record.t))
    plain = loss.terms(model, data, record.t, record.noise)["loss"]
    torch.testing.assert_close(loss.evaluate(model, data, record), plain)  # evaluate: no weights
    torch.testing.assert_close(loss(model, data, record=record), plain * record.weight)  # __call__: weighted
    # a record without weights (times chosen by the caller) is taken as given
    torch.testing.assert_close(loss(model, data, record=LossDraw(record.t, record.noise)), plain)


def test_hybrid_training_lowers_the_loss_with_a_perturber():
    torch.manual_seed(1)
    process = VPDiscrete("cosine", T=50)
    model = _mlp_learned(process)
    loss = HybridLoss(process)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    data = (torch.randn(128, 2) * 0.2 + torch.tensor([0.5, -0.5])).clamp(-1, 1)
    data = torch.round((data + 1) * 127.5) / 127.5 - 1
    record = loss.draw(data, torch.Generator().manual_seed(9))
    before = loss(model, data, record=record).mean().item()
    gen = torch.Generator().manual_seed(2)
    for _ in range(60):
        train_step(model, data, loss, opt, perturber=paper_at(), generator=gen)
    after = loss(model, data, record=record).mean().item()
    assert after < 0.7 * before, (before, after)


def test_learned_variance_models_work_for_eps_only_callers():
    process = VPDiscrete("linear", T=100)
    model = _mlp_learned(process)
    x = torch.randn(5, 2)
    t = torch.full((5,), 30.0)
    out = model(x, t)
    assert out.shape == (5, 4)
    eps, v = split_learned_variance(out)
    torch.testing.assert_close(predict(model, x, t, process, "eps"), eps)
    x0, v2 = predict_with_variance(model, x, t, process, "x0")
    torch.testing.assert_close(v2, v)
    torch.testing.assert_close(x0, predict(model, x, t, process, "x0"))
    # the eps-only DenoisingLoss trains the eps half of a learned-variance model unchanged
    assert DenoisingLoss(process)(model, x).shape == (5,)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="^process[:,]"):
        HybridLoss(VE())
    process = VPDiscrete("linear", T=10)
    x0 = torch.zeros(3, 2, dtype=F64)
    eps = torch.zeros(3, 2, dtype=F64)
    with pytest.raises(ValueError, match="^model[:,]"):
        HybridLoss(process).terms(declare(lambda x, t: x, "eps"), x0, torch.ones(3, dtype=F64), eps)
    with pytest.raises(ValueError, match="^t[:,]"):
        HybridLoss(process).terms(LinearLearnedVariance(10), x0, torch.full((3,), 1.5, dtype=F64), eps)
    with pytest.raises(ValueError, match="^model[:,]"):
        split_learned_variance(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="^vlb_weight[:,]"):
        HybridLoss(process, vlb_weight=-1.0)


def test_importance_sampler_refuses_times_off_its_grid_and_non_finite_losses():
    s = LossSecondMomentSampler(10, history=2)
    for bad_t in (0, 11, 2.5):  # t = 0 used to be recorded under T (index -1)
        with pytest.raises(ValueError, match="^t:"):
            s.update(torch.tensor([bad_t]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="^losses:"):
        s.update(torch.tensor([3]), torch.tensor([float("nan")]))
    assert int(s.counts.sum()) == 0


def test_resume_with_free_at_and_importance_sampling_is_exact(tmp_path):
    # 15 + (save, load into fresh objects) + 15 updates equal 30 in one go, bit for bit: the loss holds no pending
    # state, the sampler history and the explicit generator travel in the checkpoint
    from atdiff.checkpoint import load_checkpoint, save_checkpoint

    def build(seed):
        torch.manual_seed(seed)
        process = VPDiscrete("cosine", T=20)
        model = _mlp_learned(process)
        loss = HybridLoss(process, importance_sampling=True, history=1, target_mode="equivariant-detached")
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        return model, loss, opt, torch.Generator().manual_seed(11)

    data = torch.rand(16, 2, generator=torch.Generator().manual_seed(3)) * 2 - 1

    def steps(model, loss, opt, gen, n):
        for _ in range(n):
            stats = free_at_step(model, data, loss, opt, replay=3, perturber=paper_at(), generator=gen)
            loss.observe(stats["record"], stats["losses"])

    model, loss, opt, gen = build(0)
    steps(model, loss, opt, gen, 30)
    assert loss.time_sampler.warm  # the importance law is in use for the later steps
    ref = [q.detach().clone() for q in model.parameters()]

    model, loss, opt, gen = build(0)
    steps(model, loss, opt, gen, 15)
    save_checkpoint(tmp_path / "c.pt", model=model, loss=loss, optimizer=opt, generator=gen)
    model, loss, opt, gen = build(1)  # other weights and generator state until loaded
    load_checkpoint(tmp_path / "c.pt", model=model, loss=loss, optimizer=opt, generator=gen)
    steps(model, loss, opt, gen, 15)
    for a, b in zip(ref, model.parameters(), strict=True):
        assert torch.equal(a, b.detach())

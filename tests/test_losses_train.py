import math

import pytest
import torch

from atdiff.checkpoint import load_checkpoint, save_checkpoint, seed_everything
from atdiff.losses import DenoisingLoss, LossDraw, denoising_loss, sample_times
from atdiff.networks.mlp import MLP
from atdiff.precond import DiffusionModel, declare
from atdiff.processes import VE, VPContinuous, VPDiscrete
from atdiff.train import EMA, train_step


def bayes_linear_eps(process, s2):
    """eps*(x) = sigma x / (alpha^2 s^2 + sigma^2) for 1-D data N(0, s2)."""
    def model(x, t):
        a, s = process.alpha(t)[:, None].to(x.dtype), process.sigma(t)[:, None].to(x.dtype)
        return s * x / (a**2 * s2 + s**2)
    return declare(model, "eps")


@pytest.mark.parametrize("process", [VPDiscrete("cosine"), VPContinuous(), VE()], ids=repr)
def test_bayes_loss_equals_the_posterior_variance_of_eps(process):
    s2, n = 0.4, 200_000
    gen = torch.Generator().manual_seed(0)
    t_val = 0.3 * process.t_max
    t = torch.full((n,), t_val, dtype=torch.float64)
    x0 = torch.randn(n, 1, generator=gen, dtype=torch.float64) * math.sqrt(s2)
    eps = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    loss = denoising_loss(bayes_linear_eps(process, s2), x0, t, eps, process)
    a2, sig2 = process.abar(t[0]).item(), process.sigma(t[0]).item() ** 2
    want = 1 - sig2 / (a2 * s2 + sig2)  # Var(eps | x_t)
    assert abs(loss.mean().item() - want) < 5 * loss.std().item() / math.sqrt(n)


def _random_model_and_batch(p, batch, seed):
    """A 3-D eps-model MLP with a random (non-zero) output layer, a batch ``x0``, ``eps``, training times ``t``,
    and the generator they came from."""
    model = DiffusionModel(MLP(3, hidden=16, depth=2), p)
    torch.nn.init.normal_(model.net.out.weight)
    gen = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(batch, 3, generator=gen), torch.randn(batch, 3, generator=gen)
    return model, x0, eps, sample_times(p, batch, generator=gen), gen


def test_target_kinds_are_rescalings_of_each_other():
    # for a fixed eps-model, the x0-loss is (sigma/alpha)^2 times the eps-loss, sample by sample
    p = VPDiscrete("linear")
    model, x0, eps, t, _ = _random_model_and_batch(p, 8, seed=0)
    l_eps = denoising_loss(model, x0, t, eps, p, target="eps")
    l_x0 = denoising_loss(model, x0, t, eps, p, target="x0")
    ratio = (p.sigma(t) / p.alpha(t)) ** 2
    torch.testing.assert_close(l_x0, ratio * l_eps, rtol=1e-4, atol=1e-6)
    l_v = denoising_loss(model, x0, t, eps, p, target="v")
    torch.testing.assert_close(l_v, l_eps / p.alpha(t) ** 2, rtol=1e-4, atol=1e-6)


def test_perturbed_targets_and_gradient_flow():
    p = VPDiscrete("linear")
    model = bayes_linear_eps(p, 1.0)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    eps = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    t = torch.full((5,), 200.0, dtype=torch.float64)
    delta = 0.1 * torch.randn(5, 2, generator=gen, dtype=torch.float64)
    sig = p.sigma(t)[:, None]
    x_pert = p.add_noise(x0, eps, t) + delta
    want_eq = ((model(x_pert, t) - eps - delta / sig) ** 2).mean(1)
    want_inv = ((model(x_pert, t) - eps) ** 2).mean(1)
    torch.testing.assert_close(denoising_loss(model, x0, t, eps, p, delta=delta, target_mode="equivariant"), want_eq)
    torch.testing.assert_close(denoising_loss(model, x0, t, eps, p, delta=delta), want_inv)
    grads = {}
    for mode in ("equivariant", "equivariant-detached"):
        d = delta.clone().requires_grad_(True)
        denoising_loss(model, x0, t, eps, p, delta=d, target_mode=mode).sum().backward()
        grads[mode] = d.grad
    # the detached target drops the -2 r / sigma term of the full gradient
    r = model(x_pert, t) - eps - delta / sig
    torch.testing.assert_close(grads["equivariant"] - grads["equivariant-detached"], -2 * r / sig / 2)
    with pytest.raises(ValueError, match="^target_mode[:,]"):
        denoising_loss(model, x0, t, eps, p, delta=delta, target_mode="sideways")
    with pytest.raises(ValueError, match="^delta[:,]"):
        denoising_loss(model, x0, t, eps, p, delta=delta[:, :1])


def test_sample_times_ranges():
    gen = torch.Generator().manual_seed(0)
    t = sample_times(VPDiscrete("linear", T=10), 5000, generator=gen)
    assert t.min() == 1 and t.max() == 10 and (t == t.round()).all()
    t = sample_times(VE(), 5000, generator=gen)
    assert t.min() >= 0.08 - 1e-6 and t.max() <= 80.0


def test_ema_is_the_stated_average():
    net = torch.nn.Linear(2, 1)
    ema = EMA(net, decay=0.9)
    w0 = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    torch.testing.assert_close(ema.model.weight, 0.9 * w0 + 0.1 * (w0 + 1.0))
    assert EMA(net, decay=0.999, warmup=True).current_decay() == pytest.approx(0.1)
    with pytest.raises(ValueError, match="^decay[:,]"):
        EMA(net, decay=1.5)


def _setup(seed=0):
    seed_everything(seed)
    p = VPDiscrete("cosine", T=100)
    model = DiffusionModel(MLP(2, hidden=32, depth=2), p)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return p, model, opt, EMA(model, 0.9), DenoisingLoss(p)


def test_training_lowers_the_loss_and_resume_is_exact(tmp_path):
    p, model, opt, ema, loss = _setup()
    data = torch.randn(256, 2) * 0.3 + torch.tensor([1.0, -1.0])
    gen = torch.Generator().manual_seed(5)
    record = loss.draw(data, torch.Generator().manual_seed(99))
    before = loss(model, data, record=record).mean().item()
    for _ in range(150):
        train_step(model, data, loss, opt, ema=ema, generator=gen)
    after = loss(model, data, record=record).mean().item()
    assert after < 0.6 * before, (before, after)

    # resume: 3 steps, checkpoint, 3 steps == 3 steps, reload, 3 steps (global RNG included)
    ckpt = tmp_path / "ckpt.pt"
    save_checkpoint(ckpt, config={"T": 100}, model=model, optimizer=opt, ema=ema, step=150)
    for _ in range(3):
        train_step(model, data, loss, opt, ema=ema)
    ref = [q.detach().clone() for q in ema.model.parameters()]
    _, model2, opt2, ema2, _ = _setup(seed=123)
    payload = load_checkpoint(ckpt, model=model2, optimizer=opt2, ema=ema2)
    assert payload["step"] == 150
    for _ in range(3):
        train_step(model2, data, loss, opt2, ema=ema2)
    for a, b in zip(ref, ema2.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sample_times_are_uniform():
    # discrete: every integer 1..T equally likely (chi-square); continuous: uniform on [t_min, t_max] (KS)
    from scipy import stats

    gen = torch.Generator().manual_seed(3)
    t = sample_times(VPDiscrete("linear", T=10), 50_000, generator=gen)
    counts = torch.bincount(t.long(), minlength=11)[1:].numpy()
    assert stats.chisquare(counts).pvalue > 1e-3
    p = VPContinuous()
    u = sample_times(p, 20_000, generator=gen, t_min=0.2).double().numpy()
    assert u.min() >= 0.2 and u.max() <= p.t_max
    assert stats.kstest((u - 0.2) / (p.t_max - 0.2), "uniform").pvalue > 1e-3
    # and the test can fail: a skewed draw is rejected
    assert stats.kstest(((u - 0.2) / (p.t_max - 0.2)) ** 1.2, "uniform").pvalue < 1e-3


def test_weighting_is_applied_per_sample():
    # independent derivation: the x0-loss is the eps-loss divided by snr(t), sample by sample, so the
    # eps-target with weighting 1/snr(t) must equal the x0-target loss
    p = VPDiscrete("cosine")
    model, x0, eps, t, gen = _random_model_and_batch(p, 16, seed=2)
    record = LossDraw(t, eps)
    weighted = DenoisingLoss(p, weighting=lambda tt: 1 / p.snr(tt))(model, x0, record=record)
    torch.testing.assert_close(weighted, DenoisingLoss(p, target="x0")(model, x0, record=record),
                               rtol=1e-4, atol=1e-7)
    plain = DenoisingLoss(p)(model, x0, record=record)
    assert not torch.allclose(weighted, plain)
    w = torch.rand(16, generator=gen)
    torch.testing.assert_close(denoising_loss(model, x0, t, eps, p, weight=w), w * plain)


def _sgd_setup():
    p, model, _, _, loss = _setup()
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(7)) * 0.3 + 1.0
    return p, model, torch.optim.SGD(model.parameters(), lr=1.0), loss, x0


def _distance(model, before):
    return torch.linalg.vector_norm(torch.cat([(q.detach() - b).flatten()
                                               for q, b in zip(model.parameters(), before, strict=True)]))


def test_grad_clip_caps_the_update_at_the_stated_norm():
    # plain SGD with lr = 1: the parameter change is minus the (clipped) gradient
    p, model, opt, loss, x0 = _sgd_setup()
    before = [q.detach().clone() for q in model.parameters()]
    out = train_step(model, x0, loss, opt, grad_clip=1e-3, generator=torch.Generator().manual_seed(0))
    change = _distance(model, before)
    assert out["grad_norm"] > 1e-2  # the norm before clipping is reported, and clipping had work to do
    assert change.item() == pytest.approx(1e-3, rel=1e-4)
    # without clipping the change is the full gradient
    p, model, opt, loss, x0 = _sgd_setup()
    before = [q.detach().clone() for q in model.parameters()]
    out2 = train_step(model, x0, loss, opt, generator=torch.Generator().manual_seed(0))
    change = _distance(model, before)
    assert change.item() == pytest.approx(out2["grad_norm"], rel=1e-4)
    assert out2["grad_norm"] == pytest.approx(out["grad_norm"], rel=1e-6)


def test_non_finite_inputs_are_rejected_at_every_entry():
    p, model, opt, loss, x0 = _sgd_setup()
    bad = x0.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match="^x0:"):
        loss(model, bad)
    with pytest.raises(ValueError, match="^x0:"):
        train_step(model, bad, loss, opt)
    from atdiff.train import free_at_step

    with pytest.raises(ValueError, match="^x0:"):
        free_at_step(model, bad, loss, opt, replay=2)
    eps = torch.randn_like(x0)
    t = torch.full((x0.shape[0],), 10.0)
    eps[0, 0] = float("inf")
    with pytest.raises(ValueError, match="^record.noise:"):
        loss(model, x0, record=LossDraw(t, eps))
    with pytest.raises(ValueError, match="^record.t:"):
        loss(model, x0, record=LossDraw(torch.full((x0.shape[0],), p.t_max + 5.0), torch.randn_like(x0)))
    with pytest.raises(ValueError, match="^record:"):
        loss(model, x0, record=LossDraw(t[:3], torch.randn_like(x0)))
    with pytest.raises(ValueError, match="^x0:"):
        train_step(model, x0[:0], loss, opt)  # an empty batch
    with pytest.raises(ValueError, match="^x0:"):
        free_at_step(model, x0[:0], loss, opt, replay=2)
    with pytest.raises(ValueError, match="^x0:"):
        p.add_noise(torch.ones(2, 2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long), 3)  # int: x_t = 0
    for bad_clip in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="^grad_clip:"):
            train_step(model, x0, loss, opt, grad_clip=bad_clip)
    with pytest.raises(ValueError, match="^nonfinite:"):
        train_step(model, x0, loss, opt, nonfinite="ignore")

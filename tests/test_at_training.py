import copy
import math

import pytest
import torch

from atdiff.losses import DenoisingLoss
from atdiff.networks.mlp import MLP
from atdiff.perturb import Perturber, input_perturbation, paper_at, per_sample_norm
from atdiff.precond import DiffusionModel
from atdiff.processes import VPDiscrete
from atdiff.train import EMA, free_at_step, train_step


def setup(seed=0, dim=4, batch=32, target_mode="invariant"):
    torch.manual_seed(seed)
    p = VPDiscrete("linear", T=100)
    model = DiffusionModel(MLP(dim, hidden=32, depth=2), p)
    torch.nn.init.normal_(model.net.out.weight, std=0.2)
    x0 = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed + 100))
    return p, model, DenoisingLoss(p, target_mode=target_mode), x0


def instrument(model, optimizer):
    """Count forward passes, backward passes that reach the parameters, and optimizer steps."""
    counts = {"forward": 0, "backward": 0, "step": 0}

    def bump(key):
        def hook(*_):
            counts[key] += 1
        return hook

    model.register_forward_hook(bump("forward"))
    model.net.out.weight.register_hook(bump("backward"))
    optimizer.register_step_post_hook(bump("step"))
    return counts


def params(model):
    return [q.detach().clone() for q in model.parameters()]


@pytest.mark.parametrize("replay", [1, 3, 5])
@pytest.mark.parametrize("carry", [False, True])
def test_free_at_makes_k_updates_with_k_forward_backward_passes(replay, carry):
    p, model, loss, x0 = setup(dim=64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ema = EMA(model, 0.9)
    counts = instrument(model, opt)
    out = free_at_step(model, x0, loss, opt, replay=replay, perturber=paper_at(), ema=ema,
                       carry_delta=torch.zeros_like(x0) if carry else None,
                       generator=torch.Generator().manual_seed(0))
    assert counts == {"forward": replay, "backward": replay, "step": replay}
    assert ema.num_updates == replay and out["updates"] == replay
    # the reference recipe's delta grows by at most one step of 0.1 per update, far inside the radius
    # 0.1 sqrt(64) = 0.8: the projection never fires (C8)
    updates = replay if carry else replay - 1
    norms = per_sample_norm(out["delta"])
    assert (norms <= 0.1 * updates * (1 + 1e-5)).all() and (norms >= 0.1 * min(updates, 1) * (1 - 1e-5)).all()
    if updates == 1:
        torch.testing.assert_close(norms, torch.full_like(norms, 0.1))


def test_free_at_with_k1_and_no_perturbation_equals_train_step():
    p, model, loss, x0 = setup()
    model2 = copy.deepcopy(model)
    opt, opt2 = torch.optim.Adam(model.parameters(), lr=1e-2), torch.optim.Adam(model2.parameters(), lr=1e-2)
    ema, ema2 = EMA(model, 0.9), EMA(model2, 0.9)
    g, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    for perturber in (None, Perturber("none")):
        for _ in range(3):
            a = train_step(model, x0, loss, opt, ema=ema, grad_clip=1.0, generator=g)
            b = free_at_step(model2, x0, loss, opt2, replay=1, perturber=perturber, ema=ema2, grad_clip=1.0,
                             generator=g2)
            assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]
    for u, v in zip(params(model) + params(ema.model), params(model2) + params(ema2.model), strict=True):
        assert torch.equal(u, v)


def test_free_at_delta_step_uses_the_gradient_of_the_same_backward():
    p, model, loss, x0 = setup(target_mode="equivariant")
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    pert = Perturber("fgsm", radius=0.3, step_size=0.2, step_units="absolute")
    out = free_at_step(model, x0, loss, opt, replay=2, perturber=pert,
                       generator=torch.Generator().manual_seed(1))
    # by hand: gradient of pass 1 (weights before any update) w.r.t. delta = 0, one l2-normalised step
    record = loss.draw(x0, torch.Generator().manual_seed(1))
    d0 = torch.zeros_like(x0, requires_grad=True)
    loss.evaluate(ref, x0, record, d0).mean().backward()
    g = d0.grad
    want = 0.2 * g / per_sample_norm(g)[:, None]
    torch.testing.assert_close(out["delta"], want)
    # and the weights took two SGD steps, the second at delta = want with the updated weights
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    ref_opt.step()
    ref_opt.zero_grad()
    loss.evaluate(ref, x0, record, want).mean().backward()
    ref_opt.step()
    for u, v in zip(params(model), params(ref), strict=True):
        torch.testing.assert_close(u, v)


def test_free_at_carry_returns_the_delta_to_carry():
    p, model, loss, x0 = setup()
    pert = Perturber("fgsm", norm="linf", radius=0.05, step_size=0.02, step_units="absolute", step_rule="sign")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    delta = torch.zeros_like(x0)
    for k in range(4):
        out = free_at_step(model, x0, loss, opt, replay=2, perturber=pert, carry_delta=delta)
        delta = out["delta"]
        # two sign steps per minibatch, the box of radius 0.05 is reached from the third step on
        want = min(0.04 * (k + 1), 0.05)
        assert per_sample_norm(delta, "linf").max().item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="^carry_delta:"):
        free_at_step(model, x0, loss, opt, replay=2, perturber=pert, carry_delta=delta[:-1])


def test_pgd_training_step_leaks_no_attack_gradient():
    p, model, loss, x0 = setup(target_mode="equivariant-detached")
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    counts = instrument(model, opt)
    pert = Perturber("pgd", radius=0.5, steps=3)
    train_step(model, x0, loss, opt, perturber=pert, generator=torch.Generator().manual_seed(2))
    assert counts == {"forward": 4, "backward": 1, "step": 1}
    # by hand: the same attack, then one gradient at the attacked input
    record = loss.draw(x0, torch.Generator().manual_seed(2))
    delta = pert(lambda dl: loss.evaluate(ref, x0, record, dl), x0, record.t, p)
    loss.evaluate(ref, x0, record, delta).mean().backward()
    for u, r in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(u.detach(), r.detach() - 0.5 * r.grad)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_fgsm_training_step_matches_a_hand_written_attack(norm):
    # FGSM through train_step against an attack written here without the perturber's code: one step of
    # length r along the l2-normalised gradient (l2) or its sign (linf), from delta = 0
    p, model, loss, x0 = setup(target_mode="equivariant-detached")
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    counts = instrument(model, opt)
    r = 0.3
    pert = Perturber("fgsm", norm=norm, radius=r)
    train_step(model, x0, loss, opt, perturber=pert, generator=torch.Generator().manual_seed(4))
    assert counts == {"forward": 2, "backward": 1, "step": 1}
    record = loss.draw(x0, torch.Generator().manual_seed(4))
    d0 = torch.zeros_like(x0, requires_grad=True)
    (g,) = torch.autograd.grad(loss.evaluate(ref, x0, record, d0).sum(), d0)
    delta = r * (g / g.norm(dim=1, keepdim=True) if norm == "l2" else g.sign())
    loss.evaluate(ref, x0, record, delta).mean().backward()
    for u, w in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(u.detach(), w.detach() - 0.5 * w.grad)


@pytest.mark.parametrize("growth_interval", [10**6, 1])  # constant scale; scale doubling after every pass
@pytest.mark.parametrize("rule", ["l2", "sign"])
def test_grad_scaler_gives_the_same_delta_updates(rule, growth_interval):
    p, model, loss, x0 = setup(target_mode="equivariant")
    model2 = copy.deepcopy(model)
    opt, opt2 = torch.optim.Adam(model.parameters(), lr=1e-3), torch.optim.Adam(model2.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20, growth_interval=growth_interval)
    pert = Perturber("fgsm", radius=0.5, step_size=0.1, step_units="absolute", step_rule=rule)
    for seed in range(2):
        a = free_at_step(model, x0, loss, opt, replay=3, perturber=pert, grad_clip=10.0,
                         generator=torch.Generator().manual_seed(seed))
        b = free_at_step(model2, x0, loss, opt2, replay=3, perturber=pert, grad_clip=10.0, scaler=scaler,
                         generator=torch.Generator().manual_seed(seed))
        assert scaler.get_scale() == 2.0 ** (20 if growth_interval > 1 else 20 + 3 * (seed + 1))
        torch.testing.assert_close(a["delta"], b["delta"])
        assert b["delta_grad_norm"] == pytest.approx(a["delta_grad_norm"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    for u, v in zip(params(model), params(model2), strict=True):
        torch.testing.assert_close(u, v)


def test_non_finite_scaled_gradients_skip_the_update():
    p, model, loss, x0 = setup(target_mode="equivariant")
    before = params(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ema = EMA(model, 0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=math.inf)
    pert = Perturber("fgsm", radius=0.5, step_size=0.1, step_units="absolute", init="uniform")
    out = free_at_step(model, x0, loss, opt, replay=3, perturber=pert, scaler=scaler, ema=ema,
                       generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    record = loss.draw(x0, gen)
    start = pert.init_delta(x0, pert.radius_for(x0, record.t, p), gen)
    assert start.abs().sum() > 0
    torch.testing.assert_close(out["delta"], start, rtol=0, atol=0)  # kept: not NaN, not moved
    assert out["skipped"] == 1 and out["updates"] == 0 and ema.num_updates == 0
    for u, v in zip(params(model), before, strict=True):
        assert torch.equal(u, v)


class _Poisoned(torch.nn.Module):
    """Wraps a model; its output is NaN on the calls listed in ``bad`` (counted from 0)."""

    prediction = "eps"

    def __init__(self, model, bad):
        super().__init__()
        self.model, self.bad, self.calls = model, set(bad), 0

    def forward(self, x, t):
        out = self.model(x, t)
        self.calls += 1
        return out * float("nan") if self.calls - 1 in self.bad else out


@pytest.mark.parametrize("step", ["train", "free"])
def test_a_non_finite_loss_never_reaches_the_weights_or_the_ema(step):
    # the fault: one NaN loss used to step the optimiser and turn every parameter and the EMA into NaN for good
    p, model, loss, x0 = setup()
    poisoned = _Poisoned(model, bad={1})
    opt = torch.optim.Adam(poisoned.parameters(), lr=1e-2)
    ema = EMA(poisoned, 0.9)
    gen = torch.Generator().manual_seed(0)
    run = (lambda **kw: train_step(poisoned, x0, loss, opt, ema=ema, generator=gen, grad_clip=1.0, **kw)) \
        if step == "train" else \
        (lambda **kw: free_at_step(poisoned, x0, loss, opt, replay=1, perturber=None, ema=ema, generator=gen, **kw))
    first = run()
    assert first["skipped"] == 0
    snapshot, ema_snapshot = params(poisoned), params(ema.model)
    second = run()  # the poisoned call
    assert second["skipped"] == 1 and not math.isfinite(second["loss"])
    for u, v in zip(params(poisoned) + params(ema.model), snapshot + ema_snapshot, strict=True):
        assert torch.equal(u, v)  # weights, Adam's effect and the EMA untouched
    assert ema.num_updates == 1
    third = run()
    assert third["skipped"] == 0 and all(torch.isfinite(q).all() for q in poisoned.parameters())
    poisoned.bad = {poisoned.calls}
    with pytest.raises(FloatingPointError, match="^loss:"):
        run(nonfinite="raise")
    for u in params(poisoned) + params(ema.model):
        assert torch.isfinite(u).all()


def test_free_at_stops_the_replay_at_a_non_finite_pass():
    p, model, loss, x0 = setup(target_mode="equivariant-detached")
    poisoned = _Poisoned(model, bad={1})  # the second of three passes
    opt = torch.optim.SGD(poisoned.parameters(), lr=1e-2)
    out = free_at_step(poisoned, x0, loss, opt, replay=3, perturber=paper_at(),
                       generator=torch.Generator().manual_seed(3))
    assert out["updates"] == 1 and out["skipped"] == 1 and poisoned.calls == 2
    assert all(torch.isfinite(q).all() for q in poisoned.parameters())


def test_bf16_autocast_runs_on_cpu():
    p, model, loss, x0 = setup()
    model2 = copy.deepcopy(model)
    opt, opt2 = torch.optim.SGD(model.parameters(), lr=1e-2), torch.optim.SGD(model2.parameters(), lr=1e-2)
    a = free_at_step(model, x0, loss, opt, replay=3, perturber=paper_at(),
                     generator=torch.Generator().manual_seed(0))
    b = free_at_step(model2, x0, loss, opt2, replay=3, perturber=paper_at(), autocast_dtype=torch.bfloat16,
                     generator=torch.Generator().manual_seed(0))
    assert b["delta"].dtype == x0.dtype and torch.isfinite(b["delta"]).all()
    assert b["loss"] == pytest.approx(a["loss"], rel=0.05)
    assert all(q.dtype == torch.float32 for q in model2.parameters())
    for u, v in zip(params(model), params(model2), strict=True):
        torch.testing.assert_close(u, v, rtol=0.05, atol=2e-3)
    c = train_step(model2, x0, loss, opt2, perturber=input_perturbation(), autocast_dtype=torch.bfloat16)
    assert math.isfinite(c["loss"])


def test_free_at_training_lowers_the_loss():
    p, model, loss, x0 = setup(dim=2, batch=256)
    data = torch.randn(256, 2) * 0.3 + torch.tensor([1.0, -1.0])
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    record = loss.draw(data, torch.Generator().manual_seed(9))
    before = loss(model, data, record=record).mean().item()
    gen = torch.Generator().manual_seed(5)
    for _ in range(40):
        free_at_step(model, data, loss, opt, replay=3, perturber=paper_at(), generator=gen)
    after = loss(model, data, record=record).mean().item()
    assert after < 0.6 * before, (before, after)


@pytest.mark.parametrize(("kwargs", "name"), [
    (dict(replay=0), "replay"),
    (dict(replay=2.0), "replay"),
    (dict(replay=2, grad_clip=0.0), "grad_clip"),
    (dict(replay=2, perturber=input_perturbation()), "perturber"),
    (dict(replay=2, perturber=Perturber("pgd", radius=0.1, steps=2)), "perturber"),  # K is replay, given once
    (dict(replay=2, grad_clip=float("nan")), "grad_clip"),
    (dict(replay=2, carry_delta=torch.full((32, 4), float("nan"))), "carry_delta"),
    (dict(replay=2, carry_delta=torch.zeros(3, 4)), "carry_delta"),
])
def test_free_at_bad_arguments(kwargs, name):
    p, model, loss, x0 = setup()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    kwargs.setdefault("perturber", paper_at())
    with pytest.raises(ValueError, match=f"^{name}:"):
        free_at_step(model, x0, loss, opt, **kwargs)

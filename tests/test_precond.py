"""Model metadata through wrappers, the preconditioning layer (EDM, consistency), classifier-free guidance, and the
conditioning dict through every loss and training step."""

import copy
import math
import socket

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from atdiff.losses import DenoisingLoss, HybridLoss
from atdiff.networks import MLP
from atdiff.networks.unet import unet_small
from atdiff.param import learned_variance_of, predict, prediction_of, unwrap
from atdiff.perturb import PAPER_TARGET_MODE, paper_at
from atdiff.precond import (
    ClassifierFreeGuidance,
    ConsistencyModel,
    DiffusionModel,
    EDMPrecond,
    consistency_scalings,
    declare,
    edm_scalings,
    network_time,
)
from atdiff.processes import VE, VPContinuous, VPDiscrete
from atdiff.train import free_at_step, train_step

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


# --- metadata ----------------------------------------------------------------------------------------------------
def test_undeclared_models_are_refused_not_guessed():
    with pytest.raises(ValueError, match="^model:"):
        prediction_of(lambda x, t: x)
    with pytest.raises(ValueError, match="^model:"):
        prediction_of(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="^model:"):
        learned_variance_of(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="^model:"):
        predict(lambda x, t: x, torch.zeros(2, 1), torch.tensor(3.0), VPDiscrete())
    model = declare(lambda x, t: 2 * x, "x0", learned_variance=False)
    assert prediction_of(model) == "x0" and not learned_variance_of(model)
    assert torch.equal(model(torch.ones(2, 1), torch.ones(2)), torch.full((2, 1), 2.0))
    with pytest.raises(ValueError, match="^prediction:"):
        declare(lambda x, t: x, "noise")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metadata_survives_ddp_averaged_model_and_compile():
    process = VPDiscrete("linear", T=100)
    net = unet_small(1, 8, learn_sigma=True)
    v_model = DiffusionModel(net, process, prediction="v")
    assert learned_variance_of(v_model)  # taken from the network's own declaration
    averaged = torch.optim.swa_utils.AveragedModel(v_model)
    compiled = torch.compile(v_model)  # lazy: nothing is compiled until it is called
    assert prediction_of(averaged) == "v" and learned_variance_of(averaged)
    assert prediction_of(compiled) == "v" and learned_variance_of(compiled)
    assert unwrap(compiled) is v_model and unwrap(averaged) is averaged.module
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                                         world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(DiffusionModel(MLP(2), process, prediction="x0"))
        assert prediction_of(ddp) == "x0" and not learned_variance_of(ddp)
        # the DDP-wrapped x0-model is converted as an x0-model (a silent "eps" would give another value)
        x, t = torch.randn(4, 2), torch.full((4,), 50.0)
        torch.testing.assert_close(predict(ddp, x, t, process, "x0"), ddp(x, t))
        assert not torch.allclose(predict(ddp, x, t, process, "eps"), ddp(x, t))
    finally:
        torch.distributed.destroy_process_group()


# --- preconditioning ---------------------------------------------------------------------------------------------
@given(sigma=st.floats(1e-3, 200.0), sigma_data=st.floats(0.05, 5.0))
def test_edm_scalings_are_edms_formulas(sigma, sigma_data):
    # Karras et al. 2022, Table 1, written out independently in plain floats
    c_skip, c_out, c_in, c_noise = (v.item() for v in edm_scalings(torch.tensor(sigma, dtype=F64), sigma_data))
    assert c_skip == pytest.approx(sigma_data**2 / (sigma**2 + sigma_data**2), rel=1e-12)
    assert c_out == pytest.approx(sigma * sigma_data / math.sqrt(sigma**2 + sigma_data**2), rel=1e-12)
    assert c_in == pytest.approx(1 / math.sqrt(sigma**2 + sigma_data**2), rel=1e-12)
    assert c_noise == pytest.approx(0.25 * math.log(sigma), rel=1e-12, abs=1e-15)
    # the training target of F has unit variance for data of std sigma_data: c_skip^2 sd^2 + ... identity
    assert c_out**2 == pytest.approx(c_skip * sigma**2, rel=1e-10)


@given(sigma=st.floats(0.002, 80.0), sigma_data=st.floats(0.05, 5.0))
def test_consistency_scalings_are_song_et_al(sigma, sigma_data):
    s_min = 0.002
    c_skip, c_out, c_in = (v.item() for v in consistency_scalings(torch.tensor(sigma, dtype=F64), sigma_data,
                                                                   s_min))
    assert c_skip == pytest.approx(sigma_data**2 / ((sigma - s_min) ** 2 + sigma_data**2), rel=1e-12)
    assert c_out == pytest.approx(sigma_data * (sigma - s_min) / math.sqrt(sigma**2 + sigma_data**2), rel=1e-12,
                                  abs=1e-300)
    assert c_in == pytest.approx(1 / math.sqrt(sigma**2 + sigma_data**2), rel=1e-12)


class _Wild(torch.nn.Module):
    """A network with large, input-dependent outputs (the boundary condition must hold whatever it returns)."""

    def forward(self, x, t):
        return 1e6 * torch.sin(x * 37.0) + t[:, None] * 1e3


@given(scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_consistency_function_is_the_identity_at_sigma_min_exactly(scale, seed):
    x = scale * torch.randn(5, 3, generator=torch.Generator().manual_seed(seed))
    for dtype in (torch.float32, F64):
        f = ConsistencyModel(_Wild(), sigma_data=0.5, sigma_min=0.002)
        out = f(x.to(dtype), torch.full((5,), 0.002, dtype=dtype))
        assert torch.equal(out, x.to(dtype))
        assert not torch.allclose(f(x.to(dtype), torch.full((5,), 0.5, dtype=dtype)), x.to(dtype))


def test_edm_precond_recovers_the_bayes_denoiser_with_the_right_network():
    # Gaussian data N(0, sd^2): the Bayes denoiser is D(y; s) = sd^2 / (sd^2 + s^2) y = c_skip y, so F = 0 is exact
    # for every process; a DiffusionModel would need the network to learn it.
    class Zero(torch.nn.Module):
        def forward(self, x, t):
            return torch.zeros_like(x)

    sd = 0.7
    for process in (VE(), VPDiscrete("cosine"), VPContinuous()):
        model = EDMPrecond(Zero(), process, sigma_data=sd)
        t = torch.full((6,), 0.4 * process.t_max, dtype=F64)
        x = torch.randn(6, 2, dtype=F64)
        a, s = process.alpha(t)[:, None], process.sigma(t)[:, None]
        bayes_x0 = a * sd**2 / (a**2 * sd**2 + s**2) * x
        torch.testing.assert_close(predict(model, x, t, process, "x0"), bayes_x0)


def test_network_time_conventions():
    t = torch.tensor([1.0, 500.0])
    assert torch.equal(network_time(VPDiscrete(), t), t)
    torch.testing.assert_close(network_time(VPContinuous(), torch.tensor([0.5])), torch.tensor([500.0]))
    torch.testing.assert_close(network_time(VE(), torch.tensor([math.e])), torch.tensor([250.0]))


# --- classifier-free guidance ------------------------------------------------------------------------------------
class _LabelNet(torch.nn.Module):
    """eps-model whose output depends on the label: ``0.1 x + mu[y]`` (label 3 = "no class": mu = 0)."""

    prediction = "eps"

    def __init__(self):
        super().__init__()
        self.mu = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0], [0.0, 0.0]])

    def forward(self, x, t, y):
        return 0.1 * x + self.mu[y]


def test_guidance_scale_one_is_the_conditional_and_zero_the_unconditional_model():
    net = _LabelNet()
    x, t, y = torch.randn(6, 2), torch.full((6,), 10.0), torch.tensor([0, 1, 2, 0, 1, 2])
    cond, uncond = net(x, t, y), net(x, t, torch.full((6,), 3))
    assert torch.equal(ClassifierFreeGuidance(net, 1.0, {"y": 3})(x, t, y=y), cond)
    assert torch.equal(ClassifierFreeGuidance(net, 0.0, {"y": 3})(x, t, y=y), uncond)
    torch.testing.assert_close(ClassifierFreeGuidance(net, 3.0, {"y": 3})(x, t, y=y), uncond + 3 * (cond - uncond))
    assert prediction_of(ClassifierFreeGuidance(net, 2.0, {"y": 3})) == "eps"
    with pytest.raises(ValueError, match="^cond:"):
        ClassifierFreeGuidance(net, 2.0, {"y": 3})(x, t)
    with pytest.raises(ValueError, match="^uncond:"):
        ClassifierFreeGuidance(net, 2.0, {})


def test_guidance_keeps_the_conditional_variance_of_a_learned_variance_model():
    process = VPDiscrete("cosine", T=100)
    model = DiffusionModel(unet_small(1, 8, num_classes=4, learn_sigma=True), process)
    torch.nn.init.normal_(model.net.out[-1].weight, std=0.1)
    x, t, y = torch.randn(3, 1, 8, 8), torch.full((3,), 40.0), torch.tensor([0, 1, 2])
    guided = ClassifierFreeGuidance(model, 2.5, {"y": 3})(x, t, y=y)
    c, u = model(x, t, y=y), model(x, t, y=torch.full((3,), 3))
    torch.testing.assert_close(guided[:, 1:], c[:, 1:])
    torch.testing.assert_close(guided[:, :1], 2.5 * c[:, :1] - 1.5 * u[:, :1])


# --- conditioning through losses and training steps -------------------------------------------------------------
def _class_conditional_unet(process, learn_sigma=False):
    torch.manual_seed(0)
    model = DiffusionModel(unet_small(1, 8, num_classes=3, learn_sigma=learn_sigma), process)
    with torch.no_grad():  # ADM starts every residual branch and the output at zero: no label effect yet
        for q in model.parameters():
            if q.ndim > 1 and bool((q == 0).all()):
                q.normal_(0.0, 0.05)
    return model


@pytest.mark.parametrize("step", ["train", "free"])
@pytest.mark.parametrize("hybrid", [False, True])
def test_a_class_conditional_unet_trains_through_every_loss_and_step(step, hybrid):
    process = VPDiscrete("cosine", T=100)
    model = _class_conditional_unet(process, learn_sigma=hybrid)
    loss = HybridLoss(process, target_mode=PAPER_TARGET_MODE) if hybrid else \
        DenoisingLoss(process, target_mode=PAPER_TARGET_MODE)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(8, 1, 8, 8, generator=gen) * 2 - 1
    y = torch.randint(0, 3, (8,), generator=gen)
    with pytest.raises(ValueError, match="^y:"):  # the labels are required, so they must arrive
        loss(model, x0)
    record = loss.draw(x0, gen)
    seen = []
    model.net.register_forward_pre_hook(lambda _m, args, kwargs: seen.append(kwargs.get("y")), with_kwargs=True)
    by_label = loss(model, x0, record=record, cond={"y": y})
    other = loss(model, x0, record=record, cond={"y": (y + 1) % 3})
    assert not torch.allclose(by_label, other)  # the label reaches the network
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    before = copy.deepcopy(model.net.label_embed.weight.detach())
    seen.clear()
    if step == "train":
        stats = train_step(model, x0, loss, opt, cond={"y": y}, perturber=paper_at(), generator=gen)
    else:
        stats = free_at_step(model, x0, loss, opt, replay=3, perturber=paper_at(), cond={"y": y}, generator=gen)
    assert stats["skipped"] == 0 and len(seen) >= 2 and all(torch.equal(s, y) for s in seen)
    # the embeddings of the labels used moved, and only those rows
    moved = (model.net.label_embed.weight.detach() - before).abs().sum(1) > 0
    assert moved.tolist() == [bool((y == k).any()) for k in range(3)]

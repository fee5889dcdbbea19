import pytest
import torch

from atdiff.losses import DenoisingLoss
from atdiff.networks import UNet, unet_cifar10, unet_cifar10_adm, unet_imagenet64, unet_small
from atdiff.networks.unet import AttentionBlock, ResBlock, num_groups, qkv_permutation
from atdiff.param import learned_variance_of, prediction_of
from atdiff.precond import ClassifierFreeGuidance, DiffusionModel, declare
from atdiff.processes import VPDiscrete
from atdiff.train import train_step

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread is faster on 2 busy cores


def adm_like(**kw):
    """A tiny net through every code path of the ImageNet-64 preset: resblock up/down, num_head_channels,
    three levels with a width (96) that is not a power of two, learned sigma, class conditioning."""
    cfg = dict(in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1, attention_resolutions=(8, 4),
               channel_mult=(1, 2, 3), num_head_channels=16, resblock_updown=True, learn_sigma=True,
               num_classes=5, image_size=16)
    return UNet(**{**cfg, **kw})


def wake(model, std=0.05, seed=0):
    """Give the zero-initialised parameters small random values (in place); returns the model."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(std * torch.randn(p.shape, generator=gen))
    return model


def inputs(model, b=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, model.in_channels, model.image_size, model.image_size, generator=gen)
    t = torch.rand(b, generator=gen) * 1000
    y = None if model.num_classes is None else torch.randint(0, model.num_classes, (b,), generator=gen)
    return x, t, y


@pytest.mark.parametrize("make", [unet_small, adm_like], ids=["small", "adm_like"])
def test_fresh_unet_outputs_exactly_zero_and_blocks_start_as_identity(make):
    model = make()
    x, t, y = inputs(model)
    out = model(x, t, y)
    assert out.shape == (4, model.out_channels, model.image_size, model.image_size)
    assert torch.equal(out, torch.zeros_like(out))
    # the zero-initialised last conv makes a same-width residual block the identity
    block = ResBlock(32, 128, 32, dropout=0.0)
    h = torch.randn(2, 32, 8, 8)
    assert torch.equal(block(h, torch.randn(2, 128)), h)


def test_learn_sigma_doubles_the_output_channels():
    assert adm_like().out_channels == 6
    assert adm_like(learn_sigma=False).out_channels == 3


def test_output_depends_on_time_and_label():
    model = wake(adm_like()).eval()
    x, t, y = inputs(model)
    with torch.no_grad():
        base = model(x, t, y)
        other_t = model(x, t + 100.0, y)
        other_y = model(x, t, (y + 1) % model.num_classes)
    scale = base.abs().max()
    assert scale > 0
    assert (other_t - base).abs().max() > 1e-2 * scale
    assert (other_y - base).abs().max() > 1e-2 * scale


def test_batch_permutation_equivariance_and_no_cross_sample_leakage():
    model = wake(adm_like(dropout=0.3)).eval()  # eval: dropout must be off
    x, t, y = inputs(model, b=5)
    perm = torch.tensor([3, 0, 4, 1, 2])
    with torch.no_grad():
        out = model(x, t, y)
        tol = dict(rtol=1e-4, atol=1e-4 * out.abs().max().item())  # batched kernels may reorder sums
        torch.testing.assert_close(model(x[perm], t[perm], y[perm]), out[perm], **tol)
        # changing sample 0 leaves the others untouched (nothing normalises or attends across the batch)
        x2 = x.clone()
        x2[0] = torch.randn_like(x2[0])
        out2 = model(x2, t, y)
    torch.testing.assert_close(out2[1:], out[1:], **tol)
    assert (out2[0] - out[0]).abs().max() > 1e-2 * out.abs().max()


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_preset_parameter_counts_match_the_papers():
    # On the meta device nothing is allocated (the ImageNet-64 net would take 1.2 GB in fp32).
    with torch.device("meta"):
        cifar, imagenet = unet_cifar10(), unet_imagenet64()
    assert next(cifar.parameters()).device.type == "meta"
    # 52.5M: the CIFAR-10 model of Nichol & Dhariwal 2021 (IDDPM: 128 channels, 3 blocks, mult 1,2,2,2,
    # 4 heads, attention at 16 and 8 -- improved-diffusion's default "16,8" -- dropout 0.3, learned sigma).
    assert abs(count(cifar) / 52.5e6 - 1) < 0.10
    # 296M: the class-conditional ImageNet 64x64 ADM of Dhariwal & Nichol 2021 (their hyper-parameter table:
    # 192 channels, 3 blocks, mult 1,2,3,4, 64 channels per head at 32,16,8, BigGAN up/down, learned sigma).
    assert abs(count(imagenet) / 296e6 - 1) < 0.10
    # and to the precision the papers quote (one missing residual block would already break this)
    assert round(count(cifar) / 1e6, 1) == 52.5
    assert round(count(imagenet) / 1e6) == 296
    assert cifar.out_channels == 6 and imagenet.out_channels == 6 and imagenet.num_classes == 1000


def test_gradient_checkpointing_gives_the_same_gradients():
    plain = wake(adm_like(dropout=0.2))
    ckpt = adm_like(dropout=0.2, use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    calls = {"plain": 0, "ckpt": 0}
    plain.middle[0].conv1.register_forward_hook(lambda *_: calls.__setitem__("plain", calls["plain"] + 1))
    ckpt.middle[0].conv1.register_forward_hook(lambda *_: calls.__setitem__("ckpt", calls["ckpt"] + 1))
    x, t, y = inputs(plain)
    for model in (plain, ckpt):
        model.train()
        torch.manual_seed(0)  # same dropout masks; checkpoint replays the RNG state in its recompute
        (model(x, t, y) ** 2).sum().backward()
    assert calls == {"plain": 1, "ckpt": 2}  # the checkpointed block really was recomputed
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert p.grad is not None, name
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_unet_small_overfits_a_tiny_batch():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    # 8 smooth 16x16 colour images (bilinear upsampling of 4x4 noise)
    x0 = torch.nn.functional.interpolate(torch.randn(8, 3, 4, 4, generator=gen), size=16, mode="bilinear",
                                         align_corners=False).clamp(-1, 1)
    process = VPDiscrete("cosine", T=100)
    model = DiffusionModel(unet_small(3, 16), process)
    loss = DenoisingLoss(process)
    # a fixed evaluation set of (t, eps) on the same images, so the comparison is free of sampling noise
    x_eval = x0.repeat(4, 1, 1, 1)
    record = loss.draw(x_eval, torch.Generator().manual_seed(1))

    def evaluate(m):
        with torch.no_grad():
            return loss.evaluate(m, x_eval, record).mean().item()

    # the best data-blind predictor of the form c(t) x_t (Gaussian shrinkage with the data's second moment)
    s2 = x0.pow(2).mean()

    def shrinkage(x_t, t):
        a2, sig = process.abar(t)[:, None, None, None].float(), process.sigma(t)[:, None, None, None].float()
        return sig * x_t / (a2 * s2 + sig**2)

    model.eval()
    initial = evaluate(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(50):
        train_step(model, x0, loss, optimizer, generator=gen)
    model.eval()
    final = evaluate(model)
    assert abs(initial - 1) < 0.1  # zero output: the loss is mean(eps^2)
    assert final < 0.5 * initial
    # it learned the images, not just a per-time rescaling of x_t
    assert final < evaluate(declare(shrinkage, prediction="eps"))


def test_bf16_autocast_forward_is_close_to_fp32():
    model = wake(adm_like(), std=0.1).eval()
    x, t, y = inputs(model)
    with torch.no_grad():
        ref = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, y)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 5e-2


def test_group_count_handles_narrow_layers():
    assert [num_groups(c) for c in (256, 96, 48, 16, 6, 1)] == [32, 32, 24, 16, 6, 1]
    model = UNet(1, 8, 1, 1, attention_resolutions=(4,), channel_mult=(1, 3), image_size=8)
    out = wake(model)(torch.randn(2, 1, 8, 8), torch.tensor([1.0, 2.0]))
    assert out.shape == (2, 1, 8, 8)


@pytest.mark.parametrize("make_args, name", [
    (lambda x, t, y: (x[:, :2], t, y), "x"),  # wrong channel count
    (lambda x, t, y: (x[..., :8, :8], t, y), "x"),  # wrong size
    (lambda x, t, y: (x[0], t, y), "x"),  # missing batch dim
    (lambda x, t, y: (x, t[:2], y), "t"),
    (lambda x, t, y: (x, t[:, None], y), "t"),
    (lambda x, t, y: (x, t, None), "y"),  # required for a class-conditional net
    (lambda x, t, y: (x, t, y.float()), "y"),
    (lambda x, t, y: (x, t, y[:2]), "y"),
])
def test_bad_inputs_raise_naming_the_argument(make_args, name):
    model = adm_like()
    with pytest.raises(ValueError, match=f"^{name}:"):
        model(*make_args(*inputs(model)))


def test_labels_are_rejected_by_an_unconditional_net():
    model = unet_small()
    x, t, _ = inputs(model)
    with pytest.raises(ValueError, match="^y:"):
        model(x, t, torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("kwargs, name", [
    (dict(attention_resolutions=(12,)), "attention_resolutions"),
    (dict(image_size=18), "image_size"),  # not divisible by 2**(3-1)
    (dict(num_head_channels=24), "num_head_channels"),  # does not divide 32
    (dict(channel_mult=()), "channel_mult"),
    (dict(dropout=1.0), "dropout"),
    (dict(num_classes=0), "num_classes"),
    (dict(model_channels=0), "model_channels"),
])
def test_bad_constructor_arguments_raise_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        adm_like(**kwargs)


def adm_count(width, mult, blocks, attention_levels, in_ch=3, out_ch=3, updown=False, scale_shift=True):
    """ADM's parameter count from its published layout, layer by layer in closed form (3x3 conv: 9ab + b,
    1x1 conv / linear: ab + b, GroupNorm: 2c), independent of how the library builds its modules."""
    emb = 4 * width

    def conv3(a, b):
        return 9 * a * b + b

    def lin(a, b):
        return a * b + b

    def res(a, b):
        return 2 * a + conv3(a, b) + lin(emb, (2 if scale_shift else 1) * b) + 2 * b + conv3(b, b) + \
            (lin(a, b) if a != b else 0)

    def attn(c):
        return 2 * c + lin(c, 3 * c) + lin(c, c)

    total = lin(width, emb) + lin(emb, emb) + conv3(in_ch, width * mult[0])
    ch, skips = width * mult[0], [width * mult[0]]
    for level, m in enumerate(mult):
        for _ in range(blocks):
            total += res(ch, width * m) + (attn(width * m) if level in attention_levels else 0)
            ch = width * m
            skips.append(ch)
        if level < len(mult) - 1:
            total += res(ch, ch) if updown else conv3(ch, ch)
            skips.append(ch)
    total += 2 * res(ch, ch) + attn(ch)
    for level in reversed(range(len(mult))):
        for i in range(blocks + 1):
            total += res(ch + skips.pop(), width * mult[level])
            ch = width * mult[level]
            total += attn(ch) if level in attention_levels else 0
            if level and i == blocks:
                total += res(ch, ch) if updown else conv3(ch, ch)
    return total + 2 * ch + conv3(ch, out_ch)


def test_paper_cifar10_network_parameter_count_in_closed_form():
    with torch.device("meta"):
        paper, iddpm = unet_cifar10_adm(), unet_cifar10()
    # 128 channels, mult (1, 2, 2, 2), 3 blocks, attention at 16x16 and 8x8 (levels 1 and 2), learned sigma
    want = adm_count(128, (1, 2, 2, 2), 3, {1, 2}, out_ch=6, updown=True)
    assert count(paper) == want == 57_094_662
    # IDDPM's model differs only in its resampling layers (3x3 convs instead of residual blocks)
    assert count(iddpm) == adm_count(128, (1, 2, 2, 2), 3, {1, 2}, out_ch=6, updown=False)
    heads = {m.num_heads for m in paper.modules() if isinstance(m, AttentionBlock)}
    assert heads == {256 // 32} and paper.attention_order == "new" and paper.learned_variance
    assert {m.order for m in paper.modules() if isinstance(m, AttentionBlock)} == {"new"}
    assert {m.dropout.p for m in paper.modules() if isinstance(m, ResBlock)} == {0.3}
    assert all(m.use_scale_shift_norm for m in paper.modules() if isinstance(m, ResBlock))


def test_unet_declares_eps_and_its_learned_variance():
    assert adm_like().prediction == "eps" and adm_like().learned_variance
    assert unet_small().prediction == "eps" and not unet_small().learned_variance
    assert prediction_of(adm_like()) == "eps" and learned_variance_of(adm_like())
    assert not learned_variance_of(unet_small())


def test_null_class_adds_one_label_row_for_guidance():
    base = adm_like()
    guided = adm_like(null_class=True)
    assert base.null_label is None and guided.null_label == 5
    assert guided.label_embed.num_embeddings == 6 and base.label_embed.num_embeddings == 5
    assert count(guided) - count(base) == 4 * 32  # one embedding row of the 4 * model_channels time width
    with torch.device("meta"):  # off by default: presets keep ADM's parameter count
        assert count(unet_imagenet64()) == 295_904_454
    wake(guided).eval()
    x, t, y = inputs(guided)
    null = torch.full_like(y, guided.null_label)
    with torch.no_grad():
        cond, uncond = guided(x, t, y), guided(x, t, null)
        # the null label is an ordinary row of the embedding: its output is the net with that row's vector
        emb_null = guided.label_embed.weight[5].clone()
        guided.label_embed.weight[y] = emb_null
        torch.testing.assert_close(guided(x, t, y), uncond)
    assert (cond - uncond).abs().max() > 1e-2 * cond.abs().max()
    with pytest.raises(ValueError, match="^null_class:"):
        unet_small(null_class=True)


@pytest.mark.parametrize("order", ["new", "legacy"])
def test_attention_orders_are_permutations_of_each_other(order):
    """A net of either attention order equals the other order's net with permuted qkv rows; with one head per
    layer the orders coincide."""
    net = wake(adm_like(attention_order=order)).eval()
    other = "legacy" if order == "new" else "new"
    twin = adm_like(attention_order=other).eval()
    state = net.state_dict()
    for name, module in net.named_modules():
        if isinstance(module, AttentionBlock):
            perm = qkv_permutation(module.qkv.in_channels, module.num_heads, order, other)
            for leaf in ("weight", "bias"):
                state[f"{name}.qkv.{leaf}"] = state[f"{name}.qkv.{leaf}"][perm]
    twin.load_state_dict(state)
    x, t, y = inputs(net)
    with torch.no_grad():
        out = net(x, t, y)
        torch.testing.assert_close(twin(x, t, y), out, rtol=1e-4, atol=1e-5 * out.abs().max().item())
        twin.load_state_dict(net.state_dict())  # unpermuted: another function when heads > 1
        assert (twin(x, t, y) - out).abs().max() > 1e-3 * out.abs().max()
    with pytest.raises(ValueError, match="^attention_order:"):
        adm_like(attention_order="old")


def test_null_label_drives_classifier_free_guidance():
    net = wake(adm_like(null_class=True)).eval()
    process = VPDiscrete("cosine", T=100)
    model = DiffusionModel(net, process)
    x, _, y = inputs(net)
    t = torch.tensor([3.0, 40.0, 70.0, 100.0])
    with torch.no_grad():
        cond = model(x, t, y=y)
        uncond = model(x, t, y=torch.full_like(y, net.null_label))
        outs = {s: ClassifierFreeGuidance(model, s, {"y": net.null_label})(x, t, y=y) for s in (0.0, 1.0, 3.0)}
    tol = dict(rtol=1e-4, atol=1e-5 * cond.abs().max().item())  # a batch of 2B may sum in another order
    torch.testing.assert_close(outs[1.0], cond, **tol)
    torch.testing.assert_close(outs[0.0][:, :3], uncond[:, :3], **tol)
    torch.testing.assert_close(outs[3.0][:, :3], 3 * cond[:, :3] - 2 * uncond[:, :3], **tol)
    torch.testing.assert_close(outs[3.0][:, 3:], cond[:, 3:], **tol)  # the variance channels stay conditional

"""ADM checkpoints and diffusers models as library models, checked against independent references.

guided-diffusion is not installable here, so ``RefADM`` below re-implements its ``UNetModel`` from the published
architecture (Dhariwal & Nichol 2021, App. A; Nichol & Dhariwal 2021) with its parameter names: the converter
must map a state dict of that naming to a library UNet with identical outputs. The reference computes attention
the way ADM does (einsum with ``ch ** -1/4`` on q and k, softmax, per-head reshapes of the qkv tensor in both
orders) rather than with ``scaled_dot_product_attention``, so it also checks the library's attention layouts.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from atdiff.interop import (
    ADMModel,
    DiffusersModel,
    adm_key_map,
    convert_adm_state_dict,
    from_diffusers,
    load_adm_state_dict,
    unet_from_adm_flags,
)
from atdiff.networks import unet_cifar10_adm
from atdiff.networks.unet import AttentionBlock, ResBlock, qkv_permutation
from atdiff.param import predict, predict_with_variance
from atdiff.processes import VE, VPDiscrete

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors

# --------------------------------------------------------------------------------------------------------------
# the reference: ADM's UNetModel with its module names, written from the architecture as published


class RefNorm(nn.GroupNorm):
    def __init__(self, channels):
        super().__init__(32, channels)

    def forward(self, x):
        return super().forward(x.float()).to(x.dtype)


def ref_time_features(steps, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    angles = steps.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class RefResBlock(nn.Module):
    def __init__(self, ch, emb_ch, out_ch, dropout, scale_shift, resample=None):
        super().__init__()
        self.in_layers = nn.Sequential(RefNorm(ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, out_ch * (2 if scale_shift else 1)))
        self.out_layers = nn.Sequential(RefNorm(out_ch), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip_connection = nn.Identity() if ch == out_ch else nn.Conv2d(ch, out_ch, 1)
        self.scale_shift, self.resample = scale_shift, resample

    def _resample(self, x):
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return F.avg_pool2d(x, 2, 2) if self.resample == "down" else x

    def forward(self, x, emb):
        h = self.in_layers[2](self._resample(self.in_layers[1](self.in_layers[0](x))))
        x = self._resample(x)
        e = self.emb_layers(emb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
        else:
            h = self.out_layers[0](h + e)
        for layer in self.out_layers[1:]:
            h = layer(h)
        return self.skip_connection(x) + h


class RefAttention(nn.Module):
    def __init__(self, ch, heads, legacy):
        super().__init__()
        self.norm = RefNorm(ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv1d(ch, ch, 1)
        self.heads, self.legacy = heads, legacy

    def forward(self, x):
        b, c, hh, ww = x.shape
        flat = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(flat))
        d = c // self.heads
        if self.legacy:  # per head, then q|k|v
            q, k, v = qkv.reshape(b * self.heads, 3 * d, -1).split(d, dim=1)
        else:  # q|k|v, then per head
            q, k, v = (part.reshape(b * self.heads, d, -1) for part in qkv.chunk(3, dim=1))
        s = d ** -0.25
        w = torch.softmax(torch.einsum("bct,bcs->bts", q * s, k * s).float(), dim=-1)
        a = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, -1)
        return (flat + self.proj_out(a)).reshape(b, c, hh, ww)


class RefDown(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class RefUp(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class RefSeq(nn.Sequential):
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, RefResBlock) else layer(x)
        return x


class RefADM(nn.Module):
    """ADM's UNetModel; ``attention_ds`` are downsampling rates, as in its constructor."""

    def __init__(self, in_ch, width, out_ch, blocks, attention_ds, dropout=0.0, mult=(1, 2), heads=1,
                 head_ch=-1, classes=None, scale_shift=True, updown=False, legacy=True):
        super().__init__()
        emb = 4 * width
        self.width, self.classes = width, classes
        self.time_embed = nn.Sequential(nn.Linear(width, emb), nn.SiLU(), nn.Linear(emb, emb))
        if classes is not None:
            self.label_emb = nn.Embedding(classes, emb)

        def res(a, b, resample=None):
            return RefResBlock(a, emb, b, dropout, scale_shift, resample)

        def att(c):
            return RefAttention(c, heads if head_ch == -1 else c // head_ch, legacy)

        ch = width * mult[0]
        self.input_blocks = nn.ModuleList([RefSeq(nn.Conv2d(in_ch, ch, 3, padding=1))])
        chans, ds = [ch], 1
        for level, m in enumerate(mult):
            for _ in range(blocks):
                layers = [res(ch, width * m)]
                ch = width * m
                if ds in attention_ds:
                    layers.append(att(ch))
                self.input_blocks.append(RefSeq(*layers))
                chans.append(ch)
            if level < len(mult) - 1:
                self.input_blocks.append(RefSeq(res(ch, ch, "down") if updown else RefDown(ch)))
                chans.append(ch)
                ds *= 2
        self.middle_block = RefSeq(res(ch, ch), att(ch), res(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for i in range(blocks + 1):
                layers = [res(ch + chans.pop(), width * m)]
                ch = width * m
                if ds in attention_ds:
                    layers.append(att(ch))
                if level and i == blocks:
                    layers.append(res(ch, ch, "up") if updown else RefUp(ch))
                    ds //= 2
                self.output_blocks.append(RefSeq(*layers))
        self.out = nn.Sequential(RefNorm(ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))

    def forward(self, x, timesteps, y=None):
        emb = self.time_embed(ref_time_features(timesteps, self.width))
        if self.classes is not None:
            emb = emb + self.label_emb(y)
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


# the same tiny networks as ADM flag dicts (for the library) and RefADM arguments (for the reference)
CONFIGS = {
    # the paper's kind of network: BigGAN up/down blocks, channels per head, new attention order, learned sigma
    "adm_new": (dict(image_size=16, num_channels=32, num_res_blocks=1, attention_resolutions="8",
                     channel_mult="1,2", num_head_channels=16, learn_sigma=True, resblock_updown=True,
                     use_new_attention_order=True),
                dict(in_ch=3, width=32, out_ch=6, blocks=1, attention_ds=(2,), head_ch=16, updown=True,
                     legacy=False)),
    # improved-diffusion's kind: conv resampling, a head count, legacy order, class labels, additive embedding
    "iddpm_legacy": (dict(image_size=16, num_channels=32, num_res_blocks=2, attention_resolutions="16,8",
                          channel_mult="1,2", num_heads=2, class_cond=True, num_classes=3,
                          use_scale_shift_norm=False, diffusion_steps=4000, noise_schedule="cosine"),
                     dict(in_ch=3, width=32, out_ch=3, blocks=2, attention_ds=(1, 2), heads=2, classes=3,
                          scale_shift=False, legacy=True)),
}


def reference(name, seed=0):
    torch.manual_seed(seed)
    return RefADM(**CONFIGS[name][1]).eval()


def batch(ref, b=3, seed=1, steps=1000):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, 16, 16, generator=gen)
    i = torch.randint(0, steps, (b,), generator=gen)
    y = None if ref.classes is None else torch.randint(0, ref.classes, (b,), generator=gen)
    return x, i, y


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_converted_adm_checkpoint_gives_the_reference_outputs(name, tmp_path):
    ref = reference(name)
    path = tmp_path / "model.pt"
    torch.save(ref.state_dict(), path)
    flags = CONFIGS[name][0]
    net = load_adm_state_dict(unet_from_adm_flags(**flags), path,
                              attention_order="new" if flags.get("use_new_attention_order") else "legacy").eval()
    x, i, y = batch(ref)
    with torch.no_grad():
        want = ref(x, i, y)
        got = net(x, i.float(), y)
    assert want.abs().max() > 0.1  # the reference's weights are all non-zero: a real signal
    close(got, want)
    # the same checkpoint into a network of the other attention layout: the converter permutes the qkv rows
    source = net.attention_order
    flipped = {**flags, "use_new_attention_order": source == "legacy"}
    other = load_adm_state_dict(unet_from_adm_flags(**flipped), ref.state_dict(), attention_order=source).eval()
    assert other.attention_order != source
    # and a converter told the wrong layout gives another function (the permutation matters)
    wrong = load_adm_state_dict(unet_from_adm_flags(**flipped), ref.state_dict(),
                                attention_order=other.attention_order).eval()
    with torch.no_grad():
        close(other(x, i.float(), y), want)
        assert (wrong(x, i.float(), y) - want).abs().max() > 1e-3 * want.abs().max()


def test_adm_model_feeds_the_step_index_and_matches_adm_noise_levels():
    ref = reference("adm_new")
    flags = CONFIGS["adm_new"][0]
    net = load_adm_state_dict(unet_from_adm_flags(**flags), ref.state_dict(), attention_order="new").eval()
    process = VPDiscrete("linear", T=1000)
    model = ADMModel(net, process)
    assert model.prediction == "eps" and model.learned_variance
    x, i, _ = batch(ref)
    # ADM's q(x_i | x_0) uses alphas_cumprod[i] = prod_{s <= i} (1 - beta_s) with beta linear in [1e-4, 0.02]
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    abar = np.cumprod(1 - betas)[i.numpy()]
    t = i + 1  # the library's time of ADM's index i
    torch.testing.assert_close(process.alpha(t.double()) ** 2, torch.from_numpy(abar), rtol=1e-12, atol=0)
    with torch.no_grad():
        want = ref(x, i)
        eps, v = predict_with_variance(model, x, t.float(), process)
    close(eps, want[:, :3])
    close(v, want[:, 3:])
    with torch.no_grad():  # the declared eps converts like any other model's
        x0 = predict(model, x, t.float(), process, kind="x0")
    a = process.alpha(t.float())[:, None, None, None]
    s = process.sigma(t.float())[:, None, None, None]
    close(x0, (x - s * want[:, :3]) / a)


def test_adm_model_rescales_timesteps_like_improved_diffusion():
    ref = reference("iddpm_legacy")
    net = load_adm_state_dict(unet_from_adm_flags(**CONFIGS["iddpm_legacy"][0]), ref.state_dict(),
                              attention_order="legacy").eval()
    process = VPDiscrete("cosine", T=4000)
    model = ADMModel(net, process, rescale_timesteps=True)
    assert model.prediction == "eps" and not model.learned_variance
    x, i, y = batch(ref, steps=4000)
    with torch.no_grad():
        close(model(x, (i + 1).float(), y=y), ref(x, i.float() * 1000.0 / 4000, y))


def test_paper_cifar10_network_has_adm_structure_and_parameter_count():
    """The paper's CIFAR-10 network against ADM's UNetModel for the same arguments (image 32, 128 channels,
    mult 1,2,2,2, 3 blocks, attention at downsampling rates 2 and 4 i.e. 16x16 and 8x8, 32 channels per head,
    resblock_updown, new attention order, learned sigma, dropout 0.3): the same tensors under ADM's names,
    the same head count in every attention layer, the same parameter count."""
    with torch.device("meta"):
        net = unet_cifar10_adm()
        ref = RefADM(3, 128, 6, 3, attention_ds=(2, 4), dropout=0.3, mult=(1, 2, 2, 2), head_ch=32, updown=True,
                     legacy=False)
    mapping = adm_key_map(net)
    ours = {mapping[k]: tuple(v.shape) for k, v in net.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours == theirs
    count = sum(p.numel() for p in net.parameters())
    assert count == sum(p.numel() for p in ref.parameters()) == 57_094_662
    heads_ours = [m.num_heads for m in net.modules() if isinstance(m, AttentionBlock)]
    heads_ref = [m.heads for m in ref.modules() if isinstance(m, RefAttention)]
    assert heads_ours == heads_ref and set(heads_ours) == {8}  # 16x16 and 8x8 have 256 channels: 256 / 32
    assert len(heads_ours) == 3 * 2 + 1 + 4 * 2  # encoder (3 blocks x 2 levels), middle, decoder (4 x 2)
    # the 3 down-sampling and 3 up-sampling layers are residual blocks with parameters (BigGAN style)
    assert sum("down" == getattr(m, "resample", None) for m in ref.modules()) == 3
    assert sum("up" == getattr(m, "resample", None) for m in ref.modules()) == 3
    assert sum(m.down for m in net.modules() if isinstance(m, ResBlock)) == 3
    assert sum(m.up for m in net.modules() if isinstance(m, ResBlock)) == 3


def test_qkv_permutation_round_trips_and_matches_attention_layouts():
    perm = qkv_permutation(8, 4, "legacy", "new")
    back = qkv_permutation(8, 4, "new", "legacy")
    assert torch.equal(perm[back], torch.arange(24)) and not torch.equal(perm, torch.arange(24))
    assert torch.equal(qkv_permutation(8, 1, "legacy", "new"), torch.arange(24))  # one head: same layout
    # position (q|k|v = s, head h, channel c) of the new layout holds row (h, s, c) of the legacy one
    assert perm[1 * 8 + 2 * 2 + 1].item() == 2 * 6 + 1 * 2 + 1
    torch.manual_seed(0)
    legacy = AttentionBlock(8, 4, order="legacy")
    nn.init.normal_(legacy.proj.weight)
    new = AttentionBlock(8, 4, order="new")
    new.load_state_dict(legacy.state_dict())
    with torch.no_grad():
        new.qkv.weight.copy_(legacy.qkv.weight[perm])
        new.qkv.bias.copy_(legacy.qkv.bias[perm])
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        close(new(x), legacy(x))


def test_checkpoint_of_another_architecture_is_refused_naming_the_key(tmp_path):
    ref = reference("iddpm_legacy")
    flags = CONFIGS["iddpm_legacy"][0]
    sd = ref.state_dict()
    with pytest.raises(ValueError, match=r"^state_dict: .*unexpected .*label_emb\.weight"):
        convert_adm_state_dict(unet_from_adm_flags(**{**flags, "class_cond": False}), sd, attention_order="legacy")
    missing = {k: v for k, v in sd.items() if k != "middle_block.1.qkv.bias"}
    with pytest.raises(ValueError, match=r"^state_dict: .*missing 1 key\(s\): middle_block\.1\.qkv\.bias"):
        convert_adm_state_dict(unet_from_adm_flags(**flags), missing, attention_order="legacy")
    with pytest.raises(ValueError, match=r"^state_dict: 'label_emb\.weight' has shape \(3, 128\)"):
        convert_adm_state_dict(unet_from_adm_flags(**{**flags, "num_classes": 10}), sd, attention_order="legacy")
    # an ADM network of another depth: whole blocks are missing
    with pytest.raises(ValueError, match=r"^state_dict: .*unexpected"):
        convert_adm_state_dict(unet_from_adm_flags(**{**flags, "num_res_blocks": 1}), sd, attention_order="legacy")
    net = unet_from_adm_flags(**flags)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="^state_dict:"):
        load_adm_state_dict(net, missing, attention_order="legacy")
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # nothing half-loaded
    bad = tmp_path / "truncated.pt"
    torch.save(sd, bad)
    bad.write_bytes(bad.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"^state_dict: cannot read .*truncated\.pt"):
        convert_adm_state_dict(net, bad, attention_order="legacy")
    with pytest.raises(ValueError, match=r"^state_dict: no such file .*absent\.pt"):
        convert_adm_state_dict(net, tmp_path / "absent.pt", attention_order="legacy")
    with pytest.raises(ValueError, match="^attention_order:"):
        convert_adm_state_dict(net, sd, attention_order="old")
    with pytest.raises(ValueError, match="^process:"):
        ADMModel(net, VE())


# --------------------------------------------------------------------------------------------------------------
# diffusers


def tiny_diffusers_unet(out_channels=3, classes=None, seed=0):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=out_channels,
                                 block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=16,
                                 num_class_embeds=classes).eval()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_diffusers_adapter_matches_diffusers_and_its_scheduler(prediction_type):
    diffusers = pytest.importorskip("diffusers")
    unet = tiny_diffusers_unet(classes=4)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2",
                                        prediction_type=prediction_type, clip_sample=False)
    model, process = from_diffusers(unet, scheduler)
    assert process.T == 100 and not model.learned_variance
    assert model.prediction == {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[prediction_type]
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 3, 16, 16, generator=gen)
    noise = torch.randn(3, 3, 16, 16, generator=gen)
    y = torch.tensor([0, 3, 1])
    for i in (0, 37, 99):
        index = torch.full((3,), i)
        x_t = scheduler.add_noise(x0, noise, index)
        t = (index + 1).float()  # the library's time of diffusers' step index i
        a = process.alpha(t)[:, None, None, None]
        s = process.sigma(t)[:, None, None, None]
        torch.testing.assert_close(a * x0 + s * noise, x_t, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            direct = unet(x_t, index, class_labels=y).sample
            ours = model(x_t, t, y=y)
            x0_ours = predict(model, x_t, t, process, kind="x0", cond={"y": y})
        torch.testing.assert_close(ours, direct, rtol=1e-6, atol=1e-6)
        assert not torch.equal(direct, unet(x_t, index, class_labels=(y + 1) % 4).sample)  # labels matter
        # the scheduler's own x0 estimate from the same network output
        x0_theirs = scheduler.step(direct, i, x_t).pred_original_sample
        torch.testing.assert_close(x0_ours, x0_theirs, rtol=1e-4, atol=1e-4)


def test_diffusers_adapter_learned_range_and_bad_input():
    diffusers = pytest.importorskip("diffusers")
    unet = tiny_diffusers_unet(out_channels=6)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=50, variance_type="learned_range")
    model, process = from_diffusers(unet, scheduler)
    assert model.learned_variance and model.prediction == "eps"
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([5.0, 50.0])
    with torch.no_grad():
        out = unet(x, t - 1).sample
        eps, v = predict_with_variance(model, x, t, process)
    torch.testing.assert_close(eps, out[:, :3], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v, out[:, 3:], rtol=1e-6, atol=1e-6)
    assert DiffusersModel(unet, process, prediction="v_prediction", learned_variance=False).prediction == "v"
    with pytest.raises(ValueError, match="^scheduler:"):
        from_diffusers(unet, diffusers.DDPMScheduler(variance_type="learned"))
    with pytest.raises(ValueError, match="^unet:"):
        DiffusersModel(nn.Conv2d(3, 3, 1), process, prediction="eps")
    with pytest.raises(ValueError, match="^prediction:"):
        DiffusersModel(unet, process, prediction="noise")
    with pytest.raises(ValueError, match="^process:"):
        DiffusersModel(unet, VE(), prediction="eps")


def test_adm_flags_build_adm_defaults_and_refuse_unknown_names():
    with torch.device("meta"):  # ADM's ImageNet-64 flags: 296M parameters, nothing allocated
        net = unet_from_adm_flags(image_size=64, num_channels=192, num_res_blocks=3,
                                  attention_resolutions="32,16,8", num_head_channels=64, learn_sigma=True,
                                  class_cond=True, resblock_updown=True, use_new_attention_order=True, dropout=0.1,
                                  diffusion_steps=1000, noise_schedule="cosine", use_fp16=True)
    assert sum(p.numel() for p in net.parameters()) == 295_904_454  # the library's unet_imagenet64 preset
    assert net.channel_mult == (1, 2, 3, 4) and net.num_classes == 1000 and net.attention_order == "new"
    assert net.attention_resolutions == (32, 16, 8) and net.out_channels == 6
    assert {m.num_heads * 64 == m.qkv.in_channels for m in net.modules() if isinstance(m, AttentionBlock)} == {True}
    assert unet_from_adm_flags(image_size=32, num_channels=32, num_res_blocks=1).channel_mult == (1, 2, 2, 2)
    with pytest.raises(ValueError, match="^num_channel:"):
        unet_from_adm_flags(image_size=32, num_channels=32, num_res_blocks=1, num_channel=64)
    with pytest.raises(ValueError, match="^channel_mult:"):
        unet_from_adm_flags(image_size=48, num_channels=32, num_res_blocks=1)
    with pytest.raises(ValueError, match="^num_heads_upsample:"):
        unet_from_adm_flags(image_size=32, num_channels=32, num_res_blocks=1, num_heads_upsample=2)

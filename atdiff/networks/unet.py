"""An ADM-style UNet (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs"; Nichol & Dhariwal 2021, IDDPM).

``net(x, t, y=None) -> (B, out_channels, H, W)`` for images ``x`` ``(B, in_channels, H, W)`` with
``H == W == image_size``, network times ``t`` ``(B,)`` (e.g. ``1..T`` for a discrete process) and optional
class labels ``y`` ``(B,)``.

Architecture, written from the papers' description:

* a sinusoidal timestep embedding of width ``model_channels`` through a 2-layer SiLU MLP to
  ``4 * model_channels``; a class-conditional model adds a learned label embedding to it;
* an encoder of ``len(channel_mult)`` levels, each ``num_res_blocks`` residual blocks (optionally followed by
  self-attention) and a 2x downsampling (strided conv, or a down-sampling residual block with
  ``resblock_updown``), a middle ResBlock-Attention-ResBlock, and a decoder mirroring the encoder with
  ``num_res_blocks + 1`` blocks per level, each fed the concatenation of the running features and one
  encoder skip;
* residual blocks ``GroupNorm -> SiLU -> conv -> [emb] -> GroupNorm -> SiLU -> dropout -> conv`` where the
  embedding enters as an additive bias or, with ``use_scale_shift_norm``, as ``norm(h) * (1 + scale) +
  shift``; multi-head QKV self-attention over the spatial positions, whose ``3C`` projection channels are
  read either as (q|k|v, head, channel) (``attention_order="new"``, guided-diffusion's "new attention order")
  or as (head, q|k|v, channel) (``"legacy"``, the layout of improved-diffusion and of guided-diffusion by
  default). The two orders compute the same family of functions: they differ by a fixed permutation of the
  projection's output channels (see :func:`qkv_permutation`);
* zero-initialised last layers (the output conv, the last conv of every residual block and the attention
  output projection), so a fresh network predicts exactly 0 and every block starts as the identity.

GroupNorm uses 32 groups, or the largest divisor of the channel count below 32 for narrow layers, and is
evaluated in float32 (as ADM does for fp16 training) so bf16 autocast stays accurate.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..validate import check_choice
from .embeddings import sinusoidal_embedding

__all__ = ["UNet", "unet_cifar10", "unet_cifar10_adm", "unet_imagenet64", "unet_small", "num_groups",
           "qkv_permutation", "ATTENTION_ORDERS"]

#: how the ``3C`` channels of the attention's qkv projection are laid out (see :func:`qkv_permutation`)
ATTENTION_ORDERS = ("new", "legacy")


def num_groups(channels: int, max_groups: int = 32) -> int:
    """The GroupNorm group count for ``channels``: ``max_groups`` if it divides, else the largest divisor
    of ``channels`` below it (so narrow test networks still normalise over groups of equal size)."""
    return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back to the input dtype. Shape preserving ``(B, C, ...)``."""

    def __init__(self, channels: int) -> None:
        super().__init__(num_groups(channels), channels)

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(),
                                self.eps).to(x.dtype)


def qkv_permutation(channels: int, num_heads: int, src: str, dst: str) -> Tensor:
    """Indices ``perm`` ``(3 * channels,)`` such that ``w_dst = w_src[perm]`` re-lays the output channels of a
    qkv projection from attention order ``src`` to ``dst`` (each ``"new"`` or ``"legacy"``).

    ``"new"`` orders the channels as (q|k|v, head, c) and ``"legacy"`` as (head, q|k|v, c), with
    ``c < channels // num_heads``; with one head the orders coincide and ``perm`` is the identity."""
    check_choice(src, ATTENTION_ORDERS, "src")
    check_choice(dst, ATTENTION_ORDERS, "dst")
    if num_heads < 1 or channels % num_heads:
        raise ValueError(f"num_heads: expected a divisor of the channel count {channels}, got {num_heads}")
    ch = channels // num_heads
    index = torch.arange(3 * channels)
    if src == dst:
        return index
    if dst == "new":  # position (s, h, c) of the new layout reads (h, s, c) of the legacy one
        return index.reshape(num_heads, 3, ch).transpose(0, 1).reshape(-1)
    return index.reshape(3, num_heads, ch).transpose(0, 1).reshape(-1)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Downsample(nn.Module):
    """Stride-2 3x3 convolution: ``(B, C, H, W) -> (B, out, H/2, W/2)``."""

    def __init__(self, channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling and a 3x3 convolution: ``(B, C, H, W) -> (B, out, 2H, 2W)``."""

    def __init__(self, channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ResBlock(nn.Module):
    """Residual block conditioned on an embedding: ``(x (B, C, H, W), emb (B, E)) -> (B, out, H', W')``.

    ``up``/``down`` resample both paths by 2 (nearest / average pooling) between the first norm and conv,
    as in ADM's ``resblock_updown``. The skip path is the identity, or a 1x1 conv when the width changes.
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float = 0.0, *,
                 use_scale_shift_norm: bool = True, up: bool = False, down: bool = False,
                 use_checkpoint: bool = False) -> None:
        super().__init__()
        if up and down:
            raise ValueError("up, down: a block resamples in at most one direction")
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.up, self.down = up, down
        self.norm1 = GroupNorm32(channels)
        self.conv1 = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.emb = nn.Linear(emb_channels, (2 if use_scale_shift_norm else 1) * out_channels)
        self.norm2 = GroupNorm32(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def _resample(self, x: Tensor) -> Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(self._resample(F.silu(self.norm1(x))))
        x = self._resample(x)
        e = self.emb(F.silu(emb)).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the ``H*W`` positions, with a residual connection.
    ``(B, C, H, W) -> (B, C, H, W)``; ``C`` must be divisible by ``num_heads``. ``order`` is the layout of the
    qkv projection's output channels: ``"new"`` (q|k|v, head, c) or ``"legacy"`` (head, q|k|v, c)."""

    def __init__(self, channels: int, num_heads: int = 1, *, order: str = "new",
                 use_checkpoint: bool = False) -> None:
        super().__init__()
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"num_heads: expected a divisor of the channel count {channels}, got {num_heads}")
        check_choice(order, ATTENTION_ORDERS, "order")
        self.num_heads = num_heads
        self.order = order
        self.use_checkpoint = use_checkpoint
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv1d(channels, channels, 1))

    def _forward(self, x: Tensor) -> Tensor:
        b, c, hh, ww = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, hh * ww))  # (B, 3C, T)
        heads, ch = self.num_heads, c // self.num_heads
        if self.order == "new":  # (B, 3, heads, C/heads, T) -> three (B, heads, T, C/heads)
            q, k, v = qkv.reshape(b, 3, heads, ch, hh * ww).transpose(-1, -2).unbind(1)
        else:  # (B, heads, 3, C/heads, T)
            q, k, v = qkv.reshape(b, heads, 3, ch, hh * ww).transpose(-1, -2).unbind(2)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, C/heads)
        a = a.transpose(-1, -2).reshape(b, c, hh * ww)
        return x + self.proj(a).reshape(b, c, hh, ww)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class _Block(nn.ModuleList):
    """A sequence of layers that all take ``(h, emb)``."""

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        for layer in self:
            h = layer(h, emb)
        return h


class UNet(nn.Module):
    """ADM UNet ``net(x, t, y=None) -> (B, out, H, W)``; see the module docstring for the architecture.

    The network declares what it predicts, as ADM does: ``prediction = "eps"`` and ``learned_variance`` equal
    to ``learn_sigma`` (the second half of the output channels is IDDPM's variance interpolation). Wrap it in
    ``atdiff``'s diffusion-model wrapper to declare another kind or to map process times to network times.

    Args:
        in_channels: channels of ``x``.
        model_channels: base width; level ``i`` has ``model_channels * channel_mult[i]`` channels and the
            time embedding has ``4 * model_channels``.
        out_channels: predicted channels; doubled when ``learn_sigma`` (the second half is the
            variance interpolation of IDDPM).
        num_res_blocks: residual blocks per encoder level (the decoder has one more per level).
        attention_resolutions: feature-map side lengths (in pixels, as ADM's ``--attention_resolutions
            32,16,8`` flag) at which self-attention follows each residual block, e.g. ``(16,)`` for
            16x16 on a 32x32 model. Each must be ``image_size / 2**level`` for some level; the middle block
            always has attention.
        dropout: dropout rate inside the residual blocks.
        channel_mult: width multipliers per level; ``image_size`` must be divisible by
            ``2 ** (len(channel_mult) - 1)``.
        num_heads: attention heads (used when ``num_head_channels`` is None).
        num_head_channels: channels per attention head; if given, the head count is
            ``channels // num_head_channels`` at each attention layer (ADM's choice for ImageNet-64).
        use_scale_shift_norm: condition the residual blocks through ``norm(h) * (1 + scale) + shift``
            (AdaGN) rather than an additive bias.
        resblock_updown: resample with residual blocks (ADM) instead of strided conv / upsample+conv.
        attention_order: ``"new"`` (q, k, v split before the heads; guided-diffusion's
            ``use_new_attention_order``) or ``"legacy"`` (heads split first; improved-diffusion).
        learn_sigma: double ``out_channels``.
        num_classes: number of classes for class conditioning (a learned label embedding added to the
            time embedding); None for an unconditional model.
        null_class: add one more label embedding row, the "no class" label ``num_classes`` (attribute
            ``null_label``), for classifier-free guidance (label dropout in training, the unconditional branch
            in sampling). Off by default, so presets keep their published parameter counts.
        image_size: the side length ``H == W`` of the inputs.
        use_checkpoint: gradient checkpointing of every residual and attention block (recompute in the
            backward pass; saves activation memory, same gradients).
    """

    #: what the network predicts (ADM's convention; read by ``atdiff.param.prediction_of``)
    prediction = "eps"

    def __init__(self, in_channels: int, model_channels: int, out_channels: int, num_res_blocks: int,
                 attention_resolutions: Iterable[int], dropout: float = 0.0,
                 channel_mult: Sequence[int] = (1, 2, 4, 8), num_heads: int = 1,
                 num_head_channels: int | None = None, use_scale_shift_norm: bool = True,
                 resblock_updown: bool = False, attention_order: str = "new", learn_sigma: bool = False,
                 num_classes: int | None = None, null_class: bool = False, image_size: int = 32,
                 use_checkpoint: bool = False) -> None:
        super().__init__()
        check_choice(attention_order, ATTENTION_ORDERS, "attention_order")
        for name, value in (("in_channels", in_channels), ("model_channels", model_channels),
                            ("out_channels", out_channels), ("num_res_blocks", num_res_blocks),
                            ("image_size", image_size)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        channel_mult = tuple(int(m) for m in channel_mult)
        if not channel_mult or min(channel_mult) < 1:
            raise ValueError(f"channel_mult: expected a non-empty sequence of positive ints, got {channel_mult}")
        levels = len(channel_mult)
        if image_size % 2 ** (levels - 1):
            raise ValueError(f"image_size: expected a multiple of 2**(len(channel_mult)-1) = {2 ** (levels - 1)}, "
                             f"got {image_size}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a rate in [0, 1), got {dropout}")
        if num_head_channels is None and num_heads < 1:
            raise ValueError(f"num_heads: expected >= 1, got {num_heads}")
        if num_head_channels is not None and num_head_channels < 1:
            raise ValueError(f"num_head_channels: expected >= 1 or None, got {num_head_channels}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes: expected >= 1 or None, got {num_classes}")
        if null_class and num_classes is None:
            raise ValueError("null_class: needs a class-conditional model (num_classes given)")
        resolutions = {image_size // 2**level for level in range(levels)}
        attention_resolutions = tuple(sorted({int(r) for r in attention_resolutions}, reverse=True))
        if not set(attention_resolutions) <= resolutions:
            raise ValueError(f"attention_resolutions: expected feature-map sizes among {sorted(resolutions)} "
                             f"(image_size={image_size}, {levels} levels), got {attention_resolutions}")

        self.in_channels, self.model_channels, self.image_size = in_channels, model_channels, image_size
        self.out_channels = out_channels * (2 if learn_sigma else 1)
        self.num_classes = num_classes
        self.null_label = num_classes if null_class else None
        self.learned_variance = bool(learn_sigma)
        self.attention_order = attention_order
        self.attention_resolutions = attention_resolutions
        self.channel_mult = channel_mult
        emb_ch = 4 * model_channels

        def heads(ch: int) -> int:
            if num_head_channels is None:
                return num_heads
            if ch % num_head_channels:
                raise ValueError(f"num_head_channels: {num_head_channels} does not divide the width {ch}")
            return ch // num_head_channels

        def res(ch_in: int, ch_out: int, **kw) -> ResBlock:
            return ResBlock(ch_in, emb_ch, ch_out, dropout, use_scale_shift_norm=use_scale_shift_norm,
                            use_checkpoint=use_checkpoint, **kw)

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, heads(ch), order=attention_order, use_checkpoint=use_checkpoint)

        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.label_embed = nn.Embedding(num_classes + int(null_class), emb_ch) if num_classes is not None else None

        ch = model_channels * channel_mult[0]
        self.input_conv = nn.Conv2d(in_channels, ch, 3, padding=1)
        skips = [ch]
        size = image_size
        self.down = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                block = _Block([res(ch, model_channels * mult)])
                ch = model_channels * mult
                if size in attention_resolutions:
                    block.append(attn(ch))
                self.down.append(block)
                skips.append(ch)
            if level != levels - 1:
                self.down.append(_Block([res(ch, ch, down=True) if resblock_updown else Downsample(ch, ch)]))
                skips.append(ch)
                size //= 2

        self.middle = _Block([res(ch, ch), attn(ch), res(ch, ch)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                block = _Block([res(ch + skips.pop(), model_channels * mult)])
                ch = model_channels * mult
                if size in attention_resolutions:
                    block.append(attn(ch))
                if level and i == num_res_blocks:
                    block.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch, ch))
                    size *= 2
                self.up.append(block)

        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), _zero(nn.Conv2d(ch, self.out_channels, 3, padding=1)))

    def _check(self, x: Tensor, t: Tensor, y: Tensor | None) -> None:
        want = (self.in_channels, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"x: expected shape (B, {want[0]}, {want[1]}, {want[2]}), got {tuple(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"t: expected shape ({x.shape[0]},) to match x, got {tuple(t.shape)}")
        if self.num_classes is None:
            if y is not None:
                raise ValueError("y: this UNet is unconditional (num_classes=None); got class labels")
        else:
            if y is None:
                raise ValueError(f"y: class labels (B,) are required (num_classes={self.num_classes})")
            if y.shape != (x.shape[0],) or y.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"y: expected int64/int32 labels of shape ({x.shape[0]},), "
                                 f"got {y.dtype} {tuple(y.shape)}")

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """``x`` ``(B, in_channels, image_size, image_size)``, ``t`` ``(B,)`` float network times, ``y``
        ``(B,)`` integer labels in ``[0, num_classes)`` iff class-conditional (``num_classes`` is the null
        label when ``null_class``).
        Returns ``(B, out_channels, image_size, image_size)`` (``out_channels`` doubled if ``learn_sigma``)."""
        self._check(x, t, y)
        emb = self.time_embed(sinusoidal_embedding(t, self.model_channels).to(x.dtype))
        if self.label_embed is not None:
            emb = emb + self.label_embed(y).to(emb.dtype)
        h = self.input_conv(x)
        skips = [h]
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
        h = self.middle(h, emb)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


def unet_cifar10(**overrides) -> UNet:
    """IDDPM's CIFAR-10 model (Nichol & Dhariwal 2021: ``--image_size 32 --num_channels 128
    --num_res_blocks 3 --learn_sigma True --dropout 0.3`` with the improved-diffusion defaults: 4 heads,
    attention at 16x16 and 8x8, mult (1, 2, 2, 2), scale-shift norm). About 52.5M parameters."""
    cfg = dict(in_channels=3, model_channels=128, out_channels=3, num_res_blocks=3,
               attention_resolutions=(16, 8), dropout=0.3, channel_mult=(1, 2, 2, 2), num_heads=4,
               use_scale_shift_norm=True, resblock_updown=False, learn_sigma=True, image_size=32)
    return UNet(**{**cfg, **overrides})


def unet_cifar10_adm(**overrides) -> UNet:
    """The CIFAR-10 network of Wang et al. 2025 (their experiments' ADM setting): the ADM UNet (Dhariwal & Nichol
    2021) with 128 channels, mult (1, 2, 2, 2), 3 residual blocks, attention at 16x16 and 8x8 with 32
    channels per head, BigGAN-style up/down-sampling residual blocks, the new attention order, scale-shift
    norm, dropout 0.3 and learned sigma. Unlike :func:`unet_cifar10` (IDDPM's model: 4 heads, convolutional
    resampling) its resampling blocks carry parameters: 57,094,662 in all."""
    cfg = dict(in_channels=3, model_channels=128, out_channels=3, num_res_blocks=3,
               attention_resolutions=(16, 8), dropout=0.3, channel_mult=(1, 2, 2, 2), num_head_channels=32,
               use_scale_shift_norm=True, resblock_updown=True, attention_order="new", learn_sigma=True,
               image_size=32)
    return UNet(**{**cfg, **overrides})


def unet_imagenet64(**overrides) -> UNet:
    """ADM's class-conditional ImageNet 64x64 model (Dhariwal & Nichol 2021: 192 channels, mult
    (1, 2, 3, 4), 3 residual blocks, attention at 32, 16, 8 with 64 channels per head, BigGAN-style
    up/down-sampling residual blocks, scale-shift norm, learned sigma, dropout 0.1, 1000 classes).
    About 296M parameters."""
    cfg = dict(in_channels=3, model_channels=192, out_channels=3, num_res_blocks=3,
               attention_resolutions=(32, 16, 8), dropout=0.1, channel_mult=(1, 2, 3, 4),
               num_head_channels=64, use_scale_shift_norm=True, resblock_updown=True, learn_sigma=True,
               num_classes=1000, image_size=64)
    return UNet(**{**cfg, **overrides})


def unet_small(in_channels: int = 3, image_size: int = 16, **overrides) -> UNet:
    """A CPU-sized UNet for tests and toy runs: 32 channels, mult (1, 2), one residual block per level,
    attention (2 heads) at the lowest resolution ``image_size // 2``."""
    cfg = dict(in_channels=in_channels, model_channels=32, out_channels=in_channels, num_res_blocks=1,
               attention_resolutions=(image_size // 2,), dropout=0.0, channel_mult=(1, 2), num_heads=2,
               image_size=image_size)
    return UNet(**{**cfg, **overrides})

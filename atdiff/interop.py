"""Interoperability with other diffusion code bases: openai's ADM checkpoints and diffusers' ``UNet2DModel``.

Wang et al. 2025 fine-tune released ADM checkpoints (Dhariwal & Nichol 2021; Nichol & Dhariwal 2021), so the
library must load them. Three conventions differ between those code bases and this library:

* **Parameter names.** ADM's UNet keeps its layers in ``input_blocks`` / ``middle_block`` / ``output_blocks``
  with residual blocks of ``in_layers`` / ``emb_layers`` / ``out_layers`` / ``skip_connection``; the library's
  :class:`~atdiff.networks.UNet` names them ``down`` / ``middle`` / ``up`` with ``norm1`` / ``conv1`` / ``emb`` /
  ``norm2`` / ``conv2`` / ``skip``. :func:`adm_key_map` derives the name of every parameter from the structure
  of the library's network, so any ADM configuration maps without a table of patterns.
* **Attention layout.** The qkv projection's ``3C`` output channels are laid out as (head, q|k|v, channel) by
  improved-diffusion and by guided-diffusion's default ``QKVAttentionLegacy``, and as (q|k|v, head, channel)
  with ``--use_new_attention_order True`` (ADM's ImageNet-64 model). A checkpoint does not record which: the
  caller says it (``attention_order``) and the rows are permuted to the layout of the target network.
* **Time.** ADM's and diffusers' networks see the step *index* ``i = 0..T-1`` of a ``T``-step process, whose
  noise level ``alpha_bar`` is the library's at ``t = i + 1`` (the library's discrete time 0 is the data). The
  wrappers :class:`ADMModel` and :class:`DiffusersModel` feed ``t - 1`` (times ``1000 / T`` with
  improved-diffusion's ``rescale_timesteps``), so library calls ``model(x_t, t, **cond)`` give the source
  network's outputs for the same noisy input.

Learned sigma needs no conversion: both ADM and the library put IDDPM's variance interpolation in the second
half of the output channels.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .networks.unet import ATTENTION_ORDERS, AttentionBlock, Downsample, ResBlock, UNet, Upsample, qkv_permutation
from .param import PREDICTIONS
from .processes import VPDiscrete
from .validate import check_choice

__all__ = ["adm_key_map", "unet_from_adm_flags", "convert_adm_state_dict", "load_adm_state_dict", "ADMModel",
           "DiffusersModel", "from_diffusers", "DIFFUSERS_PREDICTIONS"]

#: diffusers' ``prediction_type`` names and the library's prediction kinds
DIFFUSERS_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}

_RES_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "emb": "emb_layers.1", "norm2": "out_layers.0",
              "conv2": "out_layers.3", "skip": "skip_connection"}
_ATTN_NAMES = {"norm": "norm", "qkv": "qkv", "proj": "proj_out"}


def _layer_names(layer: nn.Module) -> dict[str, str]:
    """Library name -> ADM name of the direct children (with parameters) of one layer of a UNet block."""
    if isinstance(layer, ResBlock):
        return dict(_RES_NAMES)
    if isinstance(layer, AttentionBlock):
        return dict(_ATTN_NAMES)
    if isinstance(layer, Downsample):
        return {"conv": "op"}
    if isinstance(layer, Upsample):
        return {"conv": "conv"}
    raise TypeError(f"net: no ADM name for a layer of type {type(layer).__name__}")


def adm_key_map(net: UNet) -> dict[str, str]:
    """Map every state-dict key of the library's ``net`` to the key of the same tensor in an ADM
    (guided-diffusion / improved-diffusion) ``UNetModel`` of the same configuration. One entry per tensor."""
    if not isinstance(net, UNet):
        raise ValueError(f"net: expected an atdiff UNet, got {type(net).__name__}")
    prefixes = {"time_embed": "time_embed", "label_embed": "label_emb", "input_conv": "input_blocks.0.0",
                "out": "out"}
    for i, block in enumerate(net.down):
        for j, layer in enumerate(block):
            for ours, theirs in _layer_names(layer).items():
                prefixes[f"down.{i}.{j}.{ours}"] = f"input_blocks.{i + 1}.{j}.{theirs}"
    for j, layer in enumerate(net.middle):
        for ours, theirs in _layer_names(layer).items():
            prefixes[f"middle.{j}.{ours}"] = f"middle_block.{j}.{theirs}"
    for i, block in enumerate(net.up):
        for j, layer in enumerate(block):
            for ours, theirs in _layer_names(layer).items():
                prefixes[f"up.{i}.{j}.{ours}"] = f"output_blocks.{i}.{j}.{theirs}"
    mapping = {}
    for key in net.state_dict():
        # the longest module path that has an ADM name; the rest of the key (e.g. "0.weight") is shared
        parts = key.split(".")
        head = next((n for n in range(len(parts) - 1, 0, -1) if ".".join(parts[:n]) in prefixes), None)
        if head is None:
            raise ValueError(f"net: no ADM name for the parameter {key!r}")
        mapping[key] = ".".join([prefixes[".".join(parts[:head])], *parts[head:]])
    return mapping


def _parse_ints(value: str | tuple | list, name: str) -> tuple[int, ...]:
    if isinstance(value, str):
        parts = [p for p in value.split(",") if p.strip()]
        try:
            return tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f"{name}: expected comma-separated integers, got {value!r}") from None
    return tuple(int(v) for v in value)


#: the channel multipliers ADM picks from the image size when ``--channel_mult`` is empty (32: improved-diffusion)
_DEFAULT_MULT = {32: (1, 2, 2, 2), 64: (1, 2, 3, 4), 128: (1, 1, 2, 3, 4), 256: (1, 1, 2, 2, 4, 4)}


#: ADM flags that configure the diffusion or the training, not the network (accepted and ignored)
_DIFFUSION_FLAGS = {"diffusion_steps", "noise_schedule", "timestep_respacing", "use_kl", "predict_xstart",
                    "rescale_timesteps", "rescale_learned_sigmas", "sigma_small", "use_fp16", "lr", "weight_decay",
                    "lr_anneal_steps", "batch_size", "microbatch", "ema_rate", "log_interval", "save_interval",
                    "resume_checkpoint", "fp16_scale_growth", "schedule_sampler", "data_dir"}


def unet_from_adm_flags(*, image_size: int, num_channels: int, num_res_blocks: int,
                        attention_resolutions: str | tuple = "16,8", channel_mult: str | tuple = "",
                        num_heads: int = 4, num_head_channels: int = -1, num_heads_upsample: int = -1,
                        learn_sigma: bool = False, class_cond: bool = False, use_scale_shift_norm: bool = True,
                        resblock_updown: bool = False, use_new_attention_order: bool = False, dropout: float = 0.0,
                        num_classes: int = 1000, in_channels: int = 3, use_checkpoint: bool = False,
                        **ignored) -> UNet:
    """The library UNet for an ADM checkpoint trained with these command-line flags (guided-diffusion's
    ``model_and_diffusion_defaults`` names and defaults; ``attention_resolutions`` in pixels, ``channel_mult``
    empty for ADM's choice by image size). Diffusion-only flags (``diffusion_steps``, ``noise_schedule``,
    ``use_fp16``, training flags such as ``lr``) are accepted and ignored, so a whole flag dict can be passed;
    any other name raises ``ValueError`` (a typo must not silently build another network).

    The network gets ADM's attention layout (``"new"`` iff ``use_new_attention_order``), so a checkpoint loads
    without permutation: ``load_adm_state_dict(net, sd, attention_order=net.attention_order)``."""
    unknown = sorted(set(ignored) - _DIFFUSION_FLAGS)
    if unknown:
        raise ValueError(f"{unknown[0]}: not an ADM model or diffusion flag (unknown: {unknown})")
    mult = _parse_ints(channel_mult, "channel_mult")
    if not mult:
        if image_size not in _DEFAULT_MULT:
            raise ValueError(f"channel_mult: no default for image_size={image_size}; give it explicitly")
        mult = _DEFAULT_MULT[image_size]
    if num_heads_upsample not in (-1, num_heads):
        raise ValueError(f"num_heads_upsample: the library uses one head count throughout, got "
                         f"{num_heads_upsample} with num_heads={num_heads}")
    return UNet(in_channels=in_channels, model_channels=num_channels, out_channels=in_channels,
                num_res_blocks=num_res_blocks, attention_resolutions=_parse_ints(attention_resolutions,
                                                                                 "attention_resolutions"),
                dropout=dropout, channel_mult=mult, num_heads=num_heads,
                num_head_channels=None if num_head_channels == -1 else num_head_channels,
                use_scale_shift_norm=use_scale_shift_norm, resblock_updown=resblock_updown,
                attention_order="new" if use_new_attention_order else "legacy", learn_sigma=learn_sigma,
                num_classes=num_classes if class_cond else None, image_size=image_size,
                use_checkpoint=use_checkpoint)


def _read_state_dict(state_dict: Mapping[str, Tensor] | str | os.PathLike) -> Mapping[str, Tensor]:
    if isinstance(state_dict, (str, os.PathLike)):
        try:
            state_dict = torch.load(state_dict, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ValueError(f"state_dict: no such file {os.fspath(state_dict)!r}") from None
        except Exception as err:  # pickle / zip errors of a truncated or foreign file
            raise ValueError(f"state_dict: cannot read {os.fspath(state_dict)!r} as a torch state dict "
                             f"({type(err).__name__}: {err})") from None
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, Tensor) for v in state_dict.values()):
        raise ValueError("state_dict: expected a mapping of parameter names to tensors (an ADM UNet's "
                         "state_dict, e.g. the .pt file of a released checkpoint)")
    return state_dict


def convert_adm_state_dict(net: UNet, state_dict: Mapping[str, Tensor] | str | os.PathLike, *,
                           attention_order: str) -> dict[str, Tensor]:
    """Convert an ADM UNet state dict (mapping or ``.pt`` path) into ``net``'s state dict.

    ``attention_order`` is the layout the checkpoint was trained with: ``"legacy"`` for improved-diffusion and
    for guided-diffusion without ``--use_new_attention_order`` (its default), ``"new"`` with it. The qkv rows
    are permuted to ``net.attention_order``.

    Raises ``ValueError`` starting with ``state_dict:`` and naming the keys for a checkpoint of another
    architecture: keys the network needs but the checkpoint lacks, keys the network has no place for, or a
    tensor of the wrong shape. Nothing is loaded; see :func:`load_adm_state_dict`."""
    check_choice(attention_order, ATTENTION_ORDERS, "attention_order")
    source = _read_state_dict(state_dict)
    mapping = adm_key_map(net)
    target = net.state_dict()
    missing = sorted(theirs for theirs in mapping.values() if theirs not in source)
    unexpected = sorted(set(source) - set(mapping.values()))
    if missing or unexpected:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
        parts = ([f"missing {len(missing)} key(s): {show(missing)}"] if missing else []) + \
                ([f"unexpected {len(unexpected)} key(s): {show(unexpected)}"] if unexpected else [])
        raise ValueError(f"state_dict: not a checkpoint of this UNet's architecture; {'; '.join(parts)}")
    heads = {f"{name}.qkv": m.num_heads for name, m in net.named_modules() if isinstance(m, AttentionBlock)}
    out = {}
    for ours, theirs in mapping.items():
        tensor = source[theirs]
        if tensor.shape != target[ours].shape:
            raise ValueError(f"state_dict: {theirs!r} has shape {tuple(tensor.shape)}, this UNet needs "
                             f"{tuple(target[ours].shape)} (for {ours!r}): a checkpoint of another architecture")
        module = ours.rpartition(".")[0]
        if module in heads:
            channels = tensor.shape[0] // 3
            tensor = tensor[qkv_permutation(channels, heads[module], attention_order, net.attention_order)]
        out[ours] = tensor
    return out


def load_adm_state_dict(net: UNet, state_dict: Mapping[str, Tensor] | str | os.PathLike, *,
                        attention_order: str) -> UNet:
    """Load an ADM checkpoint (mapping or ``.pt`` path) into ``net`` in place and return ``net``; see
    :func:`convert_adm_state_dict` for ``attention_order`` and the errors (raised before anything is loaded)."""
    net.load_state_dict(convert_adm_state_dict(net, state_dict, attention_order=attention_order))
    return net


def _index_time(t: Tensor, x: Tensor) -> Tensor:
    """Broadcast the library time ``t`` (``()`` or ``(B,)``) to ``(B,)`` and return the step index ``t - 1``."""
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t: expected shape () or ({x.shape[0]},), got {tuple(t.shape)}")
    return t.to(torch.promote_types(x.dtype, torch.float32)) - 1


def _check_discrete(process: VPDiscrete) -> None:
    if not isinstance(process, VPDiscrete):
        raise ValueError(f"process: ADM and diffusers networks are indexed by the steps of a discrete VP "
                         f"process (VPDiscrete); got {process!r}")


class ADMModel(nn.Module):
    """An ADM network (``net(x, timesteps, y=None)``, e.g. a UNet loaded by :func:`load_adm_state_dict`) as a
    library model ``model(x, t, **cond)`` for a :class:`~atdiff.processes.VPDiscrete` ``process`` of the
    checkpoint's ``T`` steps.

    The network sees the step index ``t - 1`` (``(t - 1) * 1000 / T`` with ``rescale_timesteps``, an
    improved-diffusion option that is on in its scripts and off in guided-diffusion's). ``x`` ``(B, C, H, W)``,
    ``t`` ``()`` or ``(B,)`` in ``[1, T]``; returns the network's output ``(B, C', H, W)``. Declares
    ``prediction`` (``"eps"``, or ``"x0"`` for a ``--predict_xstart`` checkpoint) and ``learned_variance``
    (the network's ``learned_variance``, i.e. ``--learn_sigma``)."""

    def __init__(self, net: nn.Module, process: VPDiscrete, *, prediction: str = "eps",
                 rescale_timesteps: bool = False) -> None:
        super().__init__()
        _check_discrete(process)
        check_choice(prediction, PREDICTIONS, "prediction")
        self.net = net
        self.process = process
        self.prediction = prediction
        self.learned_variance = bool(getattr(net, "learned_variance", False))
        self.time_scale = 1000.0 / process.T if rescale_timesteps else 1.0

    def forward(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        return self.net(x, _index_time(t, x) * self.time_scale, **cond)


class DiffusersModel(nn.Module):
    """A diffusers ``UNet2DModel`` as a library model ``model(x, t, y=None)`` for the
    :class:`~atdiff.processes.VPDiscrete` ``process`` it was trained on (its scheduler's betas; see
    :func:`from_diffusers`).

    The network sees the scheduler's step index ``t - 1``; the label ``y`` ``(B,)`` goes to diffusers'
    ``class_labels``. ``prediction`` is the library kind (``"eps"``, ``"x0"``, ``"v"``) or diffusers'
    ``prediction_type`` name (``"epsilon"``, ``"sample"``, ``"v_prediction"``). ``learned_variance`` defaults
    to whether the network outputs twice its input channels (diffusers' ``"learned_range"`` variance).
    ``x`` ``(B, C, H, W)``, ``t`` ``()`` or ``(B,)`` in ``[1, T]``; returns ``(B, C', H, W)``."""

    def __init__(self, unet: nn.Module, process: VPDiscrete, *, prediction: str,
                 learned_variance: bool | None = None) -> None:
        super().__init__()
        _check_discrete(process)
        prediction = DIFFUSERS_PREDICTIONS.get(prediction, prediction)
        check_choice(prediction, PREDICTIONS, "prediction")
        config = getattr(unet, "config", None)
        if config is None or not hasattr(config, "in_channels"):
            raise ValueError(f"unet: expected a diffusers UNet2DModel (with a .config), got {type(unet).__name__}")
        if getattr(config, "time_embedding_type", "positional") == "fourier":
            raise ValueError("unet: a Fourier-time (score SDE) UNet2DModel is conditioned on sigma, not on a "
                             "discrete step index")
        self.unet = unet
        self.process = process
        self.prediction = prediction
        self.learned_variance = (config.out_channels == 2 * config.in_channels if learned_variance is None
                                 else bool(learned_variance))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.unet(x, _index_time(t, x), class_labels=y, return_dict=False)[0]


def from_diffusers(unet: nn.Module, scheduler) -> tuple[DiffusersModel, VPDiscrete]:
    """The library model and process of a diffusers ``UNet2DModel`` and its DDPM-family ``scheduler``
    (``DDPMScheduler``, ``DDIMScheduler``, ...): the process has the scheduler's betas (in float64) and the
    model declares the scheduler's ``prediction_type`` and, for ``variance_type`` ``"learned_range"``, a
    learned variance."""
    betas = getattr(scheduler, "betas", None)
    config = getattr(scheduler, "config", None)
    if betas is None or config is None:
        raise ValueError(f"scheduler: expected a diffusers DDPM-family scheduler (with betas and a config), got "
                         f"{type(scheduler).__name__}")
    if config.prediction_type not in DIFFUSERS_PREDICTIONS:
        raise ValueError(f"scheduler: prediction_type {config.prediction_type!r} is not one of "
                         f"{tuple(DIFFUSERS_PREDICTIONS)}")
    variance = getattr(config, "variance_type", None)
    if variance == "learned":
        raise ValueError("scheduler: variance_type 'learned' (a direct log variance) is not IDDPM's "
                         "interpolation; only 'learned_range' is supported")
    process = VPDiscrete(betas=torch.as_tensor(betas, dtype=torch.float64))
    learned = variance == "learned_range"
    return DiffusersModel(unet, process, prediction=config.prediction_type, learned_variance=learned), process

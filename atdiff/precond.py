"""Preconditioning: wrappers that turn a bare network ``net(x, time, **cond)`` into a model with declared metadata.

* :class:`DiffusionModel` -- the network's output *is* the prediction (eps, x0 or v); the network sees the time
  through :func:`network_time` (the ADM convention for discrete VP processes).
* :class:`EDMPrecond` -- Karras et al. (2022): ``D(y; s) = c_skip(s) y + c_out(s) F(c_in(s) y, c_noise(s))`` in
  the EDM coordinates ``y = x / alpha(t)``, ``s = sigma(t) / alpha(t)``, so inputs and targets of ``F`` have unit
  variance at every noise level; predicts ``x0``.
* :class:`ConsistencyModel` -- Song et al. (2023): the same form with the boundary scalings of
  :func:`consistency_scalings`, so ``f(x, sigma_min) = x`` exactly, whatever the network returns.
* :class:`VEFromVP` -- a model trained on a VP process seen on the VE / EDM path (a diffusion teacher for
  consistency distillation): the exact change of variables ``x_VP = x_VE / sqrt(1 + sigma^2)``.
* :class:`ClassifierFreeGuidance` -- ``scale * model(x | cond) + (1 - scale) * model(x | uncond)``.
* :func:`declare` -- attach ``prediction`` / ``learned_variance`` to a plain callable.

The scalings are pure functions (:func:`edm_scalings`, :func:`consistency_scalings`); the classes only apply them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .param import PREDICTIONS, learned_variance_of, predict, prediction_of, split_learned_variance
from .processes import VE, Process, VPContinuous, VPDiscrete, expand_like
from .validate import check_choice, check_real

__all__ = ["network_time", "DiffusionModel", "edm_scalings", "EDMPrecond", "consistency_scalings",
           "ConsistencyModel", "VEFromVP", "ve_from_vp_coordinates", "ClassifierFreeGuidance", "declare", "Declared"]


def network_time(process: Process, t: Tensor) -> Tensor:
    """The time value this library's networks are conditioned on, of order 1..1000 for sinusoidal embeddings.

    ``VPDiscrete``: ``t`` itself (``1..T``); ``VPContinuous``: ``1000 t``; ``VE``: ``250 log t``, i.e. 1000 times
    EDM's ``c_noise = log(sigma) / 4``. Shape of ``t``; float32 or wider. Networks trained elsewhere have their own
    convention: ADM / guided-diffusion and diffusers networks see the step index ``t - 1`` (use
    :class:`atdiff.interop.ADMModel` or :func:`atdiff.interop.from_diffusers`, not :class:`DiffusionModel`).
    """
    t = t if t.is_floating_point() else t.to(torch.get_default_dtype())
    if isinstance(process, VE):
        return 250.0 * t.clamp_min(1e-20).log()
    if isinstance(process, VPContinuous):
        return 1000.0 * t
    if isinstance(process, VPDiscrete):
        return t
    raise ValueError(f"process: no network-time convention for {type(process).__name__}")


def _batch_time(t: Tensor, x: Tensor) -> Tensor:
    """``t`` as shape ``(B,)`` for a batch ``x`` ``(B, ...)``."""
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t: expected shape ({x.shape[0]},) to match x, got {tuple(t.shape)}")
    return t


class DiffusionModel(nn.Module):
    """Wrap a network ``net(x, time, **cond)`` into a model of declared ``prediction`` kind.

    The network sees ``network_time(process, t)`` (e.g. ``1000 t`` for a continuous VP process), so the same
    network class serves every process. ``learned_variance`` declares a network returning ``2 C`` channels
    (prediction, variance interpolation); ``None`` takes the network's own declaration (a UNet with
    ``learn_sigma=True`` declares it), else False. ``forward`` returns the raw network output.
    """

    def __init__(self, net: nn.Module, process: Process, prediction: str = "eps", *,
                 learned_variance: bool | None = None) -> None:
        super().__init__()
        check_choice(prediction, PREDICTIONS, "prediction")
        self.net, self.process, self.prediction = net, process, prediction
        if learned_variance is None:
            learned_variance = bool(getattr(net, "learned_variance", False))
        self.learned_variance = bool(learned_variance)

    def forward(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        t = _batch_time(t, x)
        time = network_time(self.process, t).to(torch.promote_types(x.dtype, torch.float32))
        return self.net(x, time, **cond)


def edm_scalings(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EDM's preconditioning (Karras et al. 2022, Table 1): ``c_skip = sd^2 / (s^2 + sd^2)``,
    ``c_out = s sd / sqrt(s^2 + sd^2)``, ``c_in = 1 / sqrt(s^2 + sd^2)``, ``c_noise = log(s) / 4``.
    Elementwise in ``sigma`` (any shape, ``sigma > 0``)."""
    sd2 = sigma_data**2
    norm = (sigma**2 + sd2).sqrt()
    return sd2 / (sigma**2 + sd2), sigma * sigma_data / norm, 1.0 / norm, sigma.log() / 4


def consistency_scalings(sigma: Tensor, sigma_data: float, sigma_min: float) -> tuple[Tensor, Tensor, Tensor]:
    """The consistency-model boundary scalings (Song et al. 2023, Appendix C):
    ``c_skip = sd^2 / ((s - s_min)^2 + sd^2)``, ``c_out = sd (s - s_min) / sqrt(s^2 + sd^2)``,
    ``c_in = 1 / sqrt(s^2 + sd^2)``. At ``s = s_min``: ``c_skip = 1`` and ``c_out = 0`` exactly. Elementwise."""
    sd2 = sigma_data**2
    gap = sigma - sigma_min
    norm = (sigma**2 + sd2).sqrt()
    return sd2 / (gap**2 + sd2), sigma_data * gap / norm, 1.0 / norm


class EDMPrecond(nn.Module):
    """EDM's preconditioned denoiser for any process; predicts ``x0``.

    With ``a = alpha(t)``, ``s = sigma(t) / alpha(t)`` and ``y = x / a``: ``D = c_skip(s) y + c_out(s)
    F(c_in(s) y, c_noise_scale * c_noise(s), **cond)`` (:func:`edm_scalings`). ``c_noise_scale = 1000`` feeds the
    library's sinusoidal embeddings (built for times of order 1..1000) the range they resolve; 1 is EDM's own value.
    Scalings are computed in float64 and cast to ``x``'s dtype.
    """

    prediction = "x0"
    learned_variance = False

    def __init__(self, net: nn.Module, process: Process, sigma_data: float = 0.5, *,
                 c_noise_scale: float = 1000.0) -> None:
        super().__init__()
        self.net, self.process = net, process
        self.sigma_data = check_real(sigma_data, "sigma_data", 0.0, open_min=True)
        self.c_noise_scale = check_real(c_noise_scale, "c_noise_scale", 0.0, open_min=True)

    def forward(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        t = _batch_time(t, x)
        t64 = t.double()
        a = self.process.alpha(t64)
        s = (self.process.sigma(t64) / a).clamp_min(1e-20)
        c_skip, c_out, c_in, c_noise = edm_scalings(s, self.sigma_data)
        y = x / expand_like(a, x)
        f = self.net(expand_like(c_in, x) * y, (self.c_noise_scale * c_noise).to(torch.promote_types(
            x.dtype, torch.float32)), **cond)
        return expand_like(c_skip, x) * y + expand_like(c_out, x) * f


class ConsistencyModel(nn.Module):
    """The consistency function ``f(x, sigma) = c_skip x + c_out F(c_in x, c_noise_scale log(sigma) / 4)`` on the
    VE / EDM path ``x = x0 + sigma z`` (:func:`consistency_scalings`); predicts ``x0``.

    ``f(x, sigma_min) = x`` exactly for any finite network output (``c_skip = 1``, ``c_out = 0`` in floating
    point). The time argument is ``sigma`` itself (the :class:`~atdiff.processes.VE` convention ``t = sigma``).
    """

    prediction = "x0"
    learned_variance = False

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002, *,
                 c_noise_scale: float = 1000.0) -> None:
        super().__init__()
        self.net = net
        self.sigma_data = check_real(sigma_data, "sigma_data", 0.0, open_min=True)
        self.sigma_min = check_real(sigma_min, "sigma_min", 0.0, open_min=True)
        self.c_noise_scale = check_real(c_noise_scale, "c_noise_scale", 0.0, open_min=True)

    def forward(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        t = _batch_time(t, x)
        # sigma_min as the caller's dtype rounds it (float32 0.002 is not the double 0.002) is sigma_min exactly
        at_min = t == torch.tensor(self.sigma_min, dtype=t.dtype, device=t.device)
        sigma = torch.where(at_min, self.sigma_min, t.double())
        c_skip, c_out, c_in = consistency_scalings(sigma, self.sigma_data, self.sigma_min)
        c_noise = self.c_noise_scale * sigma.clamp_min(1e-20).log() / 4
        f = self.net(expand_like(c_in, x) * x, c_noise.to(torch.promote_types(x.dtype, torch.float32)), **cond)
        return expand_like(c_skip, x) * x + expand_like(c_out, x) * f


def ve_from_vp_coordinates(sigma: Tensor, process: Process) -> tuple[Tensor, Tensor]:
    """For VE levels ``sigma`` ``(B,)``: the VP time ``t`` with ``sigma_VP(t) / alpha(t) = sigma`` (log-SNR
    ``-2 log sigma``, clamped to the process's time range) and the input scale ``alpha = 1 / sqrt(1 + sigma^2)``
    that maps ``x_VE = x0 + sigma z`` to ``x_VP = alpha x0 + sqrt(1 - alpha^2) z``. Both float64 ``(B,)``."""
    s64 = sigma.double().clamp_min(1e-20)
    return process.t_from_log_snr(-2.0 * s64.log()), (1.0 + s64**2).rsqrt()


class VEFromVP(nn.Module):
    """A model of a variance-preserving process used on the VE / EDM path ``x = x0 + sigma z`` (time = sigma);
    predicts ``eps``.

    ``x_VE = x_VP / sqrt(abar)`` and ``sigma = sqrt((1 - abar) / abar)`` describe the same noisy sample with the same
    noise ``z``, so ``eps_VE(x, sigma) = eps_VP(x / sqrt(1 + sigma^2), t(sigma))`` (:func:`ve_from_vp_coordinates`)
    exactly; the wrapped model's own prediction kind is converted on its process (a learned variance is dropped).
    Levels outside the VP process's range are evaluated at its end times (a cosine schedule with ``T = 1000``
    covers about ``sigma in [0.0064, 2e4]``; below its first step a discrete model is queried between ``t = 0`` and
    ``1``, where it was never trained)."""

    prediction = "eps"
    learned_variance = False

    def __init__(self, model: Callable, process: Process) -> None:
        super().__init__()
        if isinstance(process, VE) or not process.variance_preserving:
            raise ValueError(f"process: expected a variance-preserving process, got {process!r}")
        prediction_of(model)
        self.model, self.process = model, process

    def forward(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        t = _batch_time(t, x)
        vp_t, alpha = ve_from_vp_coordinates(t, self.process)
        return predict(self.model, expand_like(alpha, x).to(x.dtype) * x, vp_t, self.process, "eps", cond).to(x.dtype)


def _batched(cond: Mapping[str, Any], uncond: Mapping[str, Any], batch: int) -> dict[str, Any]:
    """``cond`` and ``uncond`` stacked along the batch: tensors with a leading batch dimension are concatenated,
    anything else must be equal in both (it is shared by the two halves)."""
    out = {}
    for key in set(cond) | set(uncond):
        if key not in cond or key not in uncond:
            raise ValueError(f"uncond: key {key!r} must be given in both cond and uncond (or in neither)")
        a, b = cond[key], uncond[key]
        if isinstance(a, Tensor) and a.ndim >= 1 and a.shape[0] == batch:
            b = b if isinstance(b, Tensor) else torch.as_tensor(b, device=a.device, dtype=a.dtype)
            out[key] = torch.cat([a, b.to(device=a.device, dtype=a.dtype).expand_as(a)])
        elif a is b or (not isinstance(a, Tensor) and a == b):
            out[key] = a
        else:
            raise ValueError(f"uncond: {key!r} is not a per-sample tensor of batch {batch}; cannot guide on it")
    return out


class ClassifierFreeGuidance(nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022): ``scale * m(x | cond) + (1 - scale) * m(x | uncond)`` in the
    model's own parametrisation, from one batched forward of ``2 B`` inputs.

    ``uncond`` gives the replacement for every guided key of the conditioning dict, e.g. ``{"y": null_label}``
    (a scalar or a ``(B,)`` tensor). ``scale = 1`` returns the conditional output and ``scale = 0`` the
    unconditional one, both exactly. With a learned variance, the variance channels are the conditional model's.
    Every conversion between parametrisations is affine in the prediction with weights summing to one, so guiding
    eps, x0 or v gives the same sampler input.
    """

    def __init__(self, model: Callable, scale: float, uncond: Mapping[str, Any]) -> None:
        super().__init__()
        self.model, self.scale, self.uncond = model, check_real(scale, "scale"), dict(uncond)
        if not self.uncond:
            raise ValueError("uncond: expected at least one conditioning key to replace (e.g. {'y': null_label})")
        self.prediction = prediction_of(model)
        self.learned_variance = learned_variance_of(model)

    def forward(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        missing = set(self.uncond) - set(cond)
        if missing:
            raise ValueError(f"cond: guidance needs the conditioning keys {sorted(missing)}")
        b = x.shape[0]
        t = _batch_time(t, x)
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), **_batched(cond, self.uncond, b))
        c, u = out[:b], out[b:]
        var = None
        if self.learned_variance:
            (c, var), (u, _) = split_learned_variance(c), split_learned_variance(u)
        guided = self.scale * c + (1.0 - self.scale) * u
        return guided if var is None else torch.cat([guided, var], dim=1)


class Declared:
    """A plain callable with declared metadata (see :func:`declare`)."""

    def __init__(self, fn: Callable, prediction: str, learned_variance: bool) -> None:
        check_choice(prediction, PREDICTIONS, "prediction")
        self.fn, self.prediction, self.learned_variance = fn, prediction, bool(learned_variance)

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        return self.fn(x, t, **cond)

    def __repr__(self) -> str:
        return f"declare({self.fn!r}, prediction={self.prediction!r}, learned_variance={self.learned_variance})"


def declare(fn: Callable, prediction: str, learned_variance: bool = False) -> Declared:
    """``fn(x, t, **cond)`` as a model that declares it predicts ``prediction`` (one of ``eps``, ``x0``, ``v``,
    ``score``) and whether it returns a learned variance."""
    return Declared(fn, prediction, learned_variance)


"""Denoising losses.

The building block is the pure function :func:`denoising_loss`: the per-sample regression loss of a model
at the (possibly perturbed) input ``x_t + delta``, against the target of the chosen parametrisation.
:class:`DenoisingLoss` adds the sampling of ``t`` and ``eps`` and the hook where a perturber (adversarial or
random, see :mod:`atdiff.perturb`) chooses ``delta``; every training variant goes through the same function.

Target modes for a perturbed input ``x~ = x_t + delta`` (method.md section 3):

* ``invariant``: the target of the clean pair ``(x0, eps)``;
* ``equivariant``: the target of ``(x0, eps + delta / sigma_t)``, the noise that explains ``x~`` with ``x0``
  fixed (for an eps-model: ``eps + delta / sqrt(1 - abar_t)``); gradient flows through ``delta``;
* ``equivariant-detached``: the same target with ``delta`` detached (the reference recipe).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .param import PREDICTIONS, predict
from .processes import Process, VPDiscrete, expand_like

__all__ = ["TARGET_MODES", "denoising_target", "denoising_loss", "sample_times", "DenoisingLoss"]

TARGET_MODES = ("invariant", "equivariant", "equivariant-detached")


def denoising_target(x0: Tensor, eps: Tensor, t: Tensor, process: Process, kind: str) -> Tensor:
    """The regression target of kind ``eps``, ``x0``, ``v`` or ``score`` for the pair ``(x0, eps)`` at ``t``."""
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    a, s = expand_like(process.alpha(t), x0), expand_like(process.sigma(t), x0)
    if kind == "v":
        return a * eps - s * x0
    if kind == "score":
        return -eps / s
    raise ValueError(f"kind: expected one of {PREDICTIONS}, got {kind!r}")


def denoising_loss(model: Callable, x0: Tensor, t: Tensor, eps: Tensor, process: Process, *,
                   target: str = "eps", delta: Tensor | None = None, target_mode: str = "invariant",
                   weight: Tensor | None = None) -> Tensor:
    """Per-sample loss ``w(t) * mean ||pred(x_t + delta, t) - target||^2``.

    Shapes: ``x0``, ``eps``, ``delta`` ``(B, ...)``; ``t`` ``(B,)``; ``weight`` ``(B,)`` or None.
    Returns ``(B,)``. The model's own prediction kind is converted to ``target`` through
    :func:`atdiff.param.predict`.
    """
    if target_mode not in TARGET_MODES:
        raise ValueError(f"target_mode: expected one of {TARGET_MODES}, got {target_mode!r}")
    if t.shape != (x0.shape[0],):
        raise ValueError(f"t: expected shape ({x0.shape[0]},) to match x0, got {tuple(t.shape)}")
    x_t = process.add_noise(x0, eps, t)
    eps_target = eps
    if delta is not None:
        if delta.shape != x0.shape:
            raise ValueError(f"delta: expected the shape of x0 {tuple(x0.shape)}, got {tuple(delta.shape)}")
        x_t = x_t + delta
        if target_mode != "invariant":
            d = delta.detach() if target_mode == "equivariant-detached" else delta
            eps_target = eps + d / expand_like(process.sigma(t), x0)
    pred = predict(model, x_t, t, process, target)
    err = (pred - denoising_target(x0, eps_target, t, process, target)) ** 2
    loss = err.flatten(1).mean(1)
    return loss if weight is None else loss * weight


def sample_times(process: Process, n: int, *, device: torch.device | str | None = None,
                 generator: torch.Generator | None = None, t_min: float | None = None) -> Tensor:
    """Training times, uniform over the process: integers ``1..T`` for :class:`VPDiscrete`, else uniform on
    ``[t_min, t_max]`` (``t_min`` defaults to ``1e-3 * t_max`` for continuous processes). Shape ``(n,)``."""
    if isinstance(process, VPDiscrete):
        return torch.randint(1, process.T + 1, (n,), device=device, generator=generator).to(torch.float32)
    lo = 1e-3 * process.t_max if t_min is None else float(t_min)
    u = torch.rand(n, device=device, generator=generator)
    return lo + (process.t_max - lo) * u


@dataclass(frozen=True)
class DenoisingLoss:
    """The denoising loss with its sampling of ``t`` and ``eps``: ``loss(model, x0) -> (B,)``.

    ``weighting(t) -> (B,)`` multiplies the per-sample loss (None: uniform). A ``perturber`` passed at call
    time picks ``delta`` (it gets a closure ``delta -> per-sample loss``) and fixes the target mode.
    """

    process: Process
    target: str = "eps"
    weighting: Callable[[Tensor], Tensor] | None = None

    def __post_init__(self) -> None:
        if self.target not in PREDICTIONS:
            raise ValueError(f"target: expected one of {PREDICTIONS}, got {self.target!r}")

    def draw(self, x0: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw training times ``(B,)`` and noise ``(B, ...)`` for a batch ``x0``."""
        t = sample_times(self.process, x0.shape[0], device=x0.device, generator=generator)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return t.to(x0.dtype), eps

    def at(self, model: Callable, x0: Tensor, t: Tensor, eps: Tensor, delta: Tensor | None = None,
           target_mode: str = "invariant") -> Tensor:
        """The per-sample loss at fixed ``t``, ``eps`` and perturbation ``delta``. Shape ``(B,)``."""
        weight = None if self.weighting is None else self.weighting(t)
        return denoising_loss(model, x0, t, eps, self.process, target=self.target, delta=delta,
                              target_mode=target_mode, weight=weight)

    def __call__(self, model: Callable, x0: Tensor, *, t: Tensor | None = None, eps: Tensor | None = None,
                 perturber=None, generator: torch.Generator | None = None) -> Tensor:
        if t is None or eps is None:
            t_draw, eps_draw = self.draw(x0, generator)
            t = t_draw if t is None else t
            eps = eps_draw if eps is None else eps
        if perturber is None:
            return self.at(model, x0, t, eps)
        mode = perturber.target_mode
        delta = perturber(lambda d: self.at(model, x0, t, eps, d, mode), x0, t, self.process,
                          generator=generator)
        return self.at(model, x0, t, eps, delta, mode)

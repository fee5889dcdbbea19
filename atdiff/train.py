"""Training parts a user calls from their own loop: one optimizer step, free-AT replay, EMA.

Checkpoints and seeding live in :mod:`atdiff.checkpoint`."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .processes import check_finite

__all__ = ["EMA", "train_step", "free_at_step", "clip_gradients"]


class EMA:
    """Exponential moving average of a model's parameters and buffers: ``p_ema <- decay p_ema + (1-decay) p``.

    ``ema.model`` is a frozen copy to sample from; ``update(model)`` after each optimizer step.
    ``warmup=True`` uses ``min(decay, (1 + n) / (10 + n))`` for the n-th update (early averages forget the
    random init faster).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = False) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay: expected a value in [0, 1], got {decay}")
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        for p_ema, p in zip(self.model.parameters(), model.parameters(), strict=True):
            p_ema.lerp_(p.detach(), 1 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "decay": self.decay, "warmup": self.warmup,
                "num_updates": self.num_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.decay, self.warmup = float(state["decay"]), bool(state["warmup"])
        self.num_updates = int(state["num_updates"])


def train_step(model: nn.Module, x0: Tensor, loss: Callable[..., Tensor], optimizer: torch.optim.Optimizer,
               *, ema: EMA | None = None, grad_clip: float | None = None, perturber=None,
               generator: torch.Generator | None = None, scaler=None,
               autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """One parameter update: ``loss(model, x0, perturber=..., generator=...).mean()``, backward, optional
    gradient-norm clipping, optimizer step, EMA update. Returns ``{"loss", "grad_norm"}``.

    With an ascent perturber (``fgsm`` / ``pgd``, :mod:`atdiff.perturb`) this is PGD-K adversarial training:
    the attack's ``K`` backward passes go to ``delta`` only, then one backward gives the parameter gradient.
    ``scaler`` (a ``torch.amp.GradScaler`` or an object with ``scale``/``unscale_``/``step``/``update``) and
    ``autocast_dtype`` (e.g. ``torch.bfloat16``, autocast on ``x0``'s device type) enable mixed precision.
    """
    _check_grad_clip(grad_clip)
    check_finite(x0, "x0")
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with _autocast(x0, autocast_dtype):
        value = loss(model, x0, perturber=perturber, generator=generator).mean()
    _backward(value, scaler)
    grad_norm = _clip_and_step(model, optimizer, grad_clip, scaler, ema, need_norm=True)
    return {"loss": value.item(), "grad_norm": grad_norm}


def free_at_step(model: nn.Module, x0: Tensor, loss: Any, optimizer: torch.optim.Optimizer, *, replay: int,
                 perturber=None, ema: EMA | None = None, grad_clip: float | None = None,
                 carry_delta: Tensor | None = None, scaler=None, autocast_dtype: torch.dtype | None = None,
                 generator: torch.Generator | None = None) -> dict[str, Any]:
    """Free adversarial training on one minibatch ``x0`` ``(B, ...)`` (method.md section 4, Algorithm 1).

    ``t`` and ``eps`` are drawn once (``loss.draw``); then ``replay = K`` passes, each one forward and one
    backward of ``loss.at(model, x0, t, eps, delta, perturber.target_mode).mean()`` that yields both the
    parameter gradient (optimizer step, EMA update: ``K`` parameter updates) and the ``delta`` gradient, from
    which :meth:`Perturber.ascend` takes one projected step (l2-normalised or sign, per the perturber).

    * ``carry_delta=None`` (the reference recipe): ``delta`` starts at ``perturber.init_delta`` every
      minibatch and is updated after passes ``1..K-1`` (``K - 1`` updates; the last backward serves the
      weights only).
    * ``carry_delta`` a tensor of ``x0``'s shape (Shafahi et al. 2019): ``delta`` starts there (projected
      onto this minibatch's ball) and is updated after every pass; pass the returned ``"delta"`` to the
      next call (start with ``torch.zeros_like(x0)``).

    The perturber supplies the budget, norm, init, step rule, step size and target mode; its ``steps`` is
    not used here (``replay`` sets the number of delta updates). ``perturber=None`` or kind ``none`` trains
    without perturbation (``K = 1`` then equals :func:`train_step`). With a ``scaler`` the ``delta``
    gradient is divided by ``scaler.get_scale()`` before use, and samples whose gradient is not finite keep
    their ``delta``.

    Returns ``{"loss": mean over passes, "loss_last", "grad_norm" (last pass), "updates": K,
    "delta_norm": mean per-sample l2 norm of the returned delta, "delta_grad_norm": mean per-sample l2 norm
    of the last unscaled delta gradient used (nan if none), "delta": Tensor (B, ...)}`` where ``"delta"`` is
    the final perturbation (detached): the one the last pass used, or with ``carry_delta`` the one to carry.
    """
    if not isinstance(replay, int) or isinstance(replay, bool) or replay < 1:
        raise ValueError(f"replay: expected an integer >= 1, got {replay!r}")
    _check_grad_clip(grad_clip)
    check_finite(x0, "x0")  # once per minibatch: the K passes below call loss.at, which does not check
    kind = "none" if perturber is None else perturber.kind
    if kind not in ("none", "fgsm", "pgd"):
        raise ValueError(f"perturber: free AT needs an ascent perturber (kind 'fgsm' or 'pgd') or none, "
                         f"got kind={kind!r}")
    mode = "invariant" if perturber is None else perturber.target_mode
    model.train()
    t, eps = loss.draw(x0, generator)
    delta, radius = None, None
    if kind != "none":
        radius = perturber.radius_for(x0, t, _loss_process(loss))
        delta = _start_delta(perturber, x0, radius, carry_delta, generator)
    elif carry_delta is not None:
        _check_carry(carry_delta, x0)
    n_updates = replay if carry_delta is not None else replay - 1
    total, last_grad = torch.zeros((), device=x0.device), None
    for k in range(replay):
        optimizer.zero_grad(set_to_none=True)
        leaf = None if delta is None else delta.detach().requires_grad_(True)
        with _autocast(x0, autocast_dtype):
            value = loss.at(model, x0, t, eps, leaf, mode).mean()
        _backward(value, scaler)
        update = leaf is not None and k < n_updates
        if update:  # read the loss scale of this backward before scaler.update() changes it
            grad = torch.zeros_like(leaf) if leaf.grad is None else leaf.grad
            last_grad = _unscaled(grad, scaler)
        grad_norm = _clip_and_step(model, optimizer, grad_clip, scaler, ema, need_norm=k == replay - 1)
        total = total + value.detach().float()
        if update:
            delta = perturber.ascend(leaf.detach(), last_grad, radius)
    final = torch.zeros_like(x0) if delta is None else delta.detach()
    return {
        "loss": total.item() / replay, "loss_last": value.item(), "grad_norm": grad_norm, "updates": replay,
        "delta_norm": _mean_norm(final),
        "delta_grad_norm": math.nan if last_grad is None else _mean_norm(last_grad),
        "delta": final,
    }


def _loss_process(loss: Any):
    """The forward process of a loss object (its ``process`` attribute)."""
    process = getattr(loss, "process", None)
    if process is None:
        raise ValueError("loss: free AT needs a loss with a `process` attribute and `draw` / `at` methods")
    return process


def _check_grad_clip(grad_clip: float | None) -> None:
    if grad_clip is not None and grad_clip <= 0:
        raise ValueError(f"grad_clip: expected > 0 or None, got {grad_clip}")


def _check_carry(carry_delta: Tensor, x0: Tensor) -> None:
    if not isinstance(carry_delta, Tensor) or carry_delta.shape != x0.shape:
        shape = tuple(carry_delta.shape) if isinstance(carry_delta, Tensor) else type(carry_delta).__name__
        raise ValueError(f"carry_delta: expected a tensor of the batch shape {tuple(x0.shape)}, got {shape}")


def _start_delta(perturber, x0: Tensor, radius: Tensor, carry_delta: Tensor | None,
                 generator: torch.Generator | None) -> Tensor:
    if carry_delta is None:
        return perturber.init_delta(x0, radius, generator)
    _check_carry(carry_delta, x0)
    return perturber.project(carry_delta.detach().to(device=x0.device, dtype=x0.dtype), radius)


def _autocast(x: Tensor, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, dtype=dtype)


def _backward(value: Tensor, scaler) -> None:
    (value if scaler is None else scaler.scale(value)).backward()


def _unscaled(grad: Tensor, scaler) -> Tensor:
    """The gradient divided by the loss scale of ``scaler`` (as is without one)."""
    return grad if scaler is None else grad / scaler.get_scale()


def _clip_and_step(model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float | None, scaler,
                   ema: EMA | None, need_norm: bool) -> float:
    if scaler is not None and (grad_clip is not None or need_norm):
        scaler.unscale_(optimizer)
    grad_norm = clip_gradients(model, grad_clip) if (grad_clip is not None or need_norm) else math.nan
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    if ema is not None:
        ema.update(model)
    return grad_norm


def _mean_norm(x: Tensor) -> float:
    return float(torch.linalg.vector_norm(x.detach().flatten(1).float(), dim=1).mean())


def clip_gradients(model: nn.Module, max_norm: float | None) -> float:
    """Clip the global gradient norm to ``max_norm`` (if given); return the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_norm is None:
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
    return float(nn.utils.clip_grad_norm_(params, max_norm))

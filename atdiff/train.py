"""Training parts a user calls from their own loop: one optimizer step, free-AT replay, EMA.

Checkpoints and seeding live in :mod:`atdiff.checkpoint`."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .losses import check_batch, check_record, evaluate_loss, importance_weighted
from .validate import check_choice, check_finite, check_int, check_real

__all__ = ["EMA", "train_step", "free_at_step", "clip_gradients", "NONFINITE"]


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


NONFINITE = ("skip", "raise")


def train_step(model: nn.Module, x0: Tensor, loss: Any, optimizer: torch.optim.Optimizer, *,
               cond: Mapping[str, Any] | None = None, perturber=None, ema: EMA | None = None,
               grad_clip: float | None = None, generator: torch.Generator | None = None, scaler=None,
               autocast_dtype: torch.dtype | None = None, nonfinite: str = "skip") -> dict[str, Any]:
    """One parameter update on the minibatch ``x0`` ``(B, ...)``: draw, loss (importance-weighted mean),
    backward, optional gradient-norm clipping, optimizer step, EMA update.

    ``loss`` follows the protocol of :mod:`atdiff.losses` (``draw``, ``evaluate``, ``observe``, ``process``);
    ``cond`` is the conditioning dict handed to the network. With an ascent perturber (``fgsm`` / ``pgd``,
    :mod:`atdiff.perturb`) this is PGD-K adversarial training: the attack's ``K`` backward passes go to ``delta``
    only, then one backward gives the parameter gradient. ``scaler`` (a ``torch.amp.GradScaler``) and
    ``autocast_dtype`` (e.g. ``torch.bfloat16``, autocast on ``x0``'s device type) enable mixed precision.

    A non-finite loss or gradient norm never reaches the weights: ``nonfinite="skip"`` drops the update (no
    optimizer step, no EMA update; counted in ``"skipped"``), ``"raise"`` raises ``FloatingPointError``. With a
    ``scaler``, an overflowing gradient is the scaler's business (it skips and lowers the scale) and is counted.

    Returns ``{"loss", "grad_norm", "skipped", "record", "losses"}``: the drawn record and the per-sample
    unweighted losses (detached), for ``loss.observe(stats["record"], stats["losses"])`` by the caller.
    """
    _check_step_args(x0, grad_clip, nonfinite)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    record = loss.draw(x0, generator)
    with _autocast(x0, autocast_dtype):
        per_sample = evaluate_loss(loss, model, x0, record, perturber=perturber, cond=cond, generator=generator)
        value = importance_weighted(per_sample, record).mean()
    _backward(value, scaler)
    grad_norm, skipped = _clip_and_step(model, optimizer, value, grad_clip, scaler, ema, nonfinite)
    return {"loss": value.item(), "grad_norm": grad_norm, "skipped": int(skipped), "record": record,
            "losses": per_sample.detach()}


def free_at_step(model: nn.Module, x0: Tensor, loss: Any, optimizer: torch.optim.Optimizer, *, replay: int,
                 perturber=None, cond: Mapping[str, Any] | None = None, ema: EMA | None = None,
                 grad_clip: float | None = None, carry_delta: Tensor | None = None, scaler=None,
                 autocast_dtype: torch.dtype | None = None, generator: torch.Generator | None = None,
                 nonfinite: str = "skip") -> dict[str, Any]:
    """Free adversarial training on one minibatch ``x0`` ``(B, ...)`` (Wang et al. 2025, Algorithm 1;
    docs/algorithm.md).

    The record (``t``, noise) is drawn once (``loss.draw``); then ``replay = K`` passes, each one forward and one
    backward of ``loss.evaluate(model, x0, record, delta, cond=cond)`` (importance-weighted mean) that yields both
    the parameter gradient (optimizer step, EMA update: ``K`` parameter updates) and the ``delta`` gradient, from
    which :meth:`Perturber.ascend` takes one projected step. ``K`` is given here only; the perturber is of the
    single-step kind ``fgsm`` (budget, norm, init, step rule and length) or ``None`` / kind ``none``. The target
    mode is the loss's.

    * ``carry_delta=None`` (the authors' recipe): ``delta`` starts at ``perturber.init_delta`` every minibatch and
      is updated after passes ``1..K-1`` (``K - 1`` updates; the last backward serves the weights only).
    * ``carry_delta`` a tensor of ``x0``'s shape (Shafahi et al. 2019): ``delta`` starts there (projected onto this
      minibatch's ball) and is updated after every pass; pass the returned ``"delta"`` to the next call (start
      with ``torch.zeros_like(x0)``).

    With a ``scaler`` the ``delta`` gradient is divided by ``scaler.get_scale()`` before use. A non-finite loss or
    gradient ends the replay of this minibatch without touching the weights (``nonfinite="skip"``, counted in
    ``"skipped"``) or raises (``"raise"``); see :func:`train_step`.

    Returns ``{"loss": mean over the passes run, "loss_last", "grad_norm" (last pass), "updates" (parameter
    updates made), "skipped", "delta_norm": mean per-sample l2 norm of the returned delta, "delta_grad_norm": mean
    per-sample l2 norm of the last unscaled delta gradient used (nan if none), "delta": (B, ...), "record",
    "losses": per-sample unweighted losses of the last pass}``; ``"delta"`` is the final perturbation (detached):
    the one the last pass used, or with ``carry_delta`` the one to carry.
    """
    replay = check_int(replay, "replay", 1)
    _check_step_args(x0, grad_clip, nonfinite)
    kind = "none" if perturber is None else perturber.kind
    if kind not in ("none", "fgsm"):
        raise ValueError(f"perturber: free AT takes one ascent step per pass (K is `replay`); expected kind 'fgsm' "
                         f"(e.g. atdiff.perturb.paper_at()) or 'none', got kind={kind!r}")
    if carry_delta is not None:
        _check_carry(carry_delta, x0)
    model.train()
    record = loss.draw(x0, generator)
    check_record(record, x0, loss.process)  # once per minibatch: the K passes below call loss.evaluate directly
    delta, radius = None, None
    if kind != "none":
        radius = perturber.radius_for(x0, record.t, loss.process)
        delta = _start_delta(perturber, x0, radius, carry_delta, generator)
    n_delta_updates = replay if carry_delta is not None else replay - 1
    total, last_grad, updates, skipped = 0.0, None, 0, 0
    grad_norm, value, per_sample = math.nan, None, None
    for k in range(replay):
        optimizer.zero_grad(set_to_none=True)
        leaf = None if delta is None else delta.detach().requires_grad_(True)
        with _autocast(x0, autocast_dtype):
            per_sample = loss.evaluate(model, x0, record, leaf, cond=cond)
            value = importance_weighted(per_sample, record).mean()
        _backward(value, scaler)
        grad = None
        if leaf is not None and k < n_delta_updates:  # read this backward's loss scale before scaler.update()
            grad = _unscaled(torch.zeros_like(leaf) if leaf.grad is None else leaf.grad, scaler)
        grad_norm, skip = _clip_and_step(model, optimizer, value, grad_clip, scaler, ema, nonfinite)
        total += value.item()
        if skip:
            skipped += 1
            break  # the same minibatch would fail again; its delta gradient is not to be trusted
        updates += 1
        if grad is not None:
            last_grad = grad
            delta = perturber.ascend(leaf.detach(), grad, radius)
    final = torch.zeros_like(x0) if delta is None else delta.detach()
    passes = updates + skipped
    return {
        "loss": total / passes, "loss_last": value.item(), "grad_norm": grad_norm, "updates": updates,
        "skipped": skipped, "delta_norm": _mean_norm(final),
        "delta_grad_norm": math.nan if last_grad is None else _mean_norm(last_grad),
        "delta": final, "record": record, "losses": per_sample.detach(),
    }


def _check_step_args(x0: Tensor, grad_clip: float | None, nonfinite: str) -> None:
    check_batch(x0)
    if grad_clip is not None:
        check_real(grad_clip, "grad_clip", 0.0, open_min=True)
    check_choice(nonfinite, NONFINITE, "nonfinite")


def _check_carry(carry_delta: Tensor, x0: Tensor) -> None:
    if not isinstance(carry_delta, Tensor) or carry_delta.shape != x0.shape:
        shape = tuple(carry_delta.shape) if isinstance(carry_delta, Tensor) else type(carry_delta).__name__
        raise ValueError(f"carry_delta: expected a tensor of the batch shape {tuple(x0.shape)}, got {shape}")
    check_finite(carry_delta, "carry_delta")


def _start_delta(perturber, x0: Tensor, radius: Tensor, carry_delta: Tensor | None,
                 generator: torch.Generator | None) -> Tensor:
    if carry_delta is None:
        return perturber.init_delta(x0, radius, generator)
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


def _clip_and_step(model: nn.Module, optimizer: torch.optim.Optimizer, value: Tensor, grad_clip: float | None,
                   scaler, ema: EMA | None, nonfinite: str) -> tuple[float, bool]:
    """Unscale (with a scaler), measure and clip the gradient, and step unless the loss or the gradient norm is not
    finite. Returns ``(grad_norm, skipped)``. A skipped update leaves the weights, the optimizer state and the EMA
    untouched (with a scaler, the scaler still lowers its scale)."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = clip_gradients(model, grad_clip)
    finite = math.isfinite(grad_norm) and math.isfinite(value.item())
    if not finite and nonfinite == "raise" and scaler is None:
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"loss: non-finite loss ({value.item()}) or gradient norm ({grad_norm}); the update "
                                 "was not applied (nonfinite='skip' drops such updates instead)")
    if scaler is not None:
        if finite:
            scaler.step(optimizer)
        scaler.update()
    elif finite:
        optimizer.step()
    if not finite:
        optimizer.zero_grad(set_to_none=True)
        return grad_norm, True
    if ema is not None:
        ema.update(model)
    return grad_norm, False


def _mean_norm(x: Tensor) -> float:
    return float(torch.linalg.vector_norm(x.detach().flatten(1).float(), dim=1).mean())


def clip_gradients(model: nn.Module, max_norm: float | None) -> float:
    """Clip the global gradient norm to ``max_norm`` (if given); return the norm before clipping (inf or nan when a
    gradient is not finite; nothing is clipped then)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params])))
    if max_norm is not None and math.isfinite(norm):
        nn.utils.clip_grad_norm_(params, max_norm)
    return norm

"""Parametrisations: one function converts between eps, x0, v and score predictions.

For a process with ``x_t = alpha x0 + sigma eps``:

* ``eps``   -- the noise; ``x0 = (x_t - sigma eps) / alpha``;
* ``x0``    -- the clean data;
* ``v``     -- ``alpha eps - sigma x0`` (Salimans & Ho); for VP ``x0 = alpha x_t - sigma v``;
* ``score`` -- ``grad log q(x_t) = -eps / sigma``.

A model is any callable ``model(x, t, **cond) -> prediction``; it declares what it predicts through an
attribute ``prediction`` (default ``"eps"``). Samplers and losses call :func:`predict`, never re-derive a
conversion. :class:`DiffusionModel` wraps a bare network into such a model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .processes import Process, expand_like

__all__ = ["PREDICTIONS", "convert", "predict", "prediction_of", "DiffusionModel"]

PREDICTIONS = ("eps", "x0", "v", "score")


def _check_kind(kind: str, name: str) -> None:
    if kind not in PREDICTIONS:
        raise ValueError(f"{name}: expected one of {PREDICTIONS}, got {kind!r}")


def convert(pred: Tensor, x_t: Tensor, t: Tensor, process: Process, src: str, dst: str) -> Tensor:
    """Convert a prediction ``pred`` of kind ``src`` at ``(x_t, t)`` to kind ``dst``.

    Shapes: ``pred`` and ``x_t`` ``(B, ...)``, ``t`` ``()`` or ``(B,)``. Exact for every process (the ``v``
    conversion solves the 2x2 system, so it also holds where ``alpha^2 + sigma^2 != 1``).
    """
    _check_kind(src, "src")
    _check_kind(dst, "dst")
    if src == dst:
        return pred
    a = expand_like(process.alpha(t), x_t)
    s = expand_like(process.sigma(t), x_t)
    # first to (x0, eps), then to dst
    if src == "eps":
        eps = pred
        x0 = (x_t - s * eps) / a
    elif src == "score":
        eps = -s * pred
        x0 = (x_t - s * eps) / a
    elif src == "x0":
        x0 = pred
        eps = (x_t - a * x0) / s
    else:  # v = a eps - s x0, x_t = a x0 + s eps
        norm = a * a + s * s
        x0 = (a * x_t - s * pred) / norm
        eps = (s * x_t + a * pred) / norm
    if dst == "eps":
        return eps
    if dst == "x0":
        return x0
    if dst == "v":
        return a * eps - s * x0
    return -eps / s


def prediction_of(model: Callable) -> str:
    """The declared prediction kind of ``model`` (its ``prediction`` attribute, default ``"eps"``)."""
    kind = getattr(model, "prediction", "eps")
    _check_kind(kind, "model.prediction")
    return kind


def predict(model: Callable, x_t: Tensor, t: Tensor, process: Process, kind: str = "eps", **cond) -> Tensor:
    """Evaluate ``model`` at ``(x_t, t)`` and return its prediction as ``kind``.

    ``t`` may be a scalar tensor; it is broadcast to shape ``(B,)`` before the model sees it.
    """
    if t.ndim == 0:
        t = t.expand(x_t.shape[0])
    out = model(x_t, t, **cond)
    if out.shape != x_t.shape:
        raise ValueError(f"model: returned shape {tuple(out.shape)}, expected the input shape {tuple(x_t.shape)}")
    return convert(out, x_t, t, process, prediction_of(model), kind)


class DiffusionModel(nn.Module):
    """Wrap a network ``net(x, time, **cond)`` into a model of declared ``prediction`` kind.

    The network sees ``process.network_time(t)`` (e.g. ``1000 t`` for a continuous VP process), so the same
    network class serves every process. ``forward`` returns the raw prediction; use :func:`predict` to get
    another kind.
    """

    def __init__(self, net: nn.Module, process: Process, prediction: str = "eps") -> None:
        super().__init__()
        _check_kind(prediction, "prediction")
        self.net = net
        self.process = process
        self.prediction = prediction

    def forward(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t: expected shape ({x.shape[0]},) to match x, got {tuple(t.shape)}")
        time = self.process.network_time(t).to(torch.promote_types(x.dtype, torch.float32))
        return self.net(x, time, **cond)

"""Parametrisations: one function converts between eps, x0, v and score predictions.

For a process with ``x_t = alpha x0 + sigma eps``:

* ``eps``   -- the noise; ``x0 = (x_t - sigma eps) / alpha``;
* ``x0``    -- the clean data;
* ``v``     -- ``alpha eps - sigma x0`` (Salimans & Ho); for VP ``x0 = alpha x_t - sigma v``;
* ``score`` -- ``grad log q(x_t) = -eps / sigma``.

A model is any callable ``model(x, t, **cond) -> prediction``; it declares what it predicts through an
attribute ``prediction`` (:func:`prediction_of` looks through DDP, ``AveragedModel`` and ``torch.compile`` and
refuses a model that declares nothing). Samplers and losses call :func:`predict`, never re-derive a conversion.
:mod:`atdiff.precond` wraps bare networks into such models.

A model with ``learned_variance = True`` (IDDPM) returns ``2 C`` channels along dim 1: the prediction and the
variance interpolation ``v`` in ``[-1, 1]`` (:func:`split_learned_variance`). :func:`predict` drops ``v``, so
eps-only callers work unchanged; :func:`predict_with_variance` returns both from one forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from .processes import Process, expand_like

__all__ = ["PREDICTIONS", "convert", "predict", "prediction_of", "learned_variance_of", "unwrap",
           "split_learned_variance", "predict_with_variance", "learned_range_log_variance"]

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


_WRAPPER_ATTRS = ("module", "_orig_mod")  # DDP / DataParallel / AveragedModel; torch.compile


def _is_wrapper(model: object) -> bool:
    """Whether ``model`` is a wrapper whose metadata lives on the wrapped module (DDP, DataParallel,
    ``AveragedModel``, a ``torch.compile`` result)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel
    from torch.optim.swa_utils import AveragedModel

    if isinstance(model, DistributedDataParallel | DataParallel | AveragedModel):
        return True
    return isinstance(getattr(model, "_orig_mod", None), nn.Module)


def unwrap(model: Callable) -> Callable:
    """The innermost model behind DDP / DataParallel / ``AveragedModel`` / ``torch.compile`` wrappers."""
    while _is_wrapper(model):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def _declared(model: Callable, name: str) -> object:
    """The attribute ``name`` of ``model`` or of the first wrapped model that declares it (outermost first)."""
    layer = model
    while True:
        value = getattr(layer, name, None)
        if value is not None:
            return value
        if not _is_wrapper(layer):
            return None
        layer = getattr(layer, "_orig_mod", None) or layer.module


def prediction_of(model: Callable) -> str:
    """The declared prediction kind of ``model`` (its ``prediction`` attribute), looking through DDP,
    DataParallel, ``AveragedModel`` and ``torch.compile`` wrappers.

    A model that declares nothing is an error, never a silent ``"eps"``: training an x0-model on the eps target
    would run without a word. Declare with an attribute or :func:`atdiff.precond.declare`."""
    kind = _declared(model, "prediction")
    if kind is None:
        raise ValueError(f"model: {type(model).__name__} does not declare what it predicts; set its attribute "
                         f"`prediction` to one of {PREDICTIONS} or wrap it with atdiff.precond.declare(fn, "
                         f"prediction=...)")
    _check_kind(kind, "model.prediction")
    return kind


def learned_variance_of(model: Callable) -> bool:
    """Whether ``model`` returns a variance interpolation beside its prediction (attribute
    ``learned_variance``, looked up through wrappers as :func:`prediction_of`; False when the model declares its
    ``prediction`` but not this)."""
    prediction_of(model)  # a model that declares nothing is refused here too
    return bool(_declared(model, "learned_variance") or False)


def split_learned_variance(out: Tensor) -> tuple[Tensor, Tensor]:
    """Split a learned-variance output ``(B, 2C, ...)`` into the prediction ``(B, C, ...)`` and ``v``
    ``(B, C, ...)`` (the second half along dim 1)."""
    if out.ndim < 2 or out.shape[1] % 2:
        raise ValueError(f"model: a learned-variance model returns 2*C channels along dim 1, got shape "
                         f"{tuple(out.shape)}")
    pred, v = out.chunk(2, dim=1)
    return pred, v


def learned_range_log_variance(v: Tensor, log_beta: Tensor, log_beta_tilde: Tensor) -> Tensor:
    """IDDPM's learned-range log variance ``f log beta + (1 - f) log beta_tilde`` with ``f = (v + 1) / 2``.

    Shapes: ``v`` ``(B, ...)``; ``log_beta`` and ``log_beta_tilde`` broadcastable to it."""
    frac = (v + 1) / 2
    return frac * log_beta + (1 - frac) * log_beta_tilde


def predict_with_variance(model: Callable, x_t: Tensor, t: Tensor, process: Process, kind: str = "eps",
                          cond: Mapping[str, Any] | None = None) -> tuple[Tensor, Tensor | None]:
    """Like :func:`predict`, and also return the model's variance output ``v`` ``(B, ...)`` (None unless
    ``model.learned_variance``). One forward pass."""
    # the model sees t of shape (B,); a scalar t stays scalar for the conversion (same values, less work)
    out = model(x_t, t.expand(x_t.shape[0]) if t.ndim == 0 else t, **(cond or {}))
    v = None
    if learned_variance_of(model):
        out, v = split_learned_variance(out)
    if out.shape != x_t.shape:
        raise ValueError(f"model: returned shape {tuple(out.shape)}, expected the input shape "
                         f"{tuple(x_t.shape)}")
    return convert(out, x_t, t, process, prediction_of(model), kind), v


def predict(model: Callable, x_t: Tensor, t: Tensor, process: Process, kind: str = "eps",
            cond: Mapping[str, Any] | None = None) -> Tensor:
    """Evaluate ``model`` at ``(x_t, t)`` and return its prediction as ``kind``.

    ``t`` may be a scalar tensor; it is broadcast to shape ``(B,)`` before the model sees it. ``cond`` is the
    conditioning dict (class labels, ...), passed to the network untouched as ``model(x, t, **cond)``. The
    variance output of a learned-variance model is dropped (see :func:`predict_with_variance`).
    """
    return predict_with_variance(model, x_t, t, process, kind, cond)[0]

"""Plumbing shared by every sampler: the result type, validated entry, seeded noise, the step loop, and the
model evaluated on the grid (:class:`GridModel`).

Per-step scalars are computed once per grid, by vectorised calls of the formula functions, and kept as float64
Python floats: a step is then a few tensor operations, on any device. Conversions and posteriors are linear in
their tensor arguments, so :func:`tabulate_linear` reads their coefficients off the formula function itself
(no formula is re-derived here)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..param import convert, predict_with_variance, prediction_of
from ..processes import Process
from ..validate import check_finite as _check_finite_values
from ..validate import check_real
from .grids import check_grid

__all__ = ["SampleResult", "prepare", "randn_like", "step_pairs", "report", "check_choice", "check_order",
           "time_like", "GridTable", "grid_table", "tabulate_linear", "GridModel", "CALLBACK_KEYS",
           "SAMPLING_DTYPES", "check_clip", "nonfinite_error"]

#: the keys of every sampler's callback dict: step index, time, next time (None for an adaptive ODE
#: evaluation), state after the step, the model's denoised estimate used in the step (or None), running NFE
CALLBACK_KEYS = ("i", "t", "s", "x", "x0", "nfe")

#: dtypes the samplers run in (the step arithmetic needs at least single precision)
SAMPLING_DTYPES = (torch.float32, torch.float64)


class SampleResult(NamedTuple):
    """What a sampler returns: the final sample ``x`` ``(B, ...)`` and the number of network evaluations."""

    x: Tensor
    nfe: int


def _check_model_dtype(model: Callable, dtype: torch.dtype) -> None:
    """Refuse an ``nn.Module`` whose floating parameters are all of the other sampling dtype (a float32 network
    fed float64 states fails deep inside a layer; say so here)."""
    if not isinstance(model, nn.Module):
        return
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) == 1:
        (own,) = dtypes
        if own != dtype and own in SAMPLING_DTYPES:
            raise ValueError(f"dtype: the sampler runs in {dtype} but the model's parameters are {own}; pass "
                             f"dtype={own} (or convert the model, e.g. model.to({dtype}))")


def prepare(x_T: Tensor, process: Process, grid: Tensor, dtype: torch.dtype | None = None,
            model: Callable | None = None, name: str = "x_T") -> tuple[Tensor, Tensor]:
    """Validate the sampler inputs; return ``x_T`` (cast to ``dtype`` if given) and the float64 grid.

    ``x_T`` must be a finite floating tensor ``(B, ...)`` with ``B >= 1``, of dtype float32 or float64 unless
    ``dtype`` (float32 or float64) is given, in which case any floating ``x_T`` (e.g. float16) is cast to it.
    Integer ``x_T`` is refused (it cannot be a noise sample). A ``model`` that is an ``nn.Module`` with
    parameters of the other sampling dtype is refused (see the message for the fix). ``name`` names ``x_T`` in
    the messages."""
    if not isinstance(x_T, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x_T).__name__}")
    if not x_T.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor (noise), got {x_T.dtype}")
    if dtype is not None and dtype not in SAMPLING_DTYPES:
        raise ValueError(f"dtype: expected one of {SAMPLING_DTYPES} or None, got {dtype!r}")
    if dtype is None and x_T.dtype not in SAMPLING_DTYPES:
        raise ValueError(f"{name}: samplers run in float32 or float64, got {x_T.dtype}; pass dtype=torch.float32 "
                         f"to cast it (a half-precision network can still autocast inside its forward)")
    if x_T.ndim < 1 or x_T.shape[0] < 1:
        raise ValueError(f"{name}: expected shape (B, ...) with B >= 1, got {tuple(x_T.shape)}")
    _check_finite_values(x_T, name)
    grid = check_grid(grid, process)
    x = x_T if dtype is None else x_T.to(dtype)
    if model is not None:
        _check_model_dtype(model, x.dtype)
    return x, grid


def check_clip(clip_x0: float | None) -> float | None:
    """``clip_x0``: None (no clipping) or a finite number > 0 (the predicted ``x0`` is clamped to
    ``[-clip_x0, clip_x0]``)."""
    return None if clip_x0 is None else check_real(clip_x0, "clip_x0", 0.0, open_min=True)


def nonfinite_error(sampler: str, i: int, t: float, what: str = "the model returned") -> FloatingPointError:
    """The error raised when a sampler meets non-finite values: names the sampler, the step and the time."""
    return FloatingPointError(f"{sampler}: {what} NaN or infinite values at step {i} (t = {t:.6g}); pass "
                              f"check_finite=False to skip this check")


def randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise of ``x``'s shape, dtype and device, drawn from ``generator`` if given."""
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def step_pairs(grid: Tensor, x: Tensor, progress: bool, desc: str) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Yield ``(i, t, s)`` for consecutive grid times as scalar tensors on ``x``'s device (float64)."""
    times = grid.to(x.device).unbind()
    steps = range(len(times) - 1)
    for i in tqdm(steps, desc=desc, leave=False) if progress else steps:
        yield i, times[i], times[i + 1]


def report(callback: Callable[[dict], None] | None, *, i: int, t: float, s: float | None, x: Tensor,
           x0: Tensor | None, nfe: int) -> None:
    """Call ``callback`` with one step's information: the dict of :data:`CALLBACK_KEYS` (same keys for every
    sampler; ``t`` and ``s`` as Python floats)."""
    if callback is not None:
        callback({"i": i, "t": t, "s": s, "x": x, "x0": x0, "nfe": nfe})


def check_choice(value: object, choices: tuple, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")


def check_order(order: int, orders: tuple[int, ...] = (1, 2, 3)) -> None:
    """Raise ``ValueError`` naming ``order`` unless it is one of ``orders``."""
    if isinstance(order, bool) or order not in orders:
        raise ValueError(f"order: expected one of {orders}, got {order!r}")


def time_like(t: Tensor | float, x: Tensor) -> Tensor:
    """A scalar time tensor in ``x``'s dtype and device (what a sampler passes to :func:`predict`)."""
    return torch.as_tensor(t, dtype=x.dtype, device=x.device)
class GridTable(NamedTuple):
    """Float64 Python lists over the grid: ``alpha``, ``sigma``, ``lam = log_snr / 2`` (``inf`` at
    ``sigma = 0``) and the EDM level ``edm = sigma / alpha``. Scalars as floats keep the step arithmetic in
    float64 and free of small tensor operations, on any device."""

    alpha: list[float]
    sigma: list[float]
    lam: list[float]
    edm: list[float]


def grid_table(process: Process, grid: Tensor) -> GridTable:
    """The coefficients of ``process`` at every time of ``grid`` ``(N + 1,)`` (one vectorised call each)."""
    grid = grid.double().cpu()
    lam = 0.5 * process.log_snr(grid)
    return GridTable(process.alpha(grid).tolist(), process.sigma(grid).tolist(), lam.tolist(),
                     (-lam).exp().tolist())


def tabulate_linear(fn: Callable[..., Tensor], n_args: int, length: int) -> list[list[float]]:
    """Coefficients of a map ``fn(a_1, ..., a_n) = sum_k c_k a_k`` that is linear (no constant term) in its
    ``n_args`` tensor arguments and elementwise over a grid of ``length`` times: ``c_k`` is ``fn`` at the
    ``k``-th unit input (ones for ``a_k``, zeros for the others), float64 of shape ``(length,)``. Returns
    ``[c_1, ..., c_n]`` as lists of floats."""
    zeros = torch.zeros(length, dtype=torch.float64)
    return [fn(*[torch.ones_like(zeros) if j == k else zeros for j in range(n_args)]).tolist()
            for k in range(n_args)]


class GridModel:
    """``model`` evaluated at the times of ``grid`` under the conditioning ``cond``, returning the prediction
    ``kind``, and counting the network evaluations in ``nfe``.

    At grid times the model's own prediction is mapped to ``kind`` by coefficients tabulated once through
    :func:`~atdiff.param.convert` (which is linear in ``(x_t, pred)``); off the grid :meth:`off_grid` calls
    :func:`~atdiff.param.predict_with_variance`. Holds no sampler history.

    With ``check=True`` every raw model output is tested for finiteness on the device (no host sync);
    :meth:`check_step`, called once per sampler step, synchronises once and raises
    :class:`FloatingPointError` naming ``sampler``, the step and its time.
    """

    def __init__(self, model: Callable, process: Process, grid: Tensor, kind: str,
                 cond: Mapping[str, Any] | None = None, *, sampler: str = "sampler", check: bool = True) -> None:
        self.model, self.process, self.kind, self.nfe = model, process, kind, 0
        self.cond, self.sampler, self.check = cond, sampler, bool(check)
        self.native = prediction_of(model)
        self.times = grid.double().cpu().tolist()
        self.coef = None
        self._ok: Tensor | None = None
        if self.native != kind:
            t = torch.tensor(self.times, dtype=torch.float64)
            self.coef = tabulate_linear(lambda x, p: convert(p, x, t, process, self.native, kind), 2, len(t))

    def _watch(self, out: Tensor) -> None:
        if self.check:
            ok = torch.isfinite(out).all()
            self._ok = ok if self._ok is None else self._ok & ok

    def at(self, x: Tensor, i: int) -> tuple[Tensor, Tensor | None]:
        """The prediction ``(B, ...)`` at grid time ``i`` and the learned variance output (or None)."""
        out, v = predict_with_variance(self.model, x, time_like(self.times[i], x), self.process, self.native,
                                       cond=self.cond)
        self.nfe += 1
        self._watch(out)
        if v is not None:
            self._watch(v)
        if self.coef is not None:
            out = self.coef[0][i] * x + self.coef[1][i] * out
        return out, v

    def off_grid(self, x: Tensor, t: Tensor | float) -> Tensor:
        """The prediction ``(B, ...)`` at any time ``t``."""
        self.nfe += 1
        out, _ = predict_with_variance(self.model, x, time_like(t, x), self.process, self.native, cond=self.cond)
        self._watch(out)
        return convert(out, x, time_like(t, x), self.process, self.native, self.kind)

    def check_step(self, i: int) -> None:
        """Raise :class:`FloatingPointError` if a model output since the last call was not finite (one host
        sync); ``i`` is the sampler step, whose time is ``grid[i]``."""
        if self._ok is not None:
            ok, self._ok = self._ok, None
            if not bool(ok):
                raise nonfinite_error(self.sampler, i, self.times[i])

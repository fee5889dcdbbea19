"""Plumbing shared by every sampler: the result type, validated entry, seeded noise, the step loop, and the
model evaluated on the grid (:class:`GridModel`).

Per-step scalars are computed once per grid, by vectorised calls of the formula functions, and kept as float64
Python floats: a step is then a few tensor operations, on any device. Conversions and posteriors are linear in
their tensor arguments, so :func:`tabulate_linear` reads their coefficients off the formula function itself
(no formula is re-derived here)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..param import convert, predict_with_variance, prediction_of
from ..processes import Process, check_finite
from .grids import check_grid

__all__ = ["SampleResult", "prepare", "randn_like", "step_pairs", "report", "check_choice", "check_order",
           "time_like", "GridTable", "grid_table", "tabulate_linear", "GridModel"]


class SampleResult(NamedTuple):
    """What a sampler returns: the final sample ``x`` ``(B, ...)`` and the number of network evaluations."""

    x: Tensor
    nfe: int


def prepare(x_T: Tensor, process: Process, grid: Tensor, dtype: torch.dtype | None = None
            ) -> tuple[Tensor, Tensor]:
    """Validate the sampler inputs; return ``x_T`` (cast to ``dtype`` if given) and the float64 grid."""
    check_finite(x_T, "x_T")
    if x_T.ndim < 1 or x_T.shape[0] < 1:
        raise ValueError(f"x_T: expected shape (B, ...) with B >= 1, got {tuple(x_T.shape)}")
    grid = check_grid(grid, process)
    return (x_T if dtype is None else x_T.to(dtype)), grid


def randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise of ``x``'s shape, dtype and device, drawn from ``generator`` if given."""
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def step_pairs(grid: Tensor, x: Tensor, progress: bool, desc: str) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Yield ``(i, t, s)`` for consecutive grid times as scalar tensors on ``x``'s device (float64)."""
    times = grid.to(x.device).unbind()
    steps = range(len(times) - 1)
    for i in tqdm(steps, desc=desc, leave=False) if progress else steps:
        yield i, times[i], times[i + 1]


def report(callback: Callable[[dict], None] | None, **info) -> None:
    """Call ``callback`` with the step's information (a dict), if a callback was given."""
    if callback is not None:
        callback(info)


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
    """``model`` evaluated at the times of ``grid``, returning the prediction ``kind``, and counting the
    network evaluations in ``nfe``.

    At grid times the model's own prediction is mapped to ``kind`` by coefficients tabulated once through
    :func:`~atdiff.param.convert` (which is linear in ``(x_t, pred)``); off the grid :meth:`off_grid` calls
    :func:`~atdiff.param.predict_with_variance`. Holds no sampler history.
    """

    def __init__(self, model: Callable, process: Process, grid: Tensor, kind: str) -> None:
        self.model, self.process, self.kind, self.nfe = model, process, kind, 0
        self.native = prediction_of(model)
        self.times = grid.double().cpu().tolist()
        self.coef = None
        if self.native != kind:
            t = torch.tensor(self.times, dtype=torch.float64)
            self.coef = tabulate_linear(lambda x, p: convert(p, x, t, process, self.native, kind), 2, len(t))

    def at(self, x: Tensor, i: int) -> tuple[Tensor, Tensor | None]:
        """The prediction ``(B, ...)`` at grid time ``i`` and the learned variance output (or None)."""
        out, v = predict_with_variance(self.model, x, time_like(self.times[i], x), self.process, self.native)
        self.nfe += 1
        if self.coef is not None:
            out = self.coef[0][i] * x + self.coef[1][i] * out
        return out, v

    def off_grid(self, x: Tensor, t: Tensor | float) -> Tensor:
        """The prediction ``(B, ...)`` at any time ``t``."""
        self.nfe += 1
        return predict_with_variance(self.model, x, time_like(t, x), self.process, self.kind)[0]

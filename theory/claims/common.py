"""Helpers shared by the claim modules: one torch thread, seeded generators, rounding, figures, cross-check reading.

Everything numerical in the claims runs in float64 on the CPU.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from atdiff.threads import one_thread

__all__ = ["F64", "one_thread", "single_thread", "new_generator", "f64", "diag", "round_value", "floats",
           "max_rel_error", "symbolic_error", "kl_ball_radius64", "subplots", "save_figure"]

F64 = torch.float64


def single_thread(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: call ``fn`` inside :func:`one_thread`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with one_thread():
            return fn(*args, **kwargs)

    return wrapper


def new_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(int(seed))


def f64(values: Any) -> Tensor:
    """``values`` (numbers, lists or tensors) as a float64 tensor."""
    return torch.as_tensor(values, dtype=F64)


def diag(v: Tensor) -> Tensor:
    """``(..., d)`` -> ``(..., d, d)`` diagonal matrices (float64)."""
    return torch.diag_embed(v.to(F64))


def round_value(x: float, digits: int = 6) -> float | str:
    """``x`` to ``digits`` significant digits; a non-finite value becomes the string ``"inf"``, ``"-inf"`` or
    ``"nan"`` so that every verdict is strict JSON."""
    x = float(x)
    return float(f"{x:.{digits}g}") if math.isfinite(x) else str(x)


def floats(x: Tensor | list) -> list[float]:
    """A tensor or list as a list of Python floats."""
    return [float(v) for v in (x.tolist() if isinstance(x, Tensor) else x)]


def max_rel_error(value: Tensor, reference: Tensor) -> float:
    """``max |value - reference| / |reference|`` (reference bounded away from 0 by the float64 tiny)."""
    return float(((value - reference).abs() / reference.abs().clamp_min(torch.finfo(F64).tiny)).max())


def symbolic_error(record: dict[str, Any], error_keys: tuple[str, ...], verified_key: str) -> float:
    """The largest of ``record[error_keys]`` from a sympy cross-check that ran, or ``inf`` when an error is
    missing or the derivation did not verify itself, so a cross-check that did not deliver can never pass."""
    if record.get(verified_key) is not True:
        return math.inf
    return max(float(record.get(k, math.inf)) for k in error_keys)


def kl_ball_radius64(eta0: float | Tensor, sigma: Tensor) -> Tensor:
    """atdiff's :func:`atdiff.perturb.kl_ball_radius` as a float64 tensor."""
    from atdiff.perturb import kl_ball_radius

    return torch.as_tensor(kl_ball_radius(eta0, sigma), dtype=F64)


def subplots(ncols: int, nrows: int = 1, size: tuple[float, float] = (4.0, 3.0)):
    """A matplotlib (Agg) figure with a ``(nrows, ncols)`` array of axes, each ``size`` inches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)


def save_figure(fig, out: Path | None, name: str, *, layout: bool = True, dpi: int = 72) -> list[str]:
    """Write ``fig`` as ``out/name`` (PNG) and close it; returns ``[path]`` (``[]`` when ``out`` is None).
    ``layout`` applies the house margins (set it False after arranging the axes yourself)."""
    import matplotlib.pyplot as plt

    if out is None:
        plt.close(fig)
        return []
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    if layout:
        one_row = fig.axes[0].get_gridspec().nrows == 1
        fig.subplots_adjust(left=0.08, right=0.98, bottom=0.17 if one_row else 0.1, top=0.88, wspace=0.28,
                            hspace=0.4)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return [str(path)]

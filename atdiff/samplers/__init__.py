"""Samplers: pure functions ``sample_x(model, x_T, process, grid, **opts) -> SampleResult(x, nfe)``.

``sample(name, ...)`` dispatches by name so a recipe can sweep samplers.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ..processes import Process
from .ancestral import sample_ddpm
from .base import SampleResult
from .ddim import ddim_step, sample_ddim
from .grids import check_grid, karras_grid, respaced_grid, respacing_timesteps, uniform_grid

SAMPLERS: dict[str, Callable[..., SampleResult]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
}


def sample(name: str, model: Callable, x_T: Tensor, process: Process, grid: Tensor, **opts) -> SampleResult:
    """Run the sampler called ``name`` (one of :data:`SAMPLERS`) with the given options."""
    if name not in SAMPLERS:
        raise ValueError(f"name: unknown sampler {name!r}; valid samplers: {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name](model, x_T, process, grid, **opts)


__all__ = [
    "SAMPLERS", "SampleResult", "sample", "sample_ddpm", "sample_ddim", "ddim_step", "check_grid",
    "karras_grid", "respaced_grid", "respacing_timesteps", "uniform_grid",
]

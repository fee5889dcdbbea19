"""Time grids: explicit, strictly decreasing sequences of times from ``t_max`` down to ``t_min``.

A sampler walks ``grid[0] -> grid[1] -> ... -> grid[-1]``; the next time always comes from the grid, never
from ``t - T // n`` arithmetic. Grids are float64 tensors of shape ``(N + 1,)`` for ``N`` steps.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from ..processes import VE, Process, VPDiscrete

__all__ = ["uniform_grid", "karras_grid", "respacing_timesteps", "respaced_grid", "check_grid", "SKIP_TYPES",
           "default_t_end", "edm_sigma", "edm_time", "karras_time_grid", "dpm_grid", "check_steps", "MAX_STEPS"]

#: DPM-Solver's time-step spacings
SKIP_TYPES = ("time-uniform", "logSNR", "time-quadratic")


def check_grid(grid: Tensor, process: Process, name: str = "grid") -> Tensor:
    """Validate a sampling grid: 1-D, at least two times, finite, strictly decreasing, inside the process's
    time range. Returns it as a float64 tensor."""
    grid = torch.as_tensor(grid, dtype=torch.float64)
    if grid.ndim != 1 or grid.numel() < 2:
        raise ValueError(f"{name}: expected a 1-D tensor of at least 2 times, got shape {tuple(grid.shape)}")
    if not bool(torch.isfinite(grid).all()):
        raise ValueError(f"{name}: contains NaN or infinite values")
    if not bool((grid[1:] < grid[:-1]).all()):
        raise ValueError(f"{name}: times must be strictly decreasing, got {grid.tolist()[:8]}...")
    if grid[-1] < process.t_min - 1e-9 or grid[0] > process.t_max + 1e-9:
        raise ValueError(f"{name}: times must lie in [{process.t_min}, {process.t_max}], got "
                         f"[{grid[-1].item()}, {grid[0].item()}]")
    return grid


#: the largest number of steps a grid builder accepts (refused before anything is allocated)
MAX_STEPS = 100_000


def check_steps(steps: object, name: str = "steps") -> int:
    """A number of steps: an integer (Python or NumPy, never ``bool``) in ``[1, MAX_STEPS]``; returned as int."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise ValueError(f"{name}: expected an integer number of steps >= 1, got {steps!r}")
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"{name}: expected 1 <= steps <= {MAX_STEPS}, got {steps}")
    return int(steps)


def _check_steps(steps: int) -> None:
    check_steps(steps)


def uniform_grid(process: Process, steps: int, t_end: float | None = None, t_start: float | None = None
                 ) -> Tensor:
    """``steps + 1`` times evenly spaced from ``t_start`` (default ``t_max``) down to ``t_end``
    (default ``t_min``). For :class:`VPDiscrete` the times are rounded to integers, which must stay distinct.
    """
    _check_steps(steps)
    if isinstance(process, VPDiscrete) and steps > process.T:
        raise ValueError(f"steps: a uniform grid of integer times on a process of T = {process.T} has at most "
                         f"{process.T} steps, got {steps}")
    t_start = process.t_max if t_start is None else float(t_start)
    t_end = process.t_min if t_end is None else float(t_end)
    grid = torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)
    if isinstance(process, VPDiscrete):
        grid = grid.round()
    return check_grid(grid, process)


def karras_grid(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0,
                append_zero: bool = True) -> Tensor:
    """The EDM noise levels ``(sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``,
    ``i = 0..N-1`` (``N = steps``), followed by 0 if ``append_zero``. Float64, decreasing."""
    _check_steps(steps)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"sigma_min, sigma_max: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if rho <= 0:
        raise ValueError(f"rho: expected > 0, got {rho}")
    if steps == 1:
        sig = torch.tensor([sigma_max], dtype=torch.float64)
    else:
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        sig = (hi + ramp * (lo - hi)) ** rho
    if append_zero:
        sig = torch.cat([sig, sig.new_zeros(1)])
    return sig


def respacing_timesteps(T: int, spec: str | int) -> list[int]:
    """The timesteps (1-based, DDPM convention ``1..T``) kept by an improved-diffusion respacing spec.

    ``spec`` is ``"ddimN"`` (stride ``T // N`` with the final step kept, improved-diffusion's rule), an integer
    ``N`` or ``"N"`` (N evenly spread steps), or comma-separated section counts ``"10,10,10"`` (the range is
    cut into equal sections and each section gets that many evenly spread steps). Returned increasing.
    """
    if isinstance(spec, int):
        spec = str(spec)
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"spec: expected a respacing string like 'ddim50', '100' or '10,10,10', got {spec!r}")
    if spec.startswith("ddim"):
        try:
            n = int(spec[4:])
        except ValueError:
            raise ValueError(f"spec: cannot parse {spec!r}; expected 'ddimN'") from None
        if not 1 <= n <= T:
            raise ValueError(f"spec: {spec!r} asks for {n} steps, expected 1..{T}")
        # improved-diffusion searches the smallest integer stride giving exactly n steps
        for stride in range(1, T + 1):
            kept = list(range(0, T, stride))
            if len(kept) == n:
                return [k + 1 for k in kept]
        raise ValueError(f"spec: no integer stride gives exactly {n} steps out of {T}")
    try:
        counts = [int(c) for c in spec.split(",")]
    except ValueError:
        raise ValueError(f"spec: cannot parse {spec!r}; expected 'ddimN', 'N' or '10,10,10'") from None
    size, extra = divmod(T, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        length = size + (1 if i < extra else 0)
        if not 1 <= count <= length:
            raise ValueError(f"spec: section {i} of {spec!r} asks for {count} steps, it has {length}")
        frac = 1.0 if count == 1 else (length - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            kept.append(start + round(cur))
            cur += frac
        start += length
    return [k + 1 for k in kept]


def respaced_grid(process: VPDiscrete, spec: str | int) -> Tensor:
    """A decreasing grid over the kept timesteps of ``spec`` on a discrete process, ending at ``t = 0``:
    ``[t_N, ..., t_1, 0]`` (float64). For DDIM and for DDPM with ``respace=True``."""
    if not isinstance(process, VPDiscrete):
        raise ValueError(f"process: respacing needs a VPDiscrete process, got {process!r}")
    kept = respacing_timesteps(process.T, spec)
    grid = torch.tensor(sorted(kept, reverse=True) + [0], dtype=torch.float64)
    return check_grid(grid, process)


def default_t_end(process: Process) -> float:
    """The smallest time a solver that stops short of the data goes to: ``t = 1`` for :class:`VPDiscrete`
    (the first trained step), ``sigma_min`` for :class:`VE`, ``1e-3 t_max`` otherwise (DPM-Solver's
    choice)."""
    if isinstance(process, VPDiscrete):
        return 1.0
    if isinstance(process, VE):
        return float(process.sigma_min)
    return 1e-3 * process.t_max


def edm_sigma(process: Process, t: Tensor | float) -> Tensor:
    """EDM noise level ``sigma(t) / alpha(t) = exp(-log_snr / 2)`` (0 at the data). Shape of ``t``.

    In the coordinates ``x / alpha`` every process is the VE process ``x0 + edm_sigma * eps``."""
    return (-0.5 * process.log_snr(t)).exp()


def edm_time(process: Process, sigma: Tensor | float) -> Tensor:
    """Inverse of :func:`edm_sigma`: the process time with ``sigma / alpha = sigma`` (clamped to the time
    range; ``sigma = 0`` gives ``t_min``). Shape of ``sigma``."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return process.t_from_log_snr(-2 * sigma.log())


def karras_time_grid(process: Process, steps: int, sigma_min: float | None = None,
                     sigma_max: float | None = None, rho: float = 7.0, append_zero: bool = True) -> Tensor:
    """The EDM (Karras) grid of ``steps`` noise levels ``sigma / alpha`` from ``sigma_max`` (default: that of
    ``t_max``) to ``sigma_min`` (default: that of :func:`default_t_end`), mapped to process times by
    :func:`edm_time`, followed by ``t_min`` if ``append_zero``. Float64, decreasing; for :class:`VE` the times
    are the Karras sigmas themselves."""
    lo = float(edm_sigma(process, default_t_end(process))) if sigma_min is None else float(sigma_min)
    hi = float(edm_sigma(process, process.t_max)) if sigma_max is None else float(sigma_max)
    sig = karras_grid(lo, hi, steps, rho, append_zero=False)
    grid = edm_time(process, sig)
    if append_zero:
        grid = torch.cat([grid, grid.new_full((1,), process.t_min)])
    return check_grid(grid, process)


def dpm_grid(process: Process, steps: int, skip_type: str = "logSNR", t_end: float | None = None,
             t_start: float | None = None, denoise_to_zero: bool = False) -> Tensor:
    """DPM-Solver's grid: ``steps + 1`` times from ``t_start`` (default ``t_max``) to ``t_end`` (default
    :func:`default_t_end`), evenly spaced in ``lambda = log_snr / 2`` (``"logSNR"``), in ``t``
    (``"time-uniform"``) or in ``sqrt(t)`` (``"time-quadratic"``). ``denoise_to_zero`` appends ``t_min``
    (one more, first-order, step). Float64, decreasing, shape ``(steps + 1,)`` or ``(steps + 2,)``."""
    _check_steps(steps)
    if skip_type not in SKIP_TYPES:
        raise ValueError(f"skip_type: expected one of {SKIP_TYPES}, got {skip_type!r}")
    t_start = process.t_max if t_start is None else float(t_start)
    t_end = default_t_end(process) if t_end is None else float(t_end)
    if not process.t_min < t_end < t_start:
        raise ValueError(f"t_end: expected t_min < t_end < t_start = {t_start}, got {t_end}")
    ends = torch.tensor([t_start, t_end], dtype=torch.float64)
    if skip_type == "logSNR":
        lam = process.log_snr(ends)
        grid = process.t_from_log_snr(torch.linspace(lam[0].item(), lam[1].item(), steps + 1,
                                                     dtype=torch.float64))
        grid[0], grid[-1] = t_start, t_end  # exact end points (the round trip is accurate to ~1e-13)
    elif skip_type == "time-uniform":
        grid = torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)
    else:
        grid = torch.linspace(math.sqrt(t_start), math.sqrt(t_end), steps + 1, dtype=torch.float64) ** 2
    if denoise_to_zero:
        grid = torch.cat([grid, grid.new_full((1,), process.t_min)])
    return check_grid(grid, process)

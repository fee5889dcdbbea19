"""Robustness of a sampler's trajectory to a perturbation of its state (Wang et al. 2025: a model trained
adversarially should move its final samples less when an intermediate state ``x_t`` of the sampler is perturbed).

:func:`perturbed_final` runs a sampler on its exact-NFE grid, adds ``delta`` to the state at grid index ``step``
and runs the rest of the grid (the *tail*) from the clean and from the perturbed state with the same sampler noise
(common random numbers), so the difference of the two final samples is the effect of ``delta`` alone.
``delta`` has per-sample l2 norm ``radius * sqrt(d)`` (per-coordinate RMS ``radius``) and is either a random
direction or found by projected gradient ascent on that sphere, maximising ``||final(x + delta) - final(x)||^2``
through the tail of the sampler (samplers leave gradient tracking to the caller). :func:`trajectory_move`
summarises the result as one number.

Only samplers with one network evaluation per grid step are split (:data:`SPLITTABLE`); the split of
``dpm-solver++`` (multistep) restarts its history at ``step``, so its tail begins with a first-order step for
both runs (clean and perturbed alike; the clean final then differs slightly from an unsplit run). The ancestral
samplers (``ddpm``, ``iddpm``, ``iddpm-es``) are Markov, and the head is the unsplit sampler stopped after step
``step - 1``: their clean final equals the unsplit run's with the same generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from atdiff.perturb import per_sample_norm
from atdiff.processes import Process, expand_like
from atdiff.samplers import REGISTRY, default_grid, steps_for_nfe
from atdiff.validate import check_choice, check_int, check_real

__all__ = ["perturbed_final", "trajectory_move", "split_grid", "KINDS", "SPLITTABLE"]

KINDS = ("random", "adversarial")
#: samplers spending one network evaluation per grid step, whose state at a grid time is the whole sampler state
#: (dpm-solver++ multistep up to its history, which restarts at the split)
SPLITTABLE = ("ddpm", "iddpm", "iddpm-es", "ddim", "dpm-solver++")


class _StopHead(Exception):
    """Raised by the head's callback to stop the sampler once it has reached the split."""


def split_grid(sampler: str, process: Process, nfe: int, step: int, **sampler_opts) -> tuple[Tensor, dict]:
    """The exact-NFE grid ``(N + 1,)`` of ``sampler`` (:func:`atdiff.samplers.steps_for_nfe` and its default grid)
    and the sampler options in effect, after checking that ``sampler`` can be split and that ``0 <= step < N``
    (the tail keeps at least one step)."""
    if sampler not in SPLITTABLE:
        raise ValueError(f"sampler: expected one of {SPLITTABLE} (one evaluation per grid step), got {sampler!r}")
    plan = steps_for_nfe(sampler, nfe, **sampler_opts)
    if plan.opts or plan.steps != nfe:
        raise ValueError(f"sampler: {sampler!r} with options {sampler_opts} does not spend one evaluation per step "
                         f"(plan {plan}); the trajectory cannot be split at a grid index")
    grid = default_grid(sampler, process, plan.steps)
    check_int(step, "step", 0, plan.steps - 1)
    return grid, dict(sampler_opts)


def _run(sampler: str, model: Callable, x: Tensor, process: Process, grid: Tensor, opts: dict, **kw) -> Tensor:
    return REGISTRY[sampler].fn(model, x, process, grid, **opts, **kw).x


def _head(sampler: str, model: Callable, x_T: Tensor, process: Process, grid: Tensor, step: int, opts: dict,
          **kw) -> Tensor:
    """The unsplit sampler's state at ``grid[step]`` (``x_T`` for ``step = 0``): the sampler runs on the whole grid
    and is stopped by its callback after step ``step - 1``, so it draws exactly the noise of an unsplit run."""
    if step == 0:
        return x_T
    caught: dict[str, Tensor] = {}

    def grab(info: dict) -> None:
        if info["i"] == step - 1:
            caught["x"] = info["x"]
            raise _StopHead

    try:
        _run(sampler, model, x_T, process, grid, opts, callback=grab, **kw)
    except _StopHead:
        pass
    return caught["x"]


def _unit(v: Tensor) -> Tensor:
    """Each sample of ``v`` ``(B, ...)`` scaled to l2 norm 1 (a zero sample stays zero)."""
    n = per_sample_norm(v, "l2")
    return v / expand_like(n.clamp_min(torch.finfo(n.dtype).tiny), v)


def _sq_move(a: Tensor, b: Tensor) -> Tensor:
    """``||a - b||^2`` per sample, ``(B,)``."""
    return (a - b).flatten(1).pow(2).sum(1)


def _generator_like(x: Tensor, generator: torch.Generator | None) -> torch.Generator:
    """``generator``, or (if None) a new one on ``x``'s device seeded from the global torch RNG."""
    if generator is not None:
        return generator
    return torch.Generator(device=x.device).manual_seed(int(torch.randint(0, 2**62, (1,)).item()))


def _replay(state: Tensor, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.set_state(state)
    return gen


def perturbed_final(model: Callable, process: Process, sampler: str, nfe: int, x_T: Tensor, *, step: int, kind: str,
                    radius: float, attack_steps: int = 5, generator: torch.Generator | None = None,
                    cond: Mapping[str, Any] | None = None, clip_x0: float | None = None,
                    attack_step_size: float = 10.0, **sampler_opts) -> tuple[Tensor, Tensor]:
    """(clean final samples, perturbed final samples), both ``(B, ...)`` like ``x_T``.

    ``sampler`` (one of :data:`SPLITTABLE`) runs on the grid that spends exactly ``nfe`` evaluations; at grid index
    ``step`` (``0 <= step < nfe``; 0 perturbs ``x_T``) the state gets ``delta`` of per-sample l2 norm
    ``radius * sqrt(d)`` (``d = x_T[0].numel()``):

    * ``kind="random"``: a Gaussian direction normalised to that norm;
    * ``kind="adversarial"``: ``attack_steps`` steps of projected gradient ascent on that sphere from a random
      direction, maximising ``||final(x + delta) - final(x)||^2`` per sample by differentiating through the tail;
      each step moves ``delta`` by ``attack_step_size * radius * sqrt(d)`` along the normalised gradient and
      projects back onto the sphere (for a linear tail a large step is the power iteration of ``A^T A``); the
      best ``delta`` seen per sample is kept, so the adversarial move is never below its random start's.

    ``generator`` drives the head's sampler noise; its state at the split is replayed for the tail of every run
    (clean, perturbed, attack iterations); the random direction is drawn from it after that state is saved. Without
    a generator one is seeded from the global torch RNG. ``cond`` and ``clip_x0`` go to the sampler (``clip_x0``
    only when given), ``sampler_opts`` too (e.g. ``variance="small"`` for ``iddpm`` of a model without a learned
    variance). The model's parameters get no gradients. The returned tensors are detached.
    """
    check_choice(kind, KINDS, "kind")
    radius = check_real(radius, "radius", 0.0)
    attack_steps = check_int(attack_steps, "attack_steps", 1)
    attack_step_size = check_real(attack_step_size, "attack_step_size", 0.0, open_min=True)
    if not isinstance(x_T, Tensor) or x_T.ndim < 1 or x_T.shape[0] < 1:
        raise ValueError(f"x_T: expected a tensor of shape (B, ...), got {getattr(x_T, 'shape', type(x_T))}")
    grid, opts = split_grid(sampler, process, nfe, step, **sampler_opts)
    kw: dict[str, Any] = {"cond": cond}
    if clip_x0 is not None:
        kw["clip_x0"] = clip_x0
    generator = _generator_like(x_T, generator)
    with torch.no_grad():
        x_s = _head(sampler, model, x_T, process, grid, step, opts, generator=generator, **kw).detach()
    state = generator.get_state()
    tail_grid = grid[step:]

    def tail(x: Tensor) -> Tensor:
        return _run(sampler, model, x, process, tail_grid, opts, generator=_replay(state, x.device), **kw)

    with torch.no_grad():
        clean = tail(x_s)
    if radius == 0.0:
        with torch.no_grad():
            return clean, tail(x_s + torch.zeros_like(x_s))
    r = radius * math.sqrt(x_s[0].numel())
    delta = r * _unit(torch.randn(x_s.shape, generator=generator, device=x_s.device, dtype=x_s.dtype))
    if kind == "random":
        with torch.no_grad():
            return clean, tail(x_s + delta)
    best_val, best_out = None, None
    for k in range(attack_steps + 1):
        leaf = delta.detach().requires_grad_(k < attack_steps)
        with torch.set_grad_enabled(k < attack_steps):
            out = tail(x_s + leaf)
            val = _sq_move(out, clean)
            grad = torch.autograd.grad(val.sum(), leaf)[0] if k < attack_steps else None
        out, val = out.detach(), val.detach()
        if best_val is None:
            best_val, best_out = val, out
        else:
            better = val > best_val
            mask = better.reshape(-1, *([1] * (out.ndim - 1)))
            best_out = torch.where(mask, out, best_out)
            best_val = torch.where(better, val, best_val)
        if grad is not None:
            delta = r * _unit(leaf.detach() + attack_step_size * r * _unit(grad))
    return clean, best_out


def trajectory_move(clean: Tensor, perturbed: Tensor) -> float:
    """RMS over samples of ``||perturbed - clean|| / sqrt(d)`` (``d`` the per-sample size): the per-coordinate
    RMS displacement of the final samples. Shapes ``(B, ...)``."""
    if clean.shape != perturbed.shape:
        raise ValueError(f"perturbed: expected the shape of clean {tuple(clean.shape)}, got {tuple(perturbed.shape)}")
    d = clean[0].numel()
    return float(_sq_move(perturbed.double(), clean.double()).mean().div(d).sqrt())

"""Perturbers: how the input ``x_t`` of a denoising loss is moved to ``x~ = x_t + delta``.

One object, :class:`Perturber`, covers random and adversarial perturbations; its knobs are

* ``kind``: ``none`` (delta = 0), ``gaussian`` (random, ``delta = (r / sqrt(d)) xi``, so
  ``E||delta||^2 = r^2``), ``fgsm`` (one ascent step from ``init``) or ``pgd`` (``steps`` projected
  ascent steps);
* ``norm``: ``l2`` or ``linf``, the ball the adversarial delta is projected onto, per sample;
* ``budget``: how the per-sample radius ``r`` follows from ``radius`` (see :data:`BUDGETS`):
  ``absolute`` (``r = radius``), ``rms`` (per-pixel RMS, ``r = radius * sqrt(d)``, the reference recipe),
  ``noise-rms`` (per-pixel RMS in units of ``sigma_t``: ``r = radius * sigma_t * sqrt(d)``, Input
  Perturbation) and ``kl`` (``radius`` is the KL radius ``eta0``: ``r = sqrt(2 eta0) sigma_t``, the DRO ball
  of docs/objective.md);
* ``steps``, ``step_size`` (with ``step_units``: an absolute length or a fraction of ``r``), ``step_rule``
  (``l2``: the per-sample l2-normalised gradient; ``sign``: its sign) and ``init`` (``zero``, ``uniform`` in
  the ball, ``gaussian`` projected onto it).

A perturber only chooses ``delta``: how the regression target follows it (``invariant`` / ``equivariant`` /
``equivariant-detached``) is the loss's ``target_mode`` (:mod:`atdiff.losses`).

A perturber is called by a loss as ``perturber(closure, x0, t, process, generator=...) -> delta`` where
``closure(delta) -> (B,)`` is the per-sample loss at the perturbed input. The attack differentiates with
``torch.autograd.grad`` with respect to ``delta`` only, so model parameter gradients never change.
The free-AT training loop (:func:`atdiff.train.free_at_step`) reuses :meth:`Perturber.radius_for`,
:meth:`Perturber.init_delta` and :meth:`Perturber.ascend`: one ascent step per pass, so it takes the single-step
kind ``fgsm`` and the number of passes ``K`` is its own argument.

Presets: :func:`input_perturbation` (Ning et al. 2023), :func:`paper_at` (Wang et al. 2025, Algorithm 1's
settings) and :func:`kl_ball_at` (the DRO ball of KL radius ``eta0``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from .processes import Process, expand_like
from .validate import check_choice

__all__ = [
    "KINDS", "NORMS", "BUDGETS", "INITS", "STEP_RULES", "STEP_UNITS", "PAPER_REPLAY", "PAPER_TARGET_MODE",
    "GRAD_NORM_FLOOR",
    "rms_radius", "noise_rms_radius", "kl_ball_radius", "mean_shift_kl", "gaussian_std",
    "per_sample_norm", "project_l2", "project_linf", "delta_gradient", "Perturber",
    "input_perturbation", "paper_at", "kl_ball_at",
]

KINDS = ("none", "gaussian", "fgsm", "pgd")
NORMS = ("l2", "linf")
BUDGETS = ("absolute", "rms", "noise-rms", "kl")
INITS = ("zero", "uniform", "gaussian")
STEP_RULES = ("l2", "sign")
STEP_UNITS = ("absolute", "radius")
#: Algorithm 1's number of passes per minibatch in free AT (the authors' recipe)
PAPER_REPLAY = 3
#: the target mode of the authors' recipe: the equivariant target with delta detached
PAPER_TARGET_MODE = "equivariant-detached"
#: the floor of the l2 normalisation ``g / max(||g||, floor)`` (the authors' value): a sample whose gradient is
#: smaller takes a proportionally shorter step instead of a full step in a direction set by round-off
GRAD_NORM_FLOOR = 1e-8

_ASCENT = ("fgsm", "pgd")


# --- budgets: one formula, one function ------------------------------------------------------------------
def rms_radius(rms: float | Tensor, d: int) -> float | Tensor:
    """The l2 radius of a per-pixel RMS budget: ``rms * sqrt(d)`` (``d`` = numbers per sample)."""
    return rms * math.sqrt(d)


def noise_rms_radius(gamma: float | Tensor, sigma: float | Tensor, d: int) -> float | Tensor:
    """The l2 radius of a per-pixel RMS of ``gamma * sigma_t`` (Input Perturbation): ``gamma sigma sqrt(d)``.
    """
    return rms_radius(gamma * sigma, d)


def kl_ball_radius(eta0: float | Tensor, sigma: float | Tensor) -> float | Tensor:
    """The l2 radius of the KL ball: ``sqrt(2 eta0) * sigma_t = sqrt(2 eta0 (1 - abar_t))`` for VP.

    A mean shift ``delta`` of ``N(m, sigma^2 I)`` has ``KL = ||delta||^2 / (2 sigma^2)``
    (:func:`mean_shift_kl`), so ``KL <= eta0`` exactly when ``||delta|| <= kl_ball_radius(eta0, sigma)``.
    """
    return math.sqrt(2 * eta0) * sigma if not isinstance(eta0, Tensor) else (2 * eta0).sqrt() * sigma


def mean_shift_kl(delta_norm: float | Tensor, sigma: float | Tensor) -> float | Tensor:
    """``KL(N(m + delta, sigma^2 I) || N(m, sigma^2 I)) = ||delta||^2 / (2 sigma^2)``, the inverse of
    :func:`kl_ball_radius`."""
    return delta_norm**2 / (2 * sigma**2)


def gaussian_std(radius: float | Tensor, d: int) -> float | Tensor:
    """Per-coordinate standard deviation of a Gaussian whose squared l2 norm has mean ``radius^2``."""
    return radius / math.sqrt(d)


# --- per-sample geometry ---------------------------------------------------------------------------------
def per_sample_norm(x: Tensor, norm: str = "l2") -> Tensor:
    """The ``l2`` or ``linf`` norm of each sample of ``x`` ``(B, ...)``. Shape ``(B,)``."""
    flat = x.flatten(1)
    if norm == "l2":
        return torch.linalg.vector_norm(flat, ord=2, dim=1)
    if norm == "linf":
        return flat.abs().amax(1) if flat.shape[1] else flat.new_zeros(flat.shape[0])
    raise ValueError(f"norm: expected one of {NORMS}, got {norm!r}")


def project_l2(delta: Tensor, radius: Tensor) -> Tensor:
    """Project each sample of ``delta`` ``(B, ...)`` onto the l2 ball of its radius ``(B,)``."""
    n = per_sample_norm(delta, "l2")
    factor = (radius / n.clamp_min(torch.finfo(n.dtype).tiny)).clamp(max=1.0)
    return delta * expand_like(factor, delta)


def project_linf(delta: Tensor, radius: Tensor) -> Tensor:
    """Clamp each sample of ``delta`` ``(B, ...)`` to the linf ball (box) of its radius ``(B,)``."""
    r = expand_like(radius, delta)
    return torch.maximum(torch.minimum(delta, r), -r)


def _direction(g: Tensor, rule: str) -> Tensor:
    """Ascent direction of unit l2 norm (rule ``l2``) or unit linf norm (rule ``sign``), per sample."""
    if rule == "sign":
        return g.sign()
    n = per_sample_norm(g, "l2")
    return g / expand_like(n.clamp_min(GRAD_NORM_FLOOR), g)


_choice = check_choice


def _nonneg(value: float, name: str) -> None:
    bad_type = not isinstance(value, numbers.Real) or isinstance(value, bool)
    if bad_type or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class Perturber:
    """Chooses ``delta`` for a batch; see the module docstring for the knobs.

    Knobs a kind does not use must stay ``None`` (e.g. ``steps`` for ``gaussian``): setting them is an error,
    never a silent no-op. Defaults for the ascent kinds: ``init="zero"``, ``step_rule`` matching the norm
    (``l2`` -> ``"l2"``, ``linf`` -> ``"sign"``), ``fgsm``: one step of length ``r``; ``pgd``: steps of
    length ``2.5 r / steps`` (Madry et al.). Only the ``absolute`` budget has a ``linf`` form (a linf radius
    is already per pixel; the KL ball is an l2 ball); ``gaussian`` is l2 only.
    """

    kind: str
    norm: str = "l2"
    budget: str = "absolute"
    radius: float | None = None
    steps: int | None = None
    step_size: float | None = None
    step_units: str | None = None
    step_rule: str | None = None
    init: str | None = None

    def __post_init__(self) -> None:
        _choice(self.kind, KINDS, "kind")
        _choice(self.norm, NORMS, "norm")
        _choice(self.budget, BUDGETS, "budget")
        if self.init is not None:
            _choice(self.init, INITS, "init")
        if self.step_rule is not None:
            _choice(self.step_rule, STEP_RULES, "step_rule")
        if self.step_units is not None:
            _choice(self.step_units, STEP_UNITS, "step_units")
        if self.radius is not None:
            _nonneg(self.radius, "radius")
        if self.step_size is not None:
            _nonneg(self.step_size, "step_size")
        if self.steps is not None and (not isinstance(self.steps, int) or isinstance(self.steps, bool)
                                       or self.steps < 1):
            raise ValueError(f"steps: expected an integer >= 1, got {self.steps!r}")
        if self.kind in ("none", "gaussian"):
            self._check_unused(("steps", "step_size", "step_units", "step_rule", "init"))
        if self.kind == "none":
            self._check_unused(("radius",))
            # no delta: a norm or budget other than the default would be silently ignored
            defaults = {f.name: f.default for f in fields(self)}
            for name in ("norm", "budget"):
                if getattr(self, name) != defaults[name]:
                    raise ValueError(f"{name}: not used by kind='none' (no perturbation); leave it at "
                                     f"{defaults[name]!r}, got {getattr(self, name)!r}")
            return
        if self.radius is None:
            raise ValueError(f"radius: required for kind={self.kind!r}")
        if self.norm == "linf" and self.budget != "absolute":
            raise ValueError(f"budget: {self.budget!r} defines an l2 radius; with norm='linf' use "
                             "budget='absolute' (a linf radius is already per pixel)")
        if self.kind == "gaussian":
            if self.norm != "l2":
                raise ValueError("norm: kind='gaussian' draws an isotropic Gaussian; only 'l2' is defined")
            return
        self._resolve_ascent_defaults()

    def _check_unused(self, names: tuple[str, ...]) -> None:
        for name in names:
            if getattr(self, name) is not None:
                raise ValueError(f"{name}: not used by kind={self.kind!r}; leave it None")

    def _resolve_ascent_defaults(self) -> None:
        if self.kind == "fgsm" and self.steps not in (None, 1):
            raise ValueError(f"steps: kind='fgsm' makes exactly one step, got {self.steps!r}; use kind='pgd'")
        steps = 1 if self.steps is None else self.steps
        units = self.step_units
        size = self.step_size
        if size is None:
            if units == "absolute":
                raise ValueError("step_size: required with step_units='absolute'")
            size, units = (1.0 if self.kind == "fgsm" else 2.5 / steps), "radius"
        if size == 0:
            raise ValueError(f"step_size: an ascent perturber ({self.kind!r}) needs a step > 0; a zero step never "
                             "moves delta (use kind='none' for no perturbation)")
        set_ = object.__setattr__
        set_(self, "steps", steps)
        set_(self, "step_size", float(size))
        set_(self, "step_units", units or "absolute")
        set_(self, "step_rule", self.step_rule or ("l2" if self.norm == "l2" else "sign"))
        set_(self, "init", self.init or "zero")

    # --- pieces (used by __call__ and by free AT) -----------------------------------------------------
    def radius_for(self, x0: Tensor, t: Tensor, process: Process) -> Tensor:
        """Per-sample radius ``r`` ``(B,)`` in ``x0``'s dtype and device (0 for kind ``none``)."""
        b, d = x0.shape[0], x0[0].numel()
        if self.kind == "none":
            return x0.new_zeros(b)
        if self.budget in ("absolute", "rms"):
            value = self.radius if self.budget == "absolute" else rms_radius(self.radius, d)
            return x0.new_full((b,), value)
        sigma = process.sigma(t).to(device=x0.device, dtype=x0.dtype).expand(b)
        if self.budget == "kl":
            return kl_ball_radius(self.radius, sigma)
        return noise_rms_radius(self.radius, sigma, d)

    def project(self, delta: Tensor, radius: Tensor) -> Tensor:
        """Project ``delta`` ``(B, ...)`` onto the per-sample ``norm`` balls of ``radius`` ``(B,)``."""
        return project_l2(delta, radius) if self.norm == "l2" else project_linf(delta, radius)

    def step_length(self, radius: Tensor) -> Tensor:
        """Per-sample step length ``(B,)`` (l2 length for rule ``l2``, linf length for rule ``sign``)."""
        if self.step_units == "radius":
            return self.step_size * radius
        return torch.full_like(radius, self.step_size)

    def init_delta(self, x0: Tensor, radius: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The starting ``delta`` ``(B, ...)``: zero, uniform in the ball, or Gaussian (per-coordinate scale
        ``r / sqrt(d)`` for l2, ``r`` for linf) projected onto the ball; for kind ``gaussian`` the draw
        ``gaussian_std(r, d) * xi`` itself."""
        if self.kind == "none" or (self.kind in _ASCENT and self.init == "zero"):
            return torch.zeros_like(x0)
        d = x0[0].numel()
        xi = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        if self.kind == "gaussian":
            return xi * expand_like(gaussian_std(radius, d), x0)
        if self.init == "gaussian":
            scale = gaussian_std(radius, d) if self.norm == "l2" else radius
            return self.project(xi * expand_like(scale, x0), radius)
        if self.norm == "linf":
            u = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            return (2 * u - 1) * expand_like(radius, x0)
        u = torch.rand(x0.shape[0], generator=generator, device=x0.device, dtype=x0.dtype)
        r = radius * u ** (1.0 / d)  # uniform in the l2 ball: radius ~ r U^(1/d)
        return _direction(xi, "l2") * expand_like(r, x0)

    def ascend(self, delta: Tensor, grad: Tensor, radius: Tensor) -> Tensor:
        """One ascent step ``delta + step * direction(grad)``, projected. Samples whose gradient holds NaN or
        infinity keep their ``delta`` (projected). Shapes: ``delta``, ``grad`` ``(B, ...)``, ``radius``
        ``(B,)``."""
        finite = torch.isfinite(grad.flatten(1)).all(1).reshape(-1, *([1] * (grad.ndim - 1)))
        g = torch.where(finite, grad, torch.zeros_like(grad))
        stepped = delta + expand_like(self.step_length(radius), delta) * _direction(g, self.step_rule)
        return self.project(stepped, radius)

    # --- the loss hook ------------------------------------------------------------------------------------
    def __call__(self, closure: Callable[[Tensor], Tensor], x0: Tensor, t: Tensor, process: Process, *,
                 generator: torch.Generator | None = None) -> Tensor:
        """Choose ``delta`` ``(B, ...)`` (detached) for a batch ``x0`` ``(B, ...)`` at times ``t`` ``(B,)``.

        ``closure(delta) -> (B,)`` is the per-sample loss at ``x_t + delta``; ascent kinds maximise it with
        ``steps`` projected steps from ``init``, differentiating with respect to ``delta`` only.
        """
        radius = self.radius_for(x0, t, process)
        delta = self.init_delta(x0, radius, generator)
        if self.kind not in _ASCENT:
            return delta
        for _ in range(self.steps):
            delta = self.ascend(delta, delta_gradient(closure, delta), radius)
        return delta.detach()


def delta_gradient(closure: Callable[[Tensor], Tensor], delta: Tensor) -> Tensor:
    """``d sum(closure(delta)) / d delta`` through ``torch.autograd.grad``, so no parameter ``.grad`` is
    touched. Shape of ``delta``."""
    d = delta.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(closure(d).sum(), d)
    return g


# --- presets ---------------------------------------------------------------------------------------------
def input_perturbation(gamma: float = 0.1) -> Perturber:
    """Input Perturbation (Ning et al. 2023): ``x~ = sqrt(abar) x0 + sqrt(1-abar)(eps + gamma xi)`` with the
    clean target ``eps``, i.e. ``delta = gamma sigma_t xi``; the loss keeps its default ``target_mode="invariant"``.
    """
    return Perturber("gaussian", norm="l2", budget="noise-rms", radius=gamma)


def paper_at() -> Perturber:
    """The perturbation of Wang et al. (2025), Algorithm 1, as the authors run it: one l2-normalised ascent step
    of length 0.1 per pass from ``delta = 0``, inside the l2 ball of per-pixel RMS 0.1 (radius ``0.1 sqrt(d)``).

    Pair it with ``free_at_step(..., replay=PAPER_REPLAY)`` (``K = 3`` passes, so ``||delta|| <= 0.2`` and the
    projection never fires) and a loss with ``target_mode=PAPER_TARGET_MODE`` (the detached equivariant
    target). In :func:`atdiff.train.train_step` the same perturber is FGSM adversarial training with that step.
    """
    return Perturber("fgsm", norm="l2", budget="rms", radius=0.1, step_size=0.1, step_units="absolute",
                     step_rule="l2", init="zero")


def kl_ball_at(eta0: float, *, steps: int = 1, step_fraction: float | None = None, init: str = "zero"
               ) -> Perturber:
    """Ascent inside the KL ball of radius ``eta0`` around ``q(x_t | x0)``: l2 radius ``sqrt(2 eta0) sigma_t``.

    ``steps = 1`` gives the single-step kind ``fgsm`` (usable by free AT, one step per pass), more steps ``pgd``.
    ``step_fraction`` is the step length in units of that radius (default: ``1`` for one step, which from zero
    lands on the sphere; ``2.5 / steps`` for PGD). The DRO objective's per-step KL is the loss with the full
    ``target_mode="equivariant"`` (up to the factor ``c_t d``, docs/objective.md); with the detached target and
    free AT this is a different algorithm from the DRO ideal (docs/algorithm.md).
    """
    _nonneg(eta0, "eta0")
    kind = "fgsm" if steps == 1 else "pgd"
    return Perturber(kind, norm="l2", budget="kl", radius=eta0, steps=None if kind == "fgsm" else steps,
                     step_size=step_fraction, step_units="radius", step_rule="l2", init=init)

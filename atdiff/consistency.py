"""Consistency models: distillation (CD), training (CT), improved CT (iCT) and their adversarial training (CM-AT).

Setting (Song et al. 2023): the VE / EDM path ``x = x0 + sigma z`` on ``sigma in [sigma_min, sigma_max]``
(:class:`~atdiff.processes.VE`, time = sigma), the Karras levels ``sigma_1 < ... < sigma_N`` (:func:`karras_sigmas`)
and a consistency function ``f(x, sigma)`` with ``f(x, sigma_min) = x`` (:class:`atdiff.precond.ConsistencyModel`).

Every loss here follows the loss protocol of :mod:`atdiff.losses`, so :func:`atdiff.train.train_step`,
:func:`atdiff.train.free_at_step` and every perturber work unchanged:

* ``record = loss.draw(x0)`` -- a :class:`ConsistencyDraw`: ``t = sigma_{n+1}`` (the student's level, the one the
  perturbers' budgets see), ``noise = z``, ``weight = None``, ``s = sigma_n`` (the target's level) and ``seed``
  (the dropout seed shared by the online and the target network; see :func:`shared_dropout`);
* ``loss.evaluate(model, x0, record, delta) -> (B,)`` -- ``lambda(sigma_n) d(f_theta(x_{n+1} + delta, sigma_{n+1}),
  f_target(x^_n, sigma_n))``, per sample. CT: ``x^_n = x0 + sigma_n z`` (the same ``z``); CD: one Euler or Heun step
  of the teacher's probability-flow ODE from ``x_{n+1}`` to ``sigma_n`` (:func:`euler_step`, :func:`heun_step`).
  The target network is the EMA ``theta^-`` (:class:`TargetEMA`) or, with ``target=None`` (iCT), the online network
  under stop-gradient; its output never carries a parameter gradient.
* ``loss.update(model)`` after each parameter update moves the target EMA with ``mu(k)`` and advances the curriculum
  step ``k`` (:class:`Curriculum`); pass ``ema=chain_updates(eval_ema, loss)`` to the training steps to do both.
  ``loss.state_dict()`` holds the curriculum and the target for resuming.

CM-AT (Wang et al. 2025, Sec. 4: the consistency target meets the same train/sample mismatch as diffusion). The
perturber's ``delta`` is a perturbation of the student's input ``x_{n+1}``; in noise units it is ``dz = delta /
sigma_{n+1}``. The loss's ``target_mode`` says how the target follows it:

* ``invariant``: the target network sees the clean ``x^_n`` (its output is the one without perturbation);
* ``equivariant``: the target is built from the shifted noise ``z + dz`` -- the perturbed input taken as a genuine
  sample with the same ``x0``: CT ``x^_n + (sigma_n / sigma_{n+1}) delta``, CD the teacher step from
  ``x_{n+1} + delta``; the ``delta``-gradient flows through the target as well (never a parameter gradient);
* ``equivariant-detached``: the same target input with ``delta`` detached (the paper's choice for diffusion).

``perturb="target"`` is the variant that leaves the student's input clean and perturbs the target's:
``x^_n + (sigma_n / sigma_{n+1}) delta`` (the same noise shift, so KL-ball and noise-RMS budgets computed at
``sigma_{n+1}`` are exactly those of level ``sigma_n``); the attack then ascends through the target network.

Distances (:func:`consistency_distance`): ``l2`` (mean squared error per sample), ``l1`` (mean absolute error) and
``pseudo-huber`` ``sqrt(||a - b||^2 + c^2) - c`` with ``c = 0.00054 sqrt(d)`` (Song & Dhariwal 2023).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .losses import TARGET_MODES
from .param import convert, predict, prediction_of, unwrap
from .perturb import PAPER_REPLAY, PAPER_TARGET_MODE, Perturber, kl_ball_at, paper_at
from .processes import VE, Process, expand_like
from .validate import check_choice, check_int, check_real

__all__ = [
    "DISTANCES", "SOLVERS", "SAMPLINGS", "WEIGHTINGS", "PERTURB_SIDES", "CURRICULA", "ConsistencyDraw",
    "karras_sigmas", "consistency_distance", "pseudo_huber_c", "euler_step", "heun_step", "teacher_step",
    "ct_num_levels", "ct_ema_decay", "ict_num_levels", "lognormal_level_probs", "level_weights", "Curriculum",
    "TargetEMA", "shared_dropout", "ConsistencyLoss", "chain_updates", "cd_loss", "ct_loss", "ict_loss",
    "cm_at_preset", "CM_AT_PRESETS",
]

DISTANCES = ("l2", "l1", "pseudo-huber")
SOLVERS = ("euler", "heun")
SAMPLINGS = ("uniform", "lognormal")
WEIGHTINGS = ("uniform", "inverse-gap")
PERTURB_SIDES = ("student", "target")
CURRICULA = ("fixed", "ct", "ict")


class ConsistencyDraw(NamedTuple):
    """What a consistency loss draws per minibatch: the student's level ``t = sigma_{n+1}`` ``(B,)``, the noise
    ``z`` ``(B, ...)``, importance weights (always None here), the target's level ``s = sigma_n`` ``(B,)`` and the
    dropout ``seed`` shared by both networks (None: no seeding). Passed back unchanged for every free-AT pass."""

    t: Tensor
    noise: Tensor
    weight: Tensor | None = None
    s: Tensor | None = None
    seed: int | None = None


# --- discretisation and distances ------------------------------------------------------------------------
def karras_sigmas(N: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """The ``N`` increasing levels ``sigma_i = (sigma_min^(1/rho) + (i-1)/(N-1) (sigma_max^(1/rho) -
    sigma_min^(1/rho)))^rho``, ``i = 1..N``, float64 ``(N,)``; the end points are exactly ``sigma_min`` and
    ``sigma_max``."""
    N = check_int(N, "N", 2)
    sigma_min = check_real(sigma_min, "sigma_min", 0.0, open_min=True)
    sigma_max = check_real(sigma_max, "sigma_max", 0.0, open_min=True)
    if sigma_min >= sigma_max:
        raise ValueError(f"sigma_min: must be below sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    rho = check_real(rho, "rho", 0.0, open_min=True)
    ramp = torch.linspace(0, 1, N, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sig = (lo + ramp * (hi - lo)) ** rho
    sig[0], sig[-1] = sigma_min, sigma_max
    return sig


def pseudo_huber_c(d: int) -> float:
    """iCT's pseudo-Huber constant ``c = 0.00054 sqrt(d)`` for ``d`` dimensions per sample."""
    return 0.00054 * math.sqrt(check_int(d, "d", 1))


def consistency_distance(a: Tensor, b: Tensor, distance: str = "l2", c: float | None = None) -> Tensor:
    """Per-sample distance ``(B,)`` between ``a`` and ``b`` ``(B, ...)``: ``l2`` mean squared error, ``l1`` mean
    absolute error, ``pseudo-huber`` ``sqrt(||a - b||^2 + c^2) - c`` (``c`` defaults to :func:`pseudo_huber_c`)."""
    check_choice(distance, DISTANCES, "distance")
    diff = (a - b).flatten(1)
    if distance == "l2":
        return (diff**2).mean(1)
    if distance == "l1":
        return diff.abs().mean(1)
    c = pseudo_huber_c(diff.shape[1]) if c is None else c
    return ((diff**2).sum(1) + c * c).sqrt() - c


# --- the teacher's ODE step (VE: dx/dsigma = eps_hat) -------------------------------------------------------
def euler_step(model: Callable, x: Tensor, t: Tensor, s: Tensor, process: Process, *,
               cond: Mapping[str, Any] | None = None) -> Tensor:
    """One Euler step of the probability-flow ODE ``dx/dsigma = eps_hat(x, sigma)`` from level ``t`` to ``s``
    (VE, time = sigma): ``x + (s - t) eps_hat(x, t)``. Shapes: ``x`` ``(B, ...)``, ``t``, ``s`` ``(B,)``."""
    d = predict(model, x, t, process, "eps", cond)
    return x + expand_like(s - t, x) * d


def heun_step(model: Callable, x: Tensor, t: Tensor, s: Tensor, process: Process, *,
              cond: Mapping[str, Any] | None = None) -> Tensor:
    """One Heun step (second order, EDM's Algorithm 1 without the final Euler exception) from ``t`` to ``s``:
    the Euler step corrected by the average of the slopes at both ends. Two model evaluations."""
    d = predict(model, x, t, process, "eps", cond)
    h = expand_like(s - t, x)
    x_e = x + h * d
    d_next = predict(model, x_e, s, process, "eps", cond)
    return x + h * (0.5 * (d + d_next))


def teacher_step(solver: str, model: Callable, x: Tensor, t: Tensor, s: Tensor, process: Process, *,
                 cond: Mapping[str, Any] | None = None) -> Tensor:
    """:func:`euler_step` or :func:`heun_step` by name."""
    check_choice(solver, SOLVERS, "solver")
    return (euler_step if solver == "euler" else heun_step)(model, x, t, s, process, cond=cond)


# --- curricula ----------------------------------------------------------------------------------------------
def ct_num_levels(k: int, total_steps: int, s0: int = 2, s1: int = 150) -> int:
    """Original CT's ``N(k) = ceil(sqrt(k/K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1`` (``k`` clamped to ``[0, K]``):
    ``N(0) = s0``, ``N(K) = s1 + 1``."""
    k = min(max(int(k), 0), total_steps)
    return math.ceil(math.sqrt(k / total_steps * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1


def ct_ema_decay(k: int, total_steps: int, s0: int = 2, s1: int = 150, mu0: float = 0.9) -> float:
    """Original CT's target EMA decay ``mu(k) = exp(s0 log(mu0) / N(k))``: ``mu(0) = mu0``, rising towards 1."""
    return math.exp(s0 * math.log(mu0) / ct_num_levels(k, total_steps, s0, s1)) if mu0 > 0 else 0.0


def ict_num_levels(k: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's doubling ``N(k) = min(s0 2^floor(k / K'), s1) + 1`` with ``K' = floor(K / (log2 floor(s1/s0) + 1))``:
    ``N(0) = s0 + 1``, ``N(K) = s1 + 1`` (when ``s1 / s0`` is a power of two)."""
    k = min(max(int(k), 0), total_steps)
    stage = max(math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1)), 1)
    return min(s0 * 2 ** (k // stage), s1) + 1


@dataclass
class Curriculum:
    """The discretisation ``N(k)`` and target EMA decay ``mu(k)`` at training step ``k`` (a parameter update).

    ``kind``: ``fixed`` (``N`` and ``mu0`` constant: CD), ``ct`` (:func:`ct_num_levels`, :func:`ct_ema_decay`) or
    ``ict`` (:func:`ict_num_levels`, ``mu = 0``: no EMA target). ``advance(n)`` after updates; ``state_dict`` /
    ``load_state_dict`` for resuming exactly.
    """

    kind: str = "fixed"
    N: int = 18
    mu0: float = 0.95
    s0: int = 2
    s1: int = 150
    total_steps: int = 800_000
    k: int = 0

    def __post_init__(self) -> None:
        check_choice(self.kind, CURRICULA, "kind")
        check_int(self.N, "N", 2)
        check_real(self.mu0, "mu0", 0.0, 1.0, open_max=True)
        check_int(self.total_steps, "total_steps", 1)
        check_int(self.k, "k", 0)
        if self.kind != "fixed":
            check_int(self.s0, "s0", 2 if self.kind == "ct" else 1)
            check_int(self.s1, "s1", self.s0)

    def num_levels(self) -> int:
        """``N(k)``: the number of levels ``sigma_1 < ... < sigma_N`` at the current step."""
        if self.kind == "fixed":
            return self.N
        if self.kind == "ct":
            return ct_num_levels(self.k, self.total_steps, self.s0, self.s1)
        return ict_num_levels(self.k, self.total_steps, self.s0, self.s1)

    def ema_decay(self) -> float:
        """``mu(k)``: the target EMA decay at the current step."""
        if self.kind == "fixed":
            return self.mu0
        if self.kind == "ct":
            return ct_ema_decay(self.k, self.total_steps, self.s0, self.s1, self.mu0)
        return 0.0

    def advance(self, n: int = 1) -> None:
        """Count ``n`` parameter updates."""
        self.k += check_int(n, "n", 0)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "N": self.N, "mu0": self.mu0, "s0": self.s0, "s1": self.s1,
                "total_steps": self.total_steps, "k": self.k}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        restored = Curriculum(**dict(state))  # validated before anything changes
        for key, value in restored.state_dict().items():
            setattr(self, key, value)


def lognormal_level_probs(sigmas: Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
    """iCT's discretised lognormal law of the pair index ``n`` (``sigma_n -> sigma_{n+1}``, ``n = 1..N-1``):
    ``p(n) ~ erf((log sigma_{n+1} - P_mean) / (sqrt 2 P_std)) - erf((log sigma_n - P_mean) / (sqrt 2 P_std))``.
    ``sigmas`` ``(N,)`` increasing; returns ``(N - 1,)`` float64 summing to 1."""
    e = torch.erf((sigmas.double().log() - p_mean) / (math.sqrt(2) * p_std))
    p = e[1:] - e[:-1]
    return p / p.sum()


def level_weights(sigmas: Tensor, weighting: str) -> Tensor:
    """The per-pair loss weights ``lambda(sigma_n)`` ``(N - 1,)``: 1 (``uniform``) or ``1 / (sigma_{n+1} -
    sigma_n)`` (``inverse-gap``, iCT)."""
    check_choice(weighting, WEIGHTINGS, "weighting")
    gaps = sigmas[1:] - sigmas[:-1]
    return torch.ones_like(gaps) if weighting == "uniform" else 1.0 / gaps


# --- target network and shared dropout -----------------------------------------------------------------------
class TargetEMA:
    """The target network ``theta^-`` of CD / CT: a frozen copy updated as ``theta^- <- mu theta^- + (1 - mu)
    theta`` (buffers copied). ``state_dict`` / ``load_state_dict`` for checkpoints."""

    def __init__(self, model: nn.Module) -> None:
        self.model = copy.deepcopy(unwrap(model)).requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, mu: float) -> None:
        online = unwrap(model)
        for p_t, p in zip(self.model.parameters(), online.parameters(), strict=True):
            p_t.lerp_(p.detach(), 1.0 - mu)
        for b_t, b in zip(self.model.buffers(), online.buffers(), strict=True):
            b_t.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])


@contextlib.contextmanager
def shared_dropout(seed: int | None, device: torch.device) -> Iterator[None]:
    """Run the block with the global RNG of ``device`` (and the CPU) seeded by ``seed`` and restored afterwards
    (``torch.random.fork_rng``), so two networks of the same architecture called in such blocks with one seed draw
    the same dropout masks. ``seed=None`` runs the block unchanged."""
    if seed is None:
        yield
        return
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def _frozen_predict(model: Callable, x: Tensor, t: Tensor, process: Process, cond: Mapping[str, Any] | None
                    ) -> Tensor:
    """``x0``-prediction of ``model`` without any parameter gradient; the gradient with respect to ``x`` is kept when
    ``x`` requires it (parameters are detached through ``torch.func.functional_call``)."""
    if not x.requires_grad:
        with torch.no_grad():
            return predict(model, x, t, process, "x0", cond)
    if isinstance(model, nn.Module) and any(p.requires_grad for p in model.parameters()):
        params = {name: p.detach() for name, p in model.named_parameters()}
        out = torch.func.functional_call(model, params, (x, t), dict(cond or {}))
        return convert(out, x, t, process, prediction_of(model), "x0")
    return predict(model, x, t, process, "x0", cond)


# --- the loss -----------------------------------------------------------------------------------------------
class ConsistencyLoss:
    """CD / CT / iCT through the loss protocol (module docstring).

    ``process``: a :class:`~atdiff.processes.VE` (levels between its ``sigma_min`` and ``sigma_max``);
    ``curriculum``: ``N(k)`` and ``mu(k)``; ``teacher``: a denoiser on ``process`` (CD) or None (CT);
    ``solver``: the teacher's step; ``distance``; ``sampling`` of the pair index (``uniform`` or iCT's
    ``lognormal`` with ``p_mean``, ``p_std``); ``weighting`` (``uniform`` or iCT's ``inverse-gap``);
    ``target``: a :class:`TargetEMA` or None (stop-gradient online network); ``target_mode`` and ``perturb``
    (``student`` or ``target``) for CM-AT; ``rho`` of the Karras levels; ``huber_c`` (default ``0.00054 sqrt(d)``);
    ``share_dropout``: seed both networks' dropout identically per record.
    """

    def __init__(self, process: VE, curriculum: Curriculum, *, teacher: Callable | None = None,
                 solver: str = "heun", distance: str = "l2", sampling: str = "uniform", weighting: str = "uniform",
                 target: TargetEMA | None = None, target_mode: str = "invariant", perturb: str = "student",
                 rho: float = 7.0, p_mean: float = -1.1, p_std: float = 2.0, huber_c: float | None = None,
                 share_dropout: bool = True) -> None:
        if not isinstance(process, VE):
            raise ValueError(f"process: consistency models live on the VE / EDM path (atdiff.processes.VE), got "
                             f"{type(process).__name__}")
        if not isinstance(curriculum, Curriculum):
            raise ValueError(f"curriculum: expected an atdiff.consistency.Curriculum, got {type(curriculum).__name__}")
        for value, choices, name in ((solver, SOLVERS, "solver"), (distance, DISTANCES, "distance"),
                                     (sampling, SAMPLINGS, "sampling"), (weighting, WEIGHTINGS, "weighting"),
                                     (target_mode, TARGET_MODES, "target_mode"), (perturb, PERTURB_SIDES, "perturb")):
            check_choice(value, choices, name)
        if teacher is not None:
            prediction_of(teacher)
        karras_sigmas(2, process.sigma_min, process.sigma_max, rho)  # checks rho and the level range
        self.process, self.curriculum, self.teacher, self.solver = process, curriculum, teacher, solver
        self.distance, self.sampling, self.weighting, self.target = distance, sampling, weighting, target
        self.target_mode, self.perturb, self.rho = target_mode, perturb, float(rho)
        self.p_mean, self.p_std = check_real(p_mean, "p_mean"), check_real(p_std, "p_std", 0.0, open_min=True)
        self.huber_c = None if huber_c is None else check_real(huber_c, "huber_c", 0.0, open_min=True)
        self.share_dropout = bool(share_dropout)

    def sigmas(self) -> Tensor:
        """The current levels ``sigma_1 < ... < sigma_N(k)`` (float64)."""
        return karras_sigmas(self.curriculum.num_levels(), self.process.sigma_min, self.process.sigma_max, self.rho)

    def draw(self, x0: Tensor, generator: torch.Generator | None = None) -> ConsistencyDraw:
        """Draw the pair index ``n`` (uniform or lognormal over ``1..N-1``), the noise ``z`` and a dropout seed."""
        sigmas = self.sigmas()
        where = generator.device if generator is not None else torch.device("cpu")
        if self.sampling == "uniform":
            n = torch.randint(0, len(sigmas) - 1, (x0.shape[0],), generator=generator, device=where)
        else:
            p = lognormal_level_probs(sigmas, self.p_mean, self.p_std)
            n = torch.multinomial(p.to(where), x0.shape[0], replacement=True, generator=generator)
        n = n.cpu()
        z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=where)) if self.share_dropout else None
        to = {"device": x0.device, "dtype": x0.dtype}
        return ConsistencyDraw(sigmas[n + 1].to(**to), z, None, sigmas[n].to(**to), seed)

    def _target_input(self, x0: Tensor, record: ConsistencyDraw, delta: Tensor | None,
                      cond: Mapping[str, Any] | None) -> Tensor:
        t, s, z = record.t, record.s, record.noise
        shift = None
        if delta is not None and (self.perturb == "target" or self.target_mode != "invariant"):
            shift = delta.detach() if (self.perturb == "student" and self.target_mode == "equivariant-detached") \
                else delta
        if self.teacher is None:
            x_s = x0 + expand_like(s, x0) * z
            return x_s if shift is None else x_s + expand_like(s / t, x0) * shift
        x_t = x0 + expand_like(t, x0) * z
        if shift is not None and self.perturb == "student":  # the teacher's step from the perturbed input
            x_t = x_t + shift
        if x_t.requires_grad:
            x_s = teacher_step(self.solver, _Frozen(self.teacher), x_t, t, s, self.process, cond=cond)
        else:
            with torch.no_grad():
                x_s = teacher_step(self.solver, self.teacher, x_t, t, s, self.process, cond=cond)
        if shift is not None and self.perturb == "target":
            x_s = x_s + expand_like(s / t, x0) * shift
        return x_s

    def evaluate(self, model: Callable, x0: Tensor, record: ConsistencyDraw, delta: Tensor | None = None, *,
                 cond: Mapping[str, Any] | None = None) -> Tensor:
        """Per-sample ``lambda(sigma_n) d(f_theta(x0 + sigma_{n+1} z [+ delta], sigma_{n+1}), f_target(x^_n,
        sigma_n))`` ``(B,)``; ``delta`` ``(B, ...)`` per ``perturb`` and ``target_mode`` (module docstring)."""
        t, s = record.t, record.s
        if s is None:
            raise ValueError("record: a consistency loss needs the target level s (draw with ConsistencyLoss.draw)")
        x_t = x0 + expand_like(t, x0) * record.noise
        if delta is not None and self.perturb == "student":
            x_t = x_t + delta
        with shared_dropout(record.seed, x0.device):
            student = predict(model, x_t, t, self.process, "x0", cond)
        x_s = self._target_input(x0, record, delta, cond)
        net = model if self.target is None else self.target.model
        if self.target is not None and isinstance(model, nn.Module):
            net.train(model.training)  # the same dropout behaviour as the student
        with shared_dropout(record.seed, x0.device):
            target = _frozen_predict(net, x_s, s, self.process, cond)
        dist = consistency_distance(student, target, self.distance, self.huber_c)
        if self.weighting == "uniform":
            return dist
        return dist / (t - s)

    def observe(self, record: ConsistencyDraw, losses: Tensor) -> None:
        """No importance sampler to feed (the protocol's hook)."""

    def __call__(self, model: Callable, x0: Tensor, *, record: ConsistencyDraw | None = None,
                 perturber: Perturber | None = None, cond: Mapping[str, Any] | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        from .losses import evaluate_loss, importance_weighted

        record = self.draw(x0, generator) if record is None else record
        return importance_weighted(evaluate_loss(self, model, x0, record, perturber=perturber, cond=cond,
                                                 generator=generator), record)

    def update(self, model: nn.Module) -> None:
        """After a parameter update: move the target EMA with ``mu(k)`` and advance ``k``."""
        if self.target is not None:
            self.target.update(model, self.curriculum.ema_decay())
        self.curriculum.advance()

    def state_dict(self) -> dict[str, Any]:
        return {"curriculum": self.curriculum.state_dict(),
                "target": None if self.target is None else self.target.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if (state["target"] is None) != (self.target is None):
            raise ValueError("state: the checkpoint's target network does not match this loss's (EMA vs none)")
        self.curriculum.load_state_dict(state["curriculum"])
        if self.target is not None:
            self.target.load_state_dict(state["target"])


class _Frozen:
    """A model whose parameters get no gradient (inputs still do): for the teacher inside an equivariant attack."""

    def __init__(self, model: Callable) -> None:
        self.model, self.prediction = model, prediction_of(model)

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        if isinstance(self.model, nn.Module) and any(p.requires_grad for p in self.model.parameters()):
            params = {name: p.detach() for name, p in self.model.named_parameters()}
            return torch.func.functional_call(self.model, params, (x, t), cond)
        return self.model(x, t, **cond)


class _Chain:
    def __init__(self, items: tuple) -> None:
        self.items = items

    def update(self, model: nn.Module) -> None:
        for item in self.items:
            item.update(model)


def chain_updates(*items: Any) -> _Chain:
    """One object whose ``update(model)`` calls each item's (e.g. the evaluation :class:`~atdiff.train.EMA` and a
    :class:`ConsistencyLoss`); pass it as ``ema=`` to :func:`~atdiff.train.train_step` / ``free_at_step``. None
    items are skipped."""
    return _Chain(tuple(i for i in items if i is not None))


# --- presets ------------------------------------------------------------------------------------------------
def cd_loss(teacher: Callable, model: nn.Module, process: VE, *, N: int = 18, mu: float = 0.95,
            solver: str = "heun", distance: str = "l2", **kwargs: Any) -> ConsistencyLoss:
    """Consistency distillation (Song et al. 2023; CIFAR-10: ``N = 18``, ``mu = 0.95``, Heun; LPIPS there, a pixel
    distance here) with an EMA target initialised from ``model``."""
    return ConsistencyLoss(process, Curriculum("fixed", N=N, mu0=mu), teacher=teacher, solver=solver,
                           distance=distance, target=TargetEMA(model), **kwargs)


def ct_loss(model: nn.Module, process: VE, *, total_steps: int, s0: int = 2, s1: int = 150, mu0: float = 0.9,
            distance: str = "l2", **kwargs: Any) -> ConsistencyLoss:
    """Consistency training (Song et al. 2023; CIFAR-10: ``s0 = 2``, ``s1 = 150``, ``mu0 = 0.9``, ``K = 800k``) with
    the ``N(k)`` / ``mu(k)`` curriculum and an EMA target."""
    return ConsistencyLoss(process, Curriculum("ct", s0=s0, s1=s1, mu0=mu0, total_steps=total_steps),
                           distance=distance, target=TargetEMA(model), **kwargs)


def ict_loss(process: VE, *, total_steps: int, s0: int = 10, s1: int = 1280, **kwargs: Any) -> ConsistencyLoss:
    """Improved CT (Song & Dhariwal 2023): pseudo-Huber distance, lognormal pair sampling (``P_mean = -1.1``,
    ``P_std = 2``), weighting ``1 / (sigma_{n+1} - sigma_n)``, no EMA target, the doubling ``N(k)``."""
    opts = {"distance": "pseudo-huber", "sampling": "lognormal", "weighting": "inverse-gap", **kwargs}
    return ConsistencyLoss(process, Curriculum("ict", s0=s0, s1=s1, mu0=0.0, total_steps=total_steps), **opts)


def _paper() -> dict[str, Any]:
    return {"perturber": paper_at(), "replay": PAPER_REPLAY, "target_mode": PAPER_TARGET_MODE, "perturb": "student"}


def _paper_target() -> dict[str, Any]:
    return {**_paper(), "target_mode": "invariant", "perturb": "target"}


def _kl(eta0: float = 0.01) -> dict[str, Any]:
    return {"perturber": kl_ball_at(eta0), "replay": PAPER_REPLAY, "target_mode": PAPER_TARGET_MODE,
            "perturb": "student"}


#: CM-AT presets: name -> builder of ``{"perturber", "replay", "target_mode", "perturb"}``
CM_AT_PRESETS: dict[str, Callable[..., dict[str, Any]]] = {"paper": _paper, "paper-target": _paper_target, "kl": _kl}


def cm_at_preset(name: str, **kwargs: Any) -> dict[str, Any]:
    """CM-AT settings mirroring the diffusion presets: ``paper`` (:func:`~atdiff.perturb.paper_at`, free AT with
    ``K = 3`` passes, detached equivariant target), ``paper-target`` (the same ascent on the target's input) and
    ``kl`` (:func:`~atdiff.perturb.kl_ball_at` with ``eta0``, default 0.01). Returns ``{"perturber", "replay",
    "target_mode", "perturb"}``: the last two go to the loss, ``replay`` to ``free_at_step``."""
    check_choice(name, tuple(CM_AT_PRESETS), "name")
    return CM_AT_PRESETS[name](**kwargs)

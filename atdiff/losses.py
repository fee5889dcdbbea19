"""Denoising losses.

The building block is the pure function :func:`denoising_loss`: the per-sample regression loss of a model
at the (possibly perturbed) input ``x_t + delta``, against the target of the chosen parametrisation.

Every loss object follows one protocol (the training steps and the perturbers rely on nothing else):

* ``record = loss.draw(x0, generator)`` -- an explicit record of what is random per minibatch
  (:class:`LossDraw`: times ``t`` ``(B,)``, noise ``(B, ...)``, importance weights ``(B,)`` or None);
* ``loss.evaluate(model, x0, record, delta, cond=...) -> (B,)`` -- the per-sample loss at the perturbation
  ``delta`` (None: clean), without importance weights; the loss owns its target mode;
* ``loss(model, x0, record=..., perturber=..., cond=...) -> (B,)`` -- draw if needed, let the perturber choose
  ``delta`` (:func:`evaluate_loss`), and apply the importance weights (:func:`importance_weighted`);
* ``loss.observe(record, losses)`` -- feed an importance sampler with per-sample losses (a no-op without one);
  the caller calls it, after a DDP all-gather where there is one;
* ``loss.process`` -- the forward process (the perturbers' budgets depend on ``sigma_t``).

Target modes for a perturbed input ``x~ = x_t + delta`` (docs/objective.md; Wang et al. 2025, Sec. 3):

* ``invariant``: the target of the clean pair ``(x0, eps)``;
* ``equivariant``: the target of ``(x0, eps + delta / sigma_t)``, the noise that explains ``x~`` with ``x0``
  fixed (for an eps-model: ``eps + delta / sqrt(1 - abar_t)``); gradient flows through ``delta``;
* ``equivariant-detached``: the same target with ``delta`` detached (the reference recipe).

:class:`HybridLoss` is IDDPM's ``L_simple + lambda L_vlb`` for a learned-variance model, with the same protocol,
so the same perturbers and training steps plug in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .param import PREDICTIONS, convert, learned_range_log_variance, predict, predict_with_variance
from .processes import Process, VPDiscrete, expand_like
from .validate import check_choice, check_finite, check_int, check_real

__all__ = ["TARGET_MODES", "LossDraw", "denoising_target", "perturbed_input", "denoising_loss", "sample_times",
           "DenoisingLoss", "evaluate_loss", "importance_weighted", "check_batch", "normal_kl",
           "discretized_gaussian_log_likelihood", "LossSecondMomentSampler", "HybridLoss"]

TARGET_MODES = ("invariant", "equivariant", "equivariant-detached")


class LossDraw(NamedTuple):
    """What a loss draws once per minibatch: times ``t`` ``(B,)``, noise ``(B, ...)`` and importance weights
    ``(B,)`` (None for the uniform law). Passed back unchanged for each of the ``K`` passes of free AT."""

    t: Tensor
    noise: Tensor
    weight: Tensor | None = None


def check_batch(x0: Tensor, name: str = "x0") -> Tensor:
    """A finite batch ``(B, ...)`` with ``B >= 1`` (entry check of every loss and training step)."""
    check_finite(x0, name)
    if x0.ndim < 1 or x0.shape[0] < 1:
        raise ValueError(f"{name}: expected a batch of shape (B, ...) with B >= 1, got {tuple(x0.shape)}")
    if not x0.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {x0.dtype}")
    return x0


def denoising_target(x0: Tensor, eps: Tensor, t: Tensor, process: Process, kind: str) -> Tensor:
    """The regression target of kind ``eps``, ``x0``, ``v`` or ``score`` for the pair ``(x0, eps)`` at ``t``."""
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    a, s = expand_like(process.alpha(t), x0), expand_like(process.sigma(t), x0)
    if kind == "v":
        return a * eps - s * x0
    if kind == "score":
        return -eps / s
    raise ValueError(f"kind: expected one of {PREDICTIONS}, got {kind!r}")


def perturbed_input(x0: Tensor, eps: Tensor, t: Tensor, process: Process, delta: Tensor | None = None,
                    target_mode: str = "invariant") -> tuple[Tensor, Tensor]:
    """The network input ``x_t + delta`` and the noise target of ``target_mode`` (module docstring).

    Shapes: ``x0``, ``eps``, ``delta`` ``(B, ...)``; ``t`` ``(B,)``. Returns both ``(B, ...)``.
    """
    check_choice(target_mode, TARGET_MODES, "target_mode")
    if t.shape != (x0.shape[0],):
        raise ValueError(f"t: expected shape ({x0.shape[0]},) to match x0, got {tuple(t.shape)}")
    x_t = process.add_noise(x0, eps, t, validate=False)  # checked once at the entry (evaluate_loss)
    eps_target = eps
    if delta is not None:
        if delta.shape != x0.shape:
            raise ValueError(f"delta: expected the shape of x0 {tuple(x0.shape)}, got {tuple(delta.shape)}")
        x_t = x_t + delta
        if target_mode != "invariant":
            d = delta.detach() if target_mode == "equivariant-detached" else delta
            eps_target = eps + d / expand_like(process.sigma(t), x0)
    return x_t, eps_target


def denoising_loss(model: Callable, x0: Tensor, t: Tensor, eps: Tensor, process: Process, *,
                   target: str = "eps", delta: Tensor | None = None, target_mode: str = "invariant",
                   weight: Tensor | None = None, cond: Mapping[str, Any] | None = None) -> Tensor:
    """Per-sample loss ``w(t) * mean ||pred(x_t + delta, t) - target||^2``.

    Shapes: ``x0``, ``eps``, ``delta`` ``(B, ...)``; ``t`` ``(B,)``; ``weight`` ``(B,)`` or None.
    Returns ``(B,)``. The model's own prediction kind is converted to ``target`` through
    :func:`atdiff.param.predict`; ``cond`` goes to the network untouched. Shapes are checked here; finiteness
    and the range of ``t`` are checked once per batch by :func:`evaluate_loss` (this function is the inner loop
    of an attack).
    """
    x_t, eps_target = perturbed_input(x0, eps, t, process, delta, target_mode)
    pred = predict(model, x_t, t, process, target, cond)
    err = (pred - denoising_target(x0, eps_target, t, process, target)) ** 2
    loss = err.flatten(1).mean(1)
    return loss if weight is None else loss * weight


def sample_times(process: Process, n: int, *, device: torch.device | str | None = None,
                 generator: torch.Generator | None = None, t_min: float | None = None) -> Tensor:
    """Training times, uniform over the process: integers ``1..T`` for :class:`VPDiscrete`, else uniform on
    ``[t_min, t_max]`` (``t_min`` defaults to ``1e-3 * t_max`` for continuous processes). Shape ``(n,)``."""
    if isinstance(process, VPDiscrete):
        return torch.randint(1, process.T + 1, (n,), device=device, generator=generator).to(torch.float32)
    lo = 1e-3 * process.t_max if t_min is None else float(t_min)
    u = torch.rand(n, device=device, generator=generator)
    return lo + (process.t_max - lo) * u


@dataclass(frozen=True)
class DenoisingLoss:
    """The denoising loss with its sampling of ``t`` and ``eps`` (the protocol of the module docstring).

    ``target``: the regression target (``eps``, ``x0``, ``v``, ``score``); ``target_mode``: how the target
    follows a perturbation of the input (``invariant``, ``equivariant``, ``equivariant-detached``: the
    paper's recipe); ``weighting(t) -> (B,)`` multiplies the per-sample loss (None: uniform).
    """

    process: Process
    target: str = "eps"
    target_mode: str = "invariant"
    weighting: Callable[[Tensor], Tensor] | None = None

    def __post_init__(self) -> None:
        check_choice(self.target, PREDICTIONS, "target")
        check_choice(self.target_mode, TARGET_MODES, "target_mode")

    def draw(self, x0: Tensor, generator: torch.Generator | None = None) -> LossDraw:
        """Draw training times ``(B,)`` (uniform, :func:`sample_times`) and noise ``(B, ...)`` for ``x0``."""
        t = sample_times(self.process, x0.shape[0], device=x0.device, generator=generator)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return LossDraw(t.to(x0.dtype), eps)

    def evaluate(self, model: Callable, x0: Tensor, record: LossDraw, delta: Tensor | None = None, *,
                 cond: Mapping[str, Any] | None = None) -> Tensor:
        """The per-sample loss ``(B,)`` at the drawn ``record`` and perturbation ``delta`` (no importance
        weights)."""
        weight = None if self.weighting is None else self.weighting(record.t)
        return denoising_loss(model, x0, record.t, record.noise, self.process, target=self.target, delta=delta,
                              target_mode=self.target_mode, weight=weight, cond=cond)

    def observe(self, record: LossDraw, losses: Tensor) -> None:
        """No importance sampler to feed (the protocol's hook)."""

    def __call__(self, model: Callable, x0: Tensor, *, record: LossDraw | None = None, perturber=None,
                 cond: Mapping[str, Any] | None = None, generator: torch.Generator | None = None) -> Tensor:
        record = self.draw(x0, generator) if record is None else record
        return importance_weighted(evaluate_loss(self, model, x0, record, perturber=perturber, cond=cond,
                                                 generator=generator), record)


def importance_weighted(losses: Tensor, record: LossDraw) -> Tensor:
    """Per-sample ``losses`` ``(B,)`` times the record's importance weights (as is without them)."""
    return losses if record.weight is None else losses * record.weight.to(losses.dtype)


def evaluate_loss(loss: Any, model: Callable, x0: Tensor, record: LossDraw, *, perturber=None,
                  cond: Mapping[str, Any] | None = None, generator: torch.Generator | None = None) -> Tensor:
    """One evaluation of a loss object (the protocol of the module docstring) on ``x0`` ``(B, ...)`` at the drawn
    ``record``: the ``perturber`` (if any) picks ``delta`` from the closure ``delta -> per-sample loss``, and the
    per-sample loss ``(B,)`` at that ``delta`` is returned, without importance weights. The single place where a
    perturber meets a loss, and where its inputs are checked (finite ``x0``, times in the process's range, finite
    noise of ``x0``'s shape) before the inner loop runs."""
    check_batch(x0)
    check_record(record, x0, loss.process)
    if perturber is None:
        return loss.evaluate(model, x0, record, cond=cond)
    delta = perturber(lambda d: loss.evaluate(model, x0, record, d, cond=cond), x0, record.t, loss.process,
                      generator=generator)
    return loss.evaluate(model, x0, record, delta, cond=cond)


def check_record(record: LossDraw, x0: Tensor, process: Process) -> None:
    """Validate a drawn record against the batch ``x0`` (entry check; synchronises with the device)."""
    if not hasattr(record, "t") or not hasattr(record, "noise"):
        raise ValueError(f"record: expected a LossDraw (t, noise, weight) from loss.draw, got "
                         f"{type(record).__name__}")
    if record.t.shape != (x0.shape[0],):
        raise ValueError(f"record: t must have shape ({x0.shape[0]},), got {tuple(record.t.shape)}")
    process.check_time(record.t, "record.t")
    if record.noise.shape != x0.shape:
        raise ValueError(f"record: noise must have the shape of x0 {tuple(x0.shape)}, got "
                         f"{tuple(record.noise.shape)}")
    check_finite(record.noise, "record.noise")


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """``KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)))`` elementwise, in nats (broadcasting)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _log_normal_mass(a: Tensor, b: Tensor) -> Tensor:
    """``log(Phi(b) - Phi(a))`` for ``a < b``, from ``log_ndtr`` on the side of the smaller tail (no
    cancellation in either tail; ``torch.special.ndtr`` itself loses digits below ``-5``)."""
    flip = a > 0
    lo, hi = torch.where(flip, -b, a), torch.where(flip, -a, b)
    log_hi = torch.special.log_ndtr(hi)
    ratio = (torch.special.log_ndtr(lo) - log_hi).clamp(max=-1e-300)
    return log_hi + torch.log(-torch.expm1(ratio))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor, bins: int = 256
                                        ) -> Tensor:
    """``log P(bin of x)`` under ``N(mean, exp(log_scale)^2)`` for data in ``[-1, 1]`` quantised to ``bins``
    levels (8 bits: bins of width ``2/255`` centred on the levels; the outer bins extend to ``-inf`` and
    ``+inf``, IDDPM's decoder). Exact normal CDF in log space; probabilities floored at 1e-12 (as IDDPM).
    Elementwise, in nats.
    """
    half = 1.0 / (bins - 1)
    inv = torch.exp(-log_scale)
    upper, lower = inv * (x - mean + half), inv * (x - mean - half)
    edge = 1 - half
    inf = torch.full_like(upper, math.inf)
    upper = torch.where(x > edge, inf, upper)
    lower = torch.where(x < -edge, -inf, lower)
    return _log_normal_mass(lower, upper).clamp_min(math.log(1e-12))


class LossSecondMomentSampler:
    """IDDPM's importance sampler of training times ``1..T``: ``p_t`` proportional to
    ``sqrt(E[L_t^2])`` over the last ``history`` losses at each ``t``, mixed with ``uniform_prob`` of the
    uniform law; uniform until every ``t`` has ``history`` losses. Draws come with the weights
    ``1 / (T p_t)`` that keep the loss estimate unbiased. Stateful; ``state_dict`` for checkpoints.
    """

    def __init__(self, T: int, history: int = 10, uniform_prob: float = 0.001) -> None:
        T, history = check_int(T, "T", 1), check_int(history, "history", 1)
        uniform_prob = check_real(uniform_prob, "uniform_prob", 0.0, 1.0)
        self.T, self.history, self.uniform_prob = T, history, uniform_prob
        self.losses = torch.zeros(T, history, dtype=torch.float64)
        self.counts = torch.zeros(T, dtype=torch.long)

    @property
    def warm(self) -> bool:
        """Whether every time has a full history (before that, sampling is uniform)."""
        return bool((self.counts == self.history).all())

    def probabilities(self) -> Tensor:
        """``p_t`` for ``t = 1..T`` (float64, sums to 1)."""
        if not self.warm:
            return torch.full((self.T,), 1.0 / self.T, dtype=torch.float64)
        w = (self.losses**2).mean(1).sqrt()
        p = w / w.sum()
        return p * (1 - self.uniform_prob) + self.uniform_prob / self.T

    def sample(self, n: int, *, device: torch.device | str | None = None,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``n`` times (float, values ``1..T``) and their weights ``1 / (T p_t)``, both ``(n,)``."""
        p = self.probabilities()
        where = generator.device if generator is not None else torch.device("cpu")
        idx = torch.multinomial(p.to(where), n, replacement=True, generator=generator).cpu()
        weights = 1.0 / (self.T * p[idx])
        t = (idx + 1).to(device=device, dtype=torch.float32)
        return t, weights.to(device=device, dtype=torch.float32)

    def weights(self, t: Tensor) -> Tensor:
        """The importance weights ``1 / (T p_t)`` of times ``t`` ``(B,)`` under the current law."""
        p = self.probabilities()
        return (1.0 / (self.T * p[t.detach().long().cpu() - 1])).to(device=t.device, dtype=t.dtype)

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Record per-sample ``losses`` ``(B,)`` at integer times ``t`` ``(B,)`` in ``1..T`` (the oldest entry
        drops out). Times off the grid and non-finite losses are refused (they would corrupt the law)."""
        t64, l64 = t.detach().double().cpu().reshape(-1), losses.detach().double().cpu().reshape(-1)
        if t64.shape != l64.shape:
            raise ValueError(f"losses: expected one loss per time ({t64.numel()}), got {l64.numel()}")
        if bool(((t64 < 1) | (t64 > self.T) | (t64 != t64.round())).any()):
            raise ValueError(f"t: expected integer times in 1..{self.T}, got range [{t64.min().item()}, "
                             f"{t64.max().item()}]")
        if not bool(torch.isfinite(l64).all()):
            raise ValueError("losses: contains NaN or infinite values")
        for ti, li in zip(t64.long().tolist(), l64.tolist(), strict=True):
            k = ti - 1
            if self.counts[k] == self.history:
                self.losses[k, :-1] = self.losses[k, 1:].clone()
                self.losses[k, -1] = li
            else:
                self.losses[k, self.counts[k]] = li
                self.counts[k] += 1

    def state_dict(self) -> dict:
        return {"losses": self.losses.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.losses.copy_(state["losses"])
        self.counts.copy_(state["counts"])


class HybridLoss:
    """IDDPM's hybrid loss ``L_simple + lambda L_vlb`` for a learned-variance model (``lambda = vlb_weight``).

    The model has ``learned_variance = True`` and returns ``(eps, v)`` (``2 C`` channels, see
    :func:`~atdiff.param.split_learned_variance`); ``v`` in ``[-1, 1]`` sets ``log var = f log beta_t + (1 - f)
    log beta_tilde_t``, ``f = (v + 1) / 2`` (:func:`~atdiff.param.learned_range_log_variance`). Per sample::

        mse  = mean ||eps_hat - eps_target||^2              (the target mode as in DenoisingLoss)
        vb   = KL(q(x_{t-1} | x_in, x0) || p(x_{t-1} | x_in)) / (D log 2)              for t > 1
             = -log p(x0 | x_in) / (D log 2)  (discretised decoder, 8 bits, data in [-1, 1])  for t = 1
        loss = mse + vlb_weight * T * vb

    in bits per dimension, with ``x_in = x_t + delta`` the (perturbed) network input. ``L_vlb`` is the sum
    over the ``T`` steps, so ``lambda L_vlb`` per drawn ``t`` is ``lambda T vb`` (improved-diffusion's
    ``vb * T / 1000`` for ``lambda = 0.001``). In ``vb`` the model mean uses ``eps_hat.detach()`` (only the
    variance learns from it), and the true posterior is that of the clean ``x0`` at the network input (the
    per-step KL of the DRO objective, docs/objective.md); ``beta_tilde_1 = 0`` is replaced by ``beta_tilde_2``
    (IDDPM's clipped log variance).

    ``importance_sampling=True`` draws ``t`` from a :class:`LossSecondMomentSampler` (``time_sampler``): the
    record carries the weights ``1 / (T p_t)``, and the caller feeds the sampler with :meth:`observe`. The loss
    holds no other state; :meth:`state_dict` is the sampler's history.
    """

    def __init__(self, process: VPDiscrete, vlb_weight: float = 0.001, importance_sampling: bool = False,
                 history: int = 10, target_mode: str = "invariant") -> None:
        if not isinstance(process, VPDiscrete):
            raise ValueError(f"process: the hybrid loss needs a VPDiscrete process, got {process!r}")
        check_choice(target_mode, TARGET_MODES, "target_mode")
        self.process, self.vlb_weight = process, check_real(vlb_weight, "vlb_weight", 0.0)
        self.target_mode = target_mode
        self.time_sampler = LossSecondMomentSampler(process.T, history) if importance_sampling else None

    def draw(self, x0: Tensor, generator: torch.Generator | None = None) -> LossDraw:
        """Draw training times ``(B,)`` (uniform on ``1..T``, or importance-sampled with their weights) and noise
        ``(B, ...)``."""
        weight = None
        if self.time_sampler is None:
            t = sample_times(self.process, x0.shape[0], device=x0.device, generator=generator)
        else:
            t, weight = self.time_sampler.sample(x0.shape[0], device=x0.device, generator=generator)
            weight = weight.to(x0.dtype)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return LossDraw(t.to(x0.dtype), eps, weight)

    def terms(self, model: Callable, x0: Tensor, t: Tensor, eps: Tensor, delta: Tensor | None = None, *,
              cond: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
        """The per-sample ``{"mse", "vb", "loss"}``, each ``(B,)`` (unweighted; ``vb`` in bits/dim)."""
        p = self.process
        if bool(((t < 1) | (t > p.T) | (t != t.round())).any()):
            raise ValueError(f"t: the hybrid loss needs integer times in 1..{p.T}")
        x_in, eps_target = perturbed_input(x0, eps, t, p, delta, self.target_mode)
        eps_hat, v = predict_with_variance(model, x_in, t, p, "eps", cond)
        if v is None:
            raise ValueError("model: the hybrid loss needs a model with learned_variance = True")
        mse = ((eps_hat - eps_target) ** 2).flatten(1).mean(1)
        s = t - 1
        x0_hat = convert(eps_hat.detach(), x_in, t, p, "eps", "x0")
        model_mean = p.posterior(x_in, x0_hat, t, s)[0]
        true_mean = p.posterior(x_in, x0, t, s)[0]
        t_clip = t.clamp(min=2)
        log_beta_tilde = p.posterior(x_in, x0, t_clip, t_clip - 1)[1].log()
        log_beta = expand_like(p.transition(s, t)[1] ** 2, x_in).log()
        model_logvar = learned_range_log_variance(v, log_beta, log_beta_tilde)
        kl = normal_kl(true_mean, log_beta_tilde, model_mean, model_logvar).flatten(1).mean(1)
        nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar).flatten(1).mean(1)
        vb = torch.where(t == 1, nll, kl) / math.log(2.0)
        return {"mse": mse, "vb": vb, "loss": mse + (self.vlb_weight * p.T) * vb}

    def evaluate(self, model: Callable, x0: Tensor, record: LossDraw, delta: Tensor | None = None, *,
                 cond: Mapping[str, Any] | None = None) -> Tensor:
        """The per-sample hybrid loss ``(B,)`` at the drawn ``record`` and ``delta`` (no importance weights)."""
        return self.terms(model, x0, record.t, record.noise, delta, cond=cond)["loss"]

    def observe(self, record: LossDraw, losses: Tensor) -> None:
        """Record per-sample (unweighted) ``losses`` ``(B,)`` at the record's times in the importance sampler."""
        if self.time_sampler is not None:
            self.time_sampler.update(record.t, losses)

    def __call__(self, model: Callable, x0: Tensor, *, record: LossDraw | None = None, perturber=None,
                 cond: Mapping[str, Any] | None = None, generator: torch.Generator | None = None) -> Tensor:
        record = self.draw(x0, generator) if record is None else record
        return importance_weighted(evaluate_loss(self, model, x0, record, perturber=perturber, cond=cond,
                                                 generator=generator), record)

    def state_dict(self) -> dict:
        """The importance sampler's history (empty without importance sampling), for checkpoints."""
        return {} if self.time_sampler is None else self.time_sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.time_sampler is not None:
            self.time_sampler.load_state_dict(state)

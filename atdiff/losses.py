"""Denoising losses.

The building block is the pure function :func:`denoising_loss`: the per-sample regression loss of a model
at the (possibly perturbed) input ``x_t + delta``, against the target of the chosen parametrisation.
:class:`DenoisingLoss` adds the sampling of ``t`` and ``eps`` and the hook where a perturber (adversarial or
random, see :mod:`atdiff.perturb`) chooses ``delta``; every training variant goes through the same function.

Target modes for a perturbed input ``x~ = x_t + delta`` (method.md section 3):

* ``invariant``: the target of the clean pair ``(x0, eps)``;
* ``equivariant``: the target of ``(x0, eps + delta / sigma_t)``, the noise that explains ``x~`` with ``x0``
  fixed (for an eps-model: ``eps + delta / sqrt(1 - abar_t)``); gradient flows through ``delta``;
* ``equivariant-detached``: the same target with ``delta`` detached (the reference recipe).

:class:`HybridLoss` is IDDPM's ``L_simple + lambda L_vlb`` for a learned-variance model, with the same
contract (``draw``, ``at``, ``__call__``), so the same perturbers plug in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .param import (
    PREDICTIONS,
    convert,
    learned_range_log_variance,
    predict,
    predict_with_variance,
    split_learned_variance,
)
from .processes import Process, VPDiscrete, check_finite, expand_like

__all__ = ["TARGET_MODES", "denoising_target", "perturbed_input", "denoising_loss", "sample_times",
           "DenoisingLoss", "evaluate_loss", "normal_kl", "discretized_gaussian_log_likelihood",
           "LossSecondMomentSampler", "HybridLoss", "split_learned_variance"]

TARGET_MODES = ("invariant", "equivariant", "equivariant-detached")


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
    if target_mode not in TARGET_MODES:
        raise ValueError(f"target_mode: expected one of {TARGET_MODES}, got {target_mode!r}")
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
                   weight: Tensor | None = None) -> Tensor:
    """Per-sample loss ``w(t) * mean ||pred(x_t + delta, t) - target||^2``.

    Shapes: ``x0``, ``eps``, ``delta`` ``(B, ...)``; ``t`` ``(B,)``; ``weight`` ``(B,)`` or None.
    Returns ``(B,)``. The model's own prediction kind is converted to ``target`` through
    :func:`atdiff.param.predict`. Shapes are checked here; finiteness and the range of ``t`` are checked once
    per batch by :func:`evaluate_loss` (this function is the inner loop of an attack).
    """
    x_t, eps_target = perturbed_input(x0, eps, t, process, delta, target_mode)
    pred = predict(model, x_t, t, process, target)
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
    """The denoising loss with its sampling of ``t`` and ``eps``: ``loss(model, x0) -> (B,)``.

    ``weighting(t) -> (B,)`` multiplies the per-sample loss (None: uniform). A ``perturber`` passed at call
    time picks ``delta`` (it gets a closure ``delta -> per-sample loss``) and fixes the target mode.
    """

    process: Process
    target: str = "eps"
    weighting: Callable[[Tensor], Tensor] | None = None

    def __post_init__(self) -> None:
        if self.target not in PREDICTIONS:
            raise ValueError(f"target: expected one of {PREDICTIONS}, got {self.target!r}")

    def draw(self, x0: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw training times ``(B,)`` and noise ``(B, ...)`` for a batch ``x0``."""
        t = sample_times(self.process, x0.shape[0], device=x0.device, generator=generator)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return t.to(x0.dtype), eps

    def at(self, model: Callable, x0: Tensor, t: Tensor, eps: Tensor, delta: Tensor | None = None,
           target_mode: str = "invariant") -> Tensor:
        """The per-sample loss at fixed ``t``, ``eps`` and perturbation ``delta``. Shape ``(B,)``."""
        weight = None if self.weighting is None else self.weighting(t)
        return denoising_loss(model, x0, t, eps, self.process, target=self.target, delta=delta,
                              target_mode=target_mode, weight=weight)

    def __call__(self, model: Callable, x0: Tensor, *, t: Tensor | None = None, eps: Tensor | None = None,
                 perturber=None, generator: torch.Generator | None = None) -> Tensor:
        return evaluate_loss(self, model, x0, t, eps, perturber, generator)


def evaluate_loss(loss, model: Callable, x0: Tensor, t: Tensor | None, eps: Tensor | None, perturber=None,
                  generator: torch.Generator | None = None) -> Tensor:
    """One evaluation of a loss object (``draw``, ``at``, ``process``: :class:`DenoisingLoss`, :class:`HybridLoss`)
    on ``x0`` ``(B, ...)``: draw whichever of ``t``, ``eps`` is missing, let the ``perturber`` pick ``delta``
    from a closure ``delta -> per-sample loss`` (it also fixes the target mode), and return the per-sample loss
    ``(B,)`` at that ``delta``. The single place where a perturber meets a loss, and where its inputs are
    checked (finite ``x0``, ``t``, ``eps``; ``t`` in the process's range) before the inner loop runs."""
    check_finite(x0, "x0")
    if t is not None:
        loss.process.check_time(t)
    if eps is not None:
        check_finite(eps, "eps")
    if t is None or eps is None:
        t_draw, eps_draw = loss.draw(x0, generator)
        t = t_draw if t is None else t
        eps = eps_draw if eps is None else eps
    if perturber is None:
        return loss.at(model, x0, t, eps)
    mode = perturber.target_mode
    delta = perturber(lambda d: loss.at(model, x0, t, eps, d, mode), x0, t, loss.process, generator=generator)
    return loss.at(model, x0, t, eps, delta, mode)


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
        if not isinstance(T, int) or T < 1 or not isinstance(history, int) or history < 1:
            raise ValueError(f"T, history: expected integers >= 1, got {T!r}, {history!r}")
        if not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob: expected a value in [0, 1], got {uniform_prob}")
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
        """Record per-sample ``losses`` ``(B,)`` at times ``t`` ``(B,)`` (the oldest entry drops out)."""
        for ti, li in zip(t.detach().long().cpu().tolist(), losses.detach().double().cpu().tolist(),
                          strict=True):
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
    :func:`split_learned_variance`); ``v`` in ``[-1, 1]`` sets ``log var = f log beta_t + (1 - f) log
    beta_tilde_t``, ``f = (v + 1) / 2`` (:func:`~atdiff.param.learned_range_log_variance`). Per sample::

        mse  = mean ||eps_hat - eps_target||^2              (the target mode as in DenoisingLoss)
        vb   = KL(q(x_{t-1} | x_in, x0) || p(x_{t-1} | x_in)) / (D log 2)              for t > 1
             = -log p(x0 | x_in) / (D log 2)  (discretised decoder, 8 bits, data in [-1, 1])  for t = 1
        loss = mse + vlb_weight * T * vb

    in bits per dimension, with ``x_in = x_t + delta`` the (perturbed) network input. ``L_vlb`` is the sum
    over the ``T`` steps, so ``lambda L_vlb`` per drawn ``t`` is ``lambda T vb`` (improved-diffusion's
    ``vb * T / 1000`` for ``lambda = 0.001``). In ``vb`` the model mean uses ``eps_hat.detach()`` (only the
    variance learns from it), and the true posterior is that of the clean ``x0`` at the network input
    (method.md section 2: the KL of the DRO objective); ``beta_tilde_1 = 0`` is replaced by
    ``beta_tilde_2`` (IDDPM's clipped log variance).

    ``importance_sampling=True`` draws ``t`` from a :class:`LossSecondMomentSampler`: times drawn by
    :meth:`draw` are weighted by ``1 / (T p_t)`` in :meth:`at`, and the unweighted loss of the last
    :meth:`at` evaluation after each draw is recorded (by :meth:`__call__`, else at the next :meth:`draw`),
    so free adversarial training (``draw`` once, ``at`` K times) feeds the sampler too.
    """

    def __init__(self, process: VPDiscrete, vlb_weight: float = 0.001, importance_sampling: bool = False,
                 history: int = 10) -> None:
        if not isinstance(process, VPDiscrete):
            raise ValueError(f"process: the hybrid loss needs a VPDiscrete process, got {process!r}")
        if not vlb_weight >= 0:
            raise ValueError(f"vlb_weight: expected >= 0, got {vlb_weight}")
        self.process, self.vlb_weight = process, float(vlb_weight)
        self.time_sampler = LossSecondMomentSampler(process.T, history) if importance_sampling else None
        self._drawn: Tensor | None = None
        self._pending: tuple[Tensor, Tensor] | None = None

    def _commit(self) -> None:
        if self._pending is not None and self.time_sampler is not None:
            self.time_sampler.update(*self._pending)
        self._pending = None

    def draw(self, x0: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw training times ``(B,)`` (uniform on ``1..T``, or importance-sampled), noise ``(B, ...)``."""
        self._commit()
        if self.time_sampler is None:
            t = sample_times(self.process, x0.shape[0], device=x0.device, generator=generator)
        else:
            t = self.time_sampler.sample(x0.shape[0], device=x0.device, generator=generator)[0]
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        self._drawn = t.to(x0.dtype)
        return self._drawn, eps

    def terms(self, model: Callable, x0: Tensor, t: Tensor, eps: Tensor, delta: Tensor | None = None,
              target_mode: str = "invariant") -> dict[str, Tensor]:
        """The per-sample ``{"mse", "vb", "loss"}``, each ``(B,)`` (unweighted; ``vb`` in bits/dim)."""
        p = self.process
        if bool(((t < 1) | (t > p.T) | (t != t.round())).any()):
            raise ValueError(f"t: the hybrid loss needs integer times in 1..{p.T}")
        x_in, eps_target = perturbed_input(x0, eps, t, p, delta, target_mode)
        eps_hat, v = predict_with_variance(model, x_in, t, p, "eps")
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

    def at(self, model: Callable, x0: Tensor, t: Tensor, eps: Tensor, delta: Tensor | None = None,
           target_mode: str = "invariant") -> Tensor:
        """The per-sample hybrid loss at fixed ``t``, ``eps`` and ``delta``, times the importance weight for
        times from :meth:`draw`. Shape ``(B,)``."""
        loss = self.terms(model, x0, t, eps, delta, target_mode)["loss"]
        if self.time_sampler is None or t is not self._drawn:
            return loss
        self._pending = (t, loss.detach())
        return loss * self.time_sampler.weights(t)

    def __call__(self, model: Callable, x0: Tensor, *, t: Tensor | None = None, eps: Tensor | None = None,
                 perturber=None, generator: torch.Generator | None = None) -> Tensor:
        loss = evaluate_loss(self, model, x0, t, eps, perturber, generator)
        self._commit()
        return loss

    def state_dict(self) -> dict:
        """The importance sampler's history (empty without importance sampling), for checkpoints."""
        return {} if self.time_sampler is None else self.time_sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.time_sampler is not None:
            self.time_sampler.load_state_dict(state)

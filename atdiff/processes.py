"""Forward (noising) processes.

Every process is a Gaussian path ``x_t = alpha(t) * x0 + sigma(t) * eps`` with ``eps ~ N(0, I)``:

* :class:`VPDiscrete` -- DDPM / improved-diffusion: ``T`` steps, linear or cosine betas,
  ``abar_t = prod_{s=1..t} (1 - beta_s)``, integer times ``0..T`` (``t = 0`` is the data). Non-integer
  times interpolate ``log abar`` linearly (exact at the integers), so continuous-time solvers
  (DPM-Solver, probability-flow ODE) work on discrete models too.
* :class:`VPContinuous` -- the VP SDE of Song et al. on ``t in [0, 1]`` (linear beta(t) or cosine).
* :class:`VE` -- variance exploding / EDM: ``alpha = 1``, ``sigma(t) = t``.

One contract for all (``alpha``, ``sigma``, ``abar``, ``snr``, ``log_snr``, ``add_noise``, ``posterior``),
computed in float64 and returned in the floating dtype of the input (``t`` for the coefficient functions,
``x0`` / ``x_t`` for the tensor functions). ``t`` is a tensor of shape ``()`` or ``(B,)``; coefficients
broadcast against ``x`` of shape ``(B, ...)`` through :func:`expand_like`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .validate import check_finite

__all__ = [
    "Process",
    "VPDiscrete",
    "VPContinuous",
    "VE",
    "expand_like",
    "check_finite",
    "make_process",
]


def expand_like(coef: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample coefficient of shape ``()`` or ``(B,)`` to broadcast against ``x`` ``(B, ...)``."""
    if coef.ndim == 0:
        return coef.to(x.dtype)
    if coef.ndim != 1 or coef.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"t: expected shape () or ({x.shape[0]},) to match x of shape {tuple(x.shape)}, "
                         f"got {tuple(coef.shape)}")
    return coef.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def _as_time(t: Tensor | float, like: Tensor | None = None) -> Tensor:
    if not isinstance(t, Tensor):
        device = like.device if like is not None else None
        t = torch.tensor(t, dtype=torch.float64, device=device)
    return t


def _out_dtype(t: Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.get_default_dtype()


@dataclass(frozen=True, eq=False)
class Process:
    """Base class: subclasses define ``log_alpha`` (float64), ``sigma_from_log_alpha`` and the time range."""

    #: whether the process is variance preserving (alpha^2 + sigma^2 = 1)
    variance_preserving: bool = field(default=True, init=False)

    # --- to be defined by subclasses -----------------------------------------------------------
    @property
    def t_min(self) -> float:  # smallest time (the data)
        raise NotImplementedError

    @property
    def t_max(self) -> float:  # largest time (the prior)
        raise NotImplementedError

    def _log_alpha64(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _sigma64(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    # --- shared contract -----------------------------------------------------------------------
    def check_time(self, t: Tensor | float, name: str = "t") -> Tensor:
        """Validate that ``t`` lies in ``[t_min, t_max]`` and is finite; return it as a tensor."""
        t = _as_time(t)
        if t.ndim > 1:
            raise ValueError(f"{name}: expected shape () or (B,), got {tuple(t.shape)}")
        tf = t.double()
        if not bool(torch.isfinite(tf).all()):
            raise ValueError(f"{name}: contains NaN or infinite values")
        if t.numel() and (bool((tf < self.t_min - 1e-9).any()) or bool((tf > self.t_max + 1e-9).any())):
            raise ValueError(f"{name}: times must lie in [{self.t_min}, {self.t_max}] for {self!r}, "
                             f"got range [{tf.min().item()}, {tf.max().item()}]")
        return t

    def log_alpha(self, t: Tensor | float) -> Tensor:
        """``log alpha(t)``, the log of the signal scale. Shape of ``t``."""
        t = _as_time(t)
        return self._log_alpha64(t.double()).to(_out_dtype(t))

    def alpha(self, t: Tensor | float) -> Tensor:
        """Signal scale ``alpha(t)`` (``sqrt(abar_t)`` for VP; 1 for VE). Shape of ``t``."""
        t = _as_time(t)
        return self._log_alpha64(t.double()).exp().to(_out_dtype(t))

    def sigma(self, t: Tensor | float) -> Tensor:
        """Noise scale ``sigma(t)`` (``sqrt(1 - abar_t)`` for VP; ``t`` for VE). Shape of ``t``."""
        t = _as_time(t)
        return self._sigma64(t.double()).to(_out_dtype(t))

    def abar(self, t: Tensor | float) -> Tensor:
        """``alpha(t)^2`` (the cumulative product ``abar_t`` for VP). Shape of ``t``."""
        t = _as_time(t)
        return (2 * self._log_alpha64(t.double())).exp().to(_out_dtype(t))

    def log_snr(self, t: Tensor | float) -> Tensor:
        """``log(alpha^2 / sigma^2)``; strictly decreasing in ``t``. Shape of ``t``."""
        t = _as_time(t)
        t64 = t.double()
        return (2 * (self._log_alpha64(t64) - self._sigma64(t64).log())).to(_out_dtype(t))

    def t_from_log_snr(self, log_snr: Tensor | float) -> Tensor:
        """Inverse of :meth:`log_snr`: the time whose ``log(alpha^2 / sigma^2)`` is ``log_snr``, clamped to
        ``[t_min, t_max]`` (``+inf`` gives ``t_min``). Shape of ``log_snr``; DPM-Solver's ``t(lambda)`` with
        ``lambda = log_snr / 2``."""
        lam = _as_time(log_snr)
        t = self._t_from_log_snr64(lam.double()).clamp(self.t_min, self.t_max)
        return t.to(_out_dtype(lam))

    def _t_from_log_snr64(self, log_snr: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not define t_from_log_snr")

    def snr(self, t: Tensor | float) -> Tensor:
        """Signal-to-noise ratio ``alpha^2 / sigma^2``. Shape of ``t``."""
        return self.log_snr(t).exp()

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor | float, *, validate: bool = True) -> Tensor:
        """Sample ``x_t = alpha(t) x0 + sigma(t) eps``.

        Args: ``x0`` and ``eps`` of shape ``(B, ...)``; ``t`` of shape ``()`` or ``(B,)``.
        Returns ``x_t`` of shape ``(B, ...)`` in ``x0.dtype``.

        ``validate`` (as in ``torch.distributions``) checks that ``x0``, ``eps`` and ``t`` are finite and ``t``
        lies in ``[t_min, t_max]``; these checks synchronise with the device, so inner loops that have checked
        their inputs once (the losses) pass ``validate=False``. Shapes are always checked.
        """
        if x0.shape != eps.shape:
            raise ValueError(f"eps: expected the shape of x0 {tuple(x0.shape)}, got {tuple(eps.shape)}")
        for name, value in (("x0", x0), ("eps", eps)):
            if not value.is_floating_point():  # the coefficients would be cast to int: x_t = 0
                raise ValueError(f"{name}: expected a floating-point tensor, got {value.dtype}")
        if validate:
            check_finite(x0, "x0")
            check_finite(eps, "eps")
            self.check_time(t)
        t = _as_time(t, x0)
        a = expand_like(self._log_alpha64(t.double()).exp(), x0)
        s = expand_like(self._sigma64(t.double()), x0)
        return a * x0 + s * eps

    def transition(self, s: Tensor | float, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """Coefficients of ``q(x_t | x_s) = N(alpha_ts x_s, sigma_ts^2 I)`` for ``s <= t`` (float64)."""
        s64, t64 = _as_time(s).double(), _as_time(t).double()
        log_a_ts = self._log_alpha64(t64) - self._log_alpha64(s64)
        var = self._sigma64(t64) ** 2 - (2 * log_a_ts).exp() * self._sigma64(s64) ** 2
        return log_a_ts.exp(), var.clamp_min(0.0).sqrt()

    def posterior(self, x_t: Tensor, x0: Tensor, t: Tensor | float, s: Tensor | float
                  ) -> tuple[Tensor, Tensor]:
        """Mean and variance of ``q(x_s | x_t, x0)`` for ``s < t``.

        ``mean = (alpha_ts sigma_s^2 / sigma_t^2) x_t + (alpha_s sigma_ts^2 / sigma_t^2) x0`` and
        ``var = sigma_ts^2 sigma_s^2 / sigma_t^2`` (``beta_tilde`` for DDPM with ``s = t - 1``).
        Returns the mean ``(B, ...)`` and the variance broadcastable to it, both in ``x_t.dtype``.
        """
        t, s = _as_time(t, x_t), _as_time(s, x_t)
        s64, t64 = s.double(), t.double()
        if bool((s64 >= t64).any()):
            raise ValueError("s: the posterior q(x_s | x_t, x0) needs s < t")
        a_ts, sig_ts = self.transition(s64, t64)
        sig_s2, sig_t2 = self._sigma64(s64) ** 2, self._sigma64(t64) ** 2
        c_xt = a_ts * sig_s2 / sig_t2
        c_x0 = self._log_alpha64(s64).exp() * sig_ts**2 / sig_t2
        var = sig_ts**2 * sig_s2 / sig_t2
        mean = expand_like(c_xt, x_t) * x_t + expand_like(c_x0, x_t) * x0
        return mean, expand_like(var, x_t)


def _cosine_log_abar(u: Tensor, s: float) -> Tensor:
    """``log abar`` of the improved-diffusion cosine schedule at ``u = t / T`` in ``[0, 1]``, uncapped."""
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return (f / math.cos(s / (1 + s) * math.pi / 2) ** 2).log()


def discrete_betas(schedule: str, T: int, beta_start: float = 1e-4, beta_end: float = 0.02,
                   cosine_s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """The ``T`` betas ``beta_1..beta_T`` (float64) of a named schedule.

    ``linear``: evenly spaced in ``[beta_start, beta_end] * 1000 / T`` (DDPM, rescaled so any ``T`` matches
    the 1000-step process). ``cosine``: ``beta_t = min(1 - abar(t)/abar(t-1), max_beta)`` with
    ``abar(t) = cos^2(((t/T) + s)/(1 + s) * pi/2) / cos^2(s/(1+s) * pi/2)`` (Nichol & Dhariwal).
    """
    if not isinstance(T, int) or isinstance(T, bool) or T < 1:
        raise ValueError(f"T: expected an integer >= 1, got {T!r}")
    if schedule == "linear":
        scale = 1000.0 / T
        return torch.linspace(beta_start * scale, beta_end * scale, T, dtype=torch.float64).clamp(max=max_beta)
    if schedule == "cosine":
        u = torch.arange(T + 1, dtype=torch.float64) / T
        log_abar = _cosine_log_abar(u, cosine_s)
        betas = 1 - (log_abar[1:] - log_abar[:-1]).exp()
        return betas.clamp(max=max_beta)
    raise ValueError(f"schedule: expected 'linear' or 'cosine', got {schedule!r}")


@dataclass(frozen=True, eq=False)
class VPDiscrete(Process):
    """Discrete variance-preserving process (DDPM) with ``T`` steps; times ``0..T``.

    Either give ``schedule`` (``"linear"`` or ``"cosine"``) or explicit ``betas`` (float64, length ``T``),
    e.g. the rebuilt betas of a respaced process.
    """

    schedule: str = "linear"
    T: int = 1000
    betas: Tensor | None = None

    def __post_init__(self) -> None:
        if self.betas is None:
            betas = discrete_betas(self.schedule, self.T)
        else:
            betas = torch.as_tensor(self.betas, dtype=torch.float64).flatten()
            if betas.numel() < 1 or not bool(((betas > 0) & (betas < 1)).all()):
                raise ValueError("betas: expected a non-empty sequence of values in (0, 1)")
            object.__setattr__(self, "T", betas.numel())
            object.__setattr__(self, "schedule", "custom")
        object.__setattr__(self, "betas", betas)
        # log abar_t for t = 0..T; abar_0 = 1 (the data)
        log_abar = torch.cat([torch.zeros(1, dtype=torch.float64), torch.log1p(-betas).cumsum(0)])
        object.__setattr__(self, "_log_abar_table", log_abar)

    def __repr__(self) -> str:
        return f"VPDiscrete(schedule={self.schedule!r}, T={self.T})"

    @property
    def t_min(self) -> float:
        return 0.0

    @property
    def t_max(self) -> float:
        return float(self.T)

    @property
    def log_abar_table(self) -> Tensor:
        """``log abar_t`` for ``t = 0..T`` (float64, length ``T + 1``)."""
        return self._log_abar_table

    def _log_alpha64(self, t: Tensor) -> Tensor:
        table = self._log_abar_table.to(t.device)
        tc = t.clamp(0, self.T)
        lo = tc.floor().long().clamp(max=self.T - 1)
        w = tc - lo
        return 0.5 * ((1 - w) * table[lo] + w * table[lo + 1])

    def _sigma64(self, t: Tensor) -> Tensor:
        return (-torch.expm1(2 * self._log_alpha64(t))).clamp_min(0).sqrt()

    def _t_from_log_snr64(self, log_snr: Tensor) -> Tensor:
        # abar = sigmoid(log_snr); invert the piecewise-linear interpolation of the log abar table
        neg_table = -self._log_abar_table.to(log_snr.device)
        target = (-torch.nn.functional.logsigmoid(log_snr)).clamp(0, -self._log_abar_table[-1].item())
        hi = torch.searchsorted(neg_table, target.reshape(-1)).reshape(target.shape).clamp(1, self.T)
        lo = hi - 1
        w = (target - neg_table[lo]) / (neg_table[hi] - neg_table[lo])
        return lo + w


@dataclass(frozen=True, eq=False)
class VPContinuous(Process):
    """Continuous VP SDE on ``t in [0, 1]``: linear ``beta(t) = beta_min + t (beta_max - beta_min)``
    (Song et al. 2021), or the cosine ``abar(t)`` of improved-diffusion evaluated at continuous ``t``."""

    schedule: str = "linear"
    beta_min: float = 0.1
    beta_max: float = 20.0
    cosine_s: float = 0.008

    def __post_init__(self) -> None:
        if self.schedule not in ("linear", "cosine"):
            raise ValueError(f"schedule: expected 'linear' or 'cosine', got {self.schedule!r}")
        if not (math.isfinite(self.beta_max) and 0 < self.beta_min < self.beta_max):
            raise ValueError(f"beta_min, beta_max: need 0 < beta_min < beta_max, got {self.beta_min}, "
                             f"{self.beta_max}")

    @property
    def t_min(self) -> float:
        return 0.0

    @property
    def t_max(self) -> float:
        # the cosine abar reaches 0 at t = 1; stop where beta would exceed 0.999 per 1/1000 step
        return 1.0 if self.schedule == "linear" else 0.9946

    def _log_alpha64(self, t: Tensor) -> Tensor:
        if self.schedule == "linear":
            return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        return 0.5 * _cosine_log_abar(t, self.cosine_s)

    def _sigma64(self, t: Tensor) -> Tensor:
        return (-torch.expm1(2 * self._log_alpha64(t))).clamp_min(0).sqrt()

    def _t_from_log_snr64(self, log_snr: Tensor) -> Tensor:
        log_abar = torch.nn.functional.logsigmoid(log_snr)
        if self.schedule == "linear":
            # 0.5 (beta_max - beta_min) t^2 + beta_min t + log_abar = 0, the cancellation-free root
            root = (self.beta_min**2 - 2 * (self.beta_max - self.beta_min) * log_abar).sqrt()
            return -2 * log_abar / (self.beta_min + root)
        s = self.cosine_s
        log_f0 = 2 * math.log(math.cos(s / (1 + s) * math.pi / 2))
        cos_arg = (0.5 * (log_abar + log_f0)).exp().clamp(max=1.0)
        return torch.arccos(cos_arg) * 2 * (1 + s) / math.pi - s

    def beta(self, t: Tensor | float) -> Tensor:
        """Instantaneous ``beta(t) = -2 d log alpha / dt`` (shape of ``t``)."""
        t = _as_time(t)
        t64 = t.double().detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self._log_alpha64(t64).sum(), t64)
        return (-2 * g).to(_out_dtype(t))


@dataclass(frozen=True, eq=False)
class VE(Process):
    """Variance exploding / EDM process: ``x_t = x0 + t eps`` on ``t in [0, sigma_max]``."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    variance_preserving: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        finite = math.isfinite(self.sigma_min) and math.isfinite(self.sigma_max)
        if not (finite and 0 < self.sigma_min < self.sigma_max):
            raise ValueError(f"sigma_min, sigma_max: need 0 < sigma_min < sigma_max, got {self.sigma_min}, "
                             f"{self.sigma_max}")

    @property
    def t_min(self) -> float:
        return 0.0

    @property
    def t_max(self) -> float:
        return float(self.sigma_max)

    def _log_alpha64(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def _sigma64(self, t: Tensor) -> Tensor:
        return t

    def _t_from_log_snr64(self, log_snr: Tensor) -> Tensor:
        return (-0.5 * log_snr).exp()


def make_process(name: str, **kwargs) -> Process:
    """Build a process by name: ``vp-linear``, ``vp-cosine`` (discrete, ``T=...``), ``vp-continuous``,
    ``vp-continuous-cosine``, ``ve`` / ``edm``."""
    table = {
        "vp-linear": lambda: VPDiscrete("linear", **kwargs),
        "vp-cosine": lambda: VPDiscrete("cosine", **kwargs),
        "vp-continuous": lambda: VPContinuous("linear", **kwargs),
        "vp-continuous-cosine": lambda: VPContinuous("cosine", **kwargs),
        "ve": lambda: VE(**kwargs),
        "edm": lambda: VE(**kwargs),
    }
    if name not in table:
        raise ValueError(f"name: unknown process {name!r}; expected one of {sorted(table)}")
    return table[name]()

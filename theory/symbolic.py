"""Symbolic (sympy) derivations of the closed forms used by the theory checks (claims C4, C5, C6, C10 of
``docs/claims.md``).

Each ``derive_*`` function returns a :class:`Derivation`: the sympy expression ``expr`` of the result, the
lambdified numpy function ``func(*args)`` of it, the argument symbols ``args`` (the order of ``func``'s
arguments), named intermediate expressions ``extras`` and named ``checks`` -- residuals that the derivation
reduced to exactly ``0`` (``Derivation.verified`` is ``True`` when all of them are ``0``). Derivations are cached
(each takes well under a second here; ``c_t`` and ``at_linear_gaussian_minimiser`` reuse them).

Results (all exact, derived here by sympy and compared numerically in ``tests/test_symbolic.py``):

* **C4** (:func:`derive_dro_at_constant`): with the posterior mean evaluated at a perturbed input
  ``x~ = sqrt(abar) x0 + sqrt(1 - abar) eps + delta``, ``KL(N(mu_tilde(x~, x0), beta_tilde) ||
  N(mu_theta(x~), beta_tilde)) = c_t (eps_theta - eps - delta / sqrt(1 - abar))^2`` per coordinate with
  ``c_t = beta^2 / (2 beta_tilde alpha (1 - abar))`` (= ``beta / (2 alpha (1 - abar_prev))``); the KL of a mean
  shift of ``q(x_t | x0)`` is ``delta^2 / (2 (1 - abar))`` (:func:`derive_kl_radius`). Matches the paper.
* **C5** (:func:`derive_at_linear_gaussian`): ``L_AT(a) = V + 2 eta |b| sqrt(2 V / pi) + eta^2 b^2`` with
  ``V = a^2 v - 2 a sigma + 1``, ``v = abar s^2 + sigma^2`` and ``b = a - 1/sigma`` (equivariant target) or
  ``b = a`` (invariant target). Matches the paper. Minimiser: :func:`at_linear_gaussian_minimiser`; Bayes
  ``a* = sigma / v`` (:func:`derive_bayes_linear_coefficient`).
* **C6** (:func:`derive_random_delta_equivariant`, :func:`derive_ip_scaling`), for any data law:
  ``E[eps + c xi / sigma | x~] = (sqrt(sigma^2 + c^2) / sigma) E[eps_eff | x~]`` and
  ``E[eps | x] = E[eps + gamma xi | x] / (1 + gamma^2) = E[eps_eff | x] / sqrt(1 + gamma^2)``, where ``eps_eff``
  is the unit-variance total noise, i.e. ``E[eps_eff | .]`` is the clean-data eps-optimum at the *effective* noise
  level of the input. So the paper's factors (``sqrt(sigma^2 + c^2)/sigma`` up, ``1/sqrt(1 + gamma^2)`` down)
  are exact relative to that reference; ``1/(1 + gamma^2)`` is the IP factor relative to the un-normalised total
  noise ``eps + gamma xi``. **Discrepancy with the wording of the paper:** relative to the clean optimum at the
  *nominal* level (the coefficient ``a* = sigma / v`` a clean model applies to the same input), the factors are
  data dependent -- for 1-D ``N(0, s^2)`` data ``(sigma^2 + c^2) v / (sigma^2 (v + c^2))`` in
  ``[1, (sigma^2 + c^2)/sigma^2]`` and ``v / (v + sigma^2 gamma^2)`` in ``[1/(1 + gamma^2), 1]`` -- and equal
  the paper's factors only at ``abar s^2 = sigma sqrt(sigma^2 + c^2)`` resp. ``abar s^2 = sigma^2
  sqrt(1 + gamma^2)``. The directions (up vs down) hold in every sense.
* **C10** (:func:`derive_ve_consistency_map`): ``x_s = x_t sqrt(s^2 + s_d^2) / sqrt(t^2 + s_d^2)`` and
  ``f(x, t) = x sqrt(eps0^2 + s_d^2) / sqrt(t^2 + s_d^2)``, ``s_d`` the data standard deviation (the paper
  writes ``s`` for it). Matches the paper.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

import sympy as sp

__all__ = [
    "Derivation",
    "derive_kl_gaussians_1d",
    "derive_dro_at_constant",
    "dro_at_kl_args",
    "c_t",
    "derive_kl_radius",
    "derive_at_linear_gaussian",
    "derive_bayes_linear_coefficient",
    "at_linear_gaussian_minimiser",
    "derive_random_delta_equivariant",
    "derive_ip_scaling",
    "derive_ve_consistency_map",
    "CM_EPS",
]

#: the smallest time of the consistency-model grid (``f(x, CM_EPS) = x``)
CM_EPS = 0.002


@dataclass(frozen=True)
class Derivation:
    """A symbolic result: ``expr`` (sympy), ``func`` (numpy, ``func(*args)``), intermediate ``extras`` and the
    residuals ``checks`` (each simplified to exactly ``0`` when the derivation holds)."""

    name: str
    expr: sp.Expr
    args: tuple[sp.Symbol, ...]
    func: Callable[..., object]
    extras: dict[str, sp.Expr] = field(default_factory=dict)
    checks: dict[str, sp.Expr] = field(default_factory=dict)
    statement: str = ""

    @property
    def verified(self) -> bool:
        """Whether every residual in ``checks`` simplified to exactly 0."""
        return all(sp.simplify(r) == 0 for r in self.checks.values())

    def lambdify(self, key: str, args: tuple[sp.Symbol, ...] | None = None) -> Callable[..., object]:
        """Numeric (numpy) function of ``extras[key]`` with arguments ``args`` (default: ``self.args``)."""
        return sp.lambdify(args if args is not None else self.args, self.extras[key], modules="numpy")


def _make(name: str, expr: sp.Expr, args: tuple[sp.Symbol, ...], extras: dict[str, sp.Expr],
          checks: dict[str, sp.Expr], statement: str) -> Derivation:
    checks = {k: sp.simplify(v) for k, v in checks.items()}
    return Derivation(name=name, expr=expr, args=args, func=sp.lambdify(args, expr, modules="numpy"),
                      extras=extras, checks=checks, statement=statement)


def _gauss_pdf(x: sp.Expr, mean: sp.Expr, var: sp.Expr) -> sp.Expr:
    return sp.exp(-((x - mean) ** 2) / (2 * var)) / sp.sqrt(2 * sp.pi * var)


def _gauss_logpdf(x: sp.Expr, mean: sp.Expr, var: sp.Expr) -> sp.Expr:
    return -((x - mean) ** 2) / (2 * var) - sp.log(2 * sp.pi * var) / 2


# ------------------------------------------------------------------------------------------------------------
# C4: DRO = AT
# ------------------------------------------------------------------------------------------------------------
@cache
def derive_kl_gaussians_1d() -> Derivation:
    """``KL(N(m1, v) || N(m2, v))`` of two 1-D Gaussians with the same variance, by integrating
    ``N(x; m1, v) (log N(x; m1, v) - log N(x; m2, v))`` over the real line (with ``x = m1 + sqrt(v) z``):
    ``(m1 - m2)^2 / (2 v)``.

    ``func(m1, m2, v)``.
    """
    x, z = sp.symbols("x z", real=True)
    m1, m2 = sp.symbols("m1 m2", real=True)
    v = sp.Symbol("v", positive=True)
    # substitute x = m1 + sqrt(v) z (z ~ N(0, 1)) and integrate the log-ratio, a polynomial in z, term by term
    log_ratio = sp.expand(sp.expand(_gauss_logpdf(x, m1, v) - _gauss_logpdf(x, m2, v)).subs(x, m1 + sp.sqrt(v) * z))
    poly = sp.Poly(log_ratio, z)
    kl = sp.factor(sum(cf * sp.integrate(z**k * _gauss_pdf(z, 0, 1), (z, -sp.oo, sp.oo))
                       for (k,), cf in zip(poly.monoms(), poly.coeffs(), strict=True)))
    return _make("kl_gaussians_1d", kl, (m1, m2, v), {},
                 {"kl - (m1-m2)^2/(2v)": kl - (m1 - m2) ** 2 / (2 * v)},
                 "KL(N(m1, v) || N(m2, v)) = (m1 - m2)^2 / (2 v)")


@cache
def derive_dro_at_constant() -> Derivation:
    """The constant ``c_t`` of the DRO = AT identity (claim C4 in ``docs/claims.md``), derived in 1-D (the
    identity holds per coordinate since both laws are isotropic Gaussians with the same variance).

    Symbols: ``alpha = alpha_t`` (``beta = 1 - alpha``), ``abar_prev = abar_{t-1}``, ``abar = alpha abar_prev``,
    ``beta_tilde = beta (1 - abar_prev) / (1 - abar)``. With the perturbed input
    ``x~ = sqrt(abar) x0 + sqrt(1 - abar) eps + delta``, the posterior mean formula evaluated at ``x~``,
    ``mu_tilde(x~, x0) = sqrt(abar_prev) beta / (1 - abar) x0 + sqrt(alpha) (1 - abar_prev) / (1 - abar) x~``,
    and the model mean ``mu_theta(x~) = (x~ - beta / sqrt(1 - abar) eps_theta) / sqrt(alpha)``:

    ``KL(N(mu_tilde, beta_tilde) || N(mu_theta, beta_tilde)) = c_t (eps_theta - eps - delta / sqrt(1 - abar))^2``,
    ``c_t = beta^2 / (2 beta_tilde alpha (1 - abar))``, which simplifies to ``beta / (2 alpha (1 - abar_prev))``.

    ``expr`` is ``c_t``, ``func(alpha, abar_prev)``. ``extras``: ``kl`` (a function of ``alpha, abar_prev, x0,
    eps, delta, eps_theta``), ``mu_tilde``, ``mu_theta``, ``beta_tilde``, ``c_t_simplified``. ``checks``: the
    difference ``KL - c_t (...)^2`` and ``c_t - beta / (2 alpha (1 - abar_prev))``, both 0. Numeric versions of
    the extras: ``derive_dro_at_constant().lambdify("kl", dro_at_kl_args())``.
    """
    alpha, abar_prev = _dro_symbols()[:2]
    x0, eps, delta, eps_theta = _dro_symbols()[2:]
    beta = 1 - alpha
    abar = alpha * abar_prev
    beta_tilde = beta * (1 - abar_prev) / (1 - abar)
    x_tilde = sp.sqrt(abar) * x0 + sp.sqrt(1 - abar) * eps + delta
    mu_tilde = sp.sqrt(abar_prev) * beta / (1 - abar) * x0 + sp.sqrt(alpha) * (1 - abar_prev) / (1 - abar) * x_tilde
    mu_theta = (x_tilde - beta / sp.sqrt(1 - abar) * eps_theta) / sp.sqrt(alpha)
    target = eps + delta / sp.sqrt(1 - abar)
    # step 1: the mean gap is linear in (x0, eps, delta, eps_theta) and equals g (eps_theta - target)
    g = beta / (sp.sqrt(alpha) * sp.sqrt(1 - abar))
    gap = sp.Poly(sp.expand(mu_tilde - mu_theta - g * (eps_theta - target)), x0, eps, delta, eps_theta)
    step1 = sum(sp.Abs(sp.simplify(cf)) for cf in gap.coeffs())
    # step 2: the same-variance Gaussian KL at m1 = m2 + g (eps_theta - target) is c_t (eps_theta - target)^2
    kl_1d = derive_kl_gaussians_1d()
    m1, m2, v = kl_1d.args
    kl = kl_1d.expr.subs({m1: mu_tilde, m2: mu_theta, v: beta_tilde})
    c_t = beta**2 / (2 * beta_tilde * alpha * (1 - abar))
    kl_via_gap = kl_1d.expr.subs(m1, m2 + g * (eps_theta - target)).subs(v, beta_tilde)
    step2 = sp.simplify(sp.expand(kl_via_gap - c_t * (eps_theta - target) ** 2))
    c_simple = beta / (2 * alpha * (1 - abar_prev))
    return _make("dro_at_constant", sp.simplify(c_t), (alpha, abar_prev),
                 {"kl": kl, "mu_tilde": mu_tilde, "mu_theta": mu_theta, "beta_tilde": beta_tilde,
                  "c_t_simplified": c_simple, "target": target, "mean_gap_factor": g},
                 {"mu_tilde - mu_theta - g (eps_theta - target)": step1,
                  "KL - c_t (eps_theta - eps - delta/sqrt(1-abar))^2": step2,
                  "c_t - beta/(2 alpha (1-abar_prev))": c_t - c_simple},
                 "KL(q(x_{t-1}|x~, x0) || p_theta(x_{t-1}|x~)) = c_t (eps_theta - eps - delta/sqrt(1-abar))^2, "
                 "c_t = beta^2 / (2 beta_tilde alpha (1 - abar))")


def c_t(process: object, t: object) -> object:
    """Numeric ``c_t`` of :func:`derive_dro_at_constant` for a discrete VP process (``atdiff.processes.VPDiscrete``)
    at integer time(s) ``t`` in ``2..T`` (``t = 1`` has ``beta_tilde = 0``: ``c_1`` is infinite).

    ``t``: an int, a float, a numpy array or a torch tensor. Returns a float64 numpy scalar or array of the shape of
    ``t``, evaluated with ``alpha = 1 - beta_t`` and ``abar_prev = abar_{t-1}`` from the process table.
    """
    import numpy as np

    if hasattr(t, "detach"):
        t = t.detach().cpu().double().numpy()
    tt = np.asarray(t, dtype=np.float64)
    T = int(getattr(process, "T", 0))
    betas, table = getattr(process, "betas", None), getattr(process, "log_abar_table", None)
    if betas is None or table is None:
        raise ValueError(f"process: expected a discrete VP process with betas, got {type(process).__name__}")
    if not np.all(np.isfinite(tt)) or np.any(tt != np.round(tt)) or np.any(tt < 2) or np.any(tt > T):
        raise ValueError(f"t: expected integer times in [2, {T}], got {t!r}")
    ti = tt.astype(np.int64)
    betas_np = np.asarray(betas.detach().cpu().double().numpy() if hasattr(betas, "detach") else betas)
    table_np = np.asarray(table.detach().cpu().double().numpy() if hasattr(table, "detach") else table)
    alpha = 1.0 - betas_np[ti - 1]
    abar_prev = np.exp(table_np[ti - 1])
    return np.asarray(derive_dro_at_constant().func(alpha, abar_prev), dtype=np.float64)[()]


@cache
def _dro_symbols() -> tuple[sp.Symbol, ...]:
    alpha, abar_prev = sp.symbols("alpha abar_prev", positive=True)
    x0, eps, delta, eps_theta = sp.symbols("x0 eps delta eps_theta", real=True)
    return alpha, abar_prev, x0, eps, delta, eps_theta


def dro_at_kl_args() -> tuple[sp.Symbol, ...]:
    """The argument order ``(alpha, abar_prev, x0, eps, delta, eps_theta)`` for
    ``derive_dro_at_constant().lambdify(key, dro_at_kl_args())`` with ``key`` in ``kl``, ``mu_tilde``,
    ``mu_theta``, ``target``."""
    return _dro_symbols()


@cache
def derive_kl_radius() -> Derivation:
    """The l2 radius of a KL ball of mean shifts of ``q(x_t | x0) = N(sqrt(abar) x0, (1 - abar) I)``:
    ``KL(N(mu + delta, (1 - abar) I) || N(mu, (1 - abar) I)) = ||delta||^2 / (2 (1 - abar))``, so
    ``KL <= eta0  <=>  ||delta|| <= sqrt(2 eta0 (1 - abar))`` (depends on ``t``).

    ``expr`` is the radius, ``func(eta0, abar)``; ``extras["kl"]`` the 1-D KL of a shift ``delta``.
    """
    eta0, abar = sp.symbols("eta0 abar", positive=True)
    delta, mu = sp.symbols("delta mu", real=True)
    kl_1d = derive_kl_gaussians_1d()
    m1, m2, v = kl_1d.args
    kl = sp.simplify(kl_1d.expr.subs({m1: mu + delta, m2: mu, v: 1 - abar}))
    radius = sp.sqrt(2 * eta0 * (1 - abar))
    return _make("kl_radius", radius, (eta0, abar), {"kl": kl},
                 {"kl - delta^2/(2(1-abar))": kl - delta**2 / (2 * (1 - abar)),
                  "kl(delta=radius) - eta0": kl.subs(delta, radius) - eta0},
                 "||delta|| <= sqrt(2 eta0 (1 - abar)) is the KL ball of radius eta0 around q(x_t|x0)")


# ------------------------------------------------------------------------------------------------------------
# C5: linear-Gaussian adversarial training in closed form
# ------------------------------------------------------------------------------------------------------------
@cache
def _c5_symbols() -> tuple[sp.Symbol, ...]:
    a = sp.Symbol("a", real=True)
    abar, sigma, s, eta = sp.symbols("abar sigma s eta", positive=True)
    return a, abar, sigma, s, eta


def _linear_cov(u: dict[sp.Symbol, sp.Expr], w: dict[sp.Symbol, sp.Expr]) -> sp.Expr:
    """Covariance of two linear combinations ``sum_k u_k Z_k`` and ``sum_k w_k Z_k`` of independent
    standard normals ``Z_k`` (given as coefficient dicts)."""
    return sp.expand(sum(u[k] * w[k] for k in u if k in w))


@cache
def derive_at_linear_gaussian(target: str = "equivariant") -> Derivation:
    """Closed-form AT loss of a linear eps-model on 1-D Gaussian data (claim C5 in ``docs/claims.md``).

    Data ``x0 = s z0 ~ N(0, s^2)``, ``x_t = sqrt(abar) x0 + sigma eps`` (``sigma^2 = 1 - abar`` for VP; any
    ``sigma > 0`` is allowed), model ``eps_theta(x) = a x``, worst case ``|delta| <= eta``:
    ``L_AT(a) = E max_{|delta| <= eta} (eps_theta(x_t + delta) - target(delta))^2``.

    Derivation (each step is a ``checks`` residual):

    1. the residual ``r = a x_t - eps = a sqrt(abar) s z0 + (a sigma - 1) eps`` is Gaussian, mean 0, variance
       ``V = a^2 v - 2 a sigma + 1`` with ``v = abar s^2 + sigma^2``;
    2. with target ``eps + delta / sigma`` (``equivariant``) the loss is ``(r + b delta)^2`` with
       ``b = a - 1/sigma``; with target ``eps`` (``invariant``) ``b = a``;
    3. ``(r + b delta)^2`` is convex in ``delta``, so its max over ``[-eta, eta]`` is at an endpoint:
       ``max((r + b eta)^2, (r - b eta)^2) = r^2 + b^2 eta^2 + 2 eta |r b| = (|r| + eta |b|)^2``, attained at
       ``delta = eta sign(r b)``;
    4. ``E|r| = sqrt(2 V / pi)`` (sympy integral of ``|r|`` against ``N(0, V)``), hence
       ``L_AT(a) = V + 2 eta |b| sqrt(2 V / pi) + eta^2 b^2``.

    ``expr`` is ``L_AT``, ``func(a, abar, sigma, s, eta)``; ``extras``: ``V``, ``v``, ``b``, ``E_abs_r``,
    ``worst_delta`` (as a function of the extra symbol ``r``).
    """
    if target not in ("equivariant", "invariant"):
        raise ValueError(f"target: expected 'equivariant' or 'invariant', got {target!r}")
    a, abar, sigma, s, eta = _c5_symbols()
    z0, e = sp.symbols("z0 eps", real=True)
    r_lin = {z0: a * sp.sqrt(abar) * s, e: a * sigma - 1}  # r = a x_t - eps
    V = _linear_cov(r_lin, r_lin)
    v = abar * s**2 + sigma**2
    b = a - 1 / sigma if target == "equivariant" else a
    # step 2: the loss at delta, from its definition
    delta, r = sp.symbols("delta r", real=True)
    x_t = sp.Symbol("x_t", real=True)
    tgt = e + delta / sigma if target == "equivariant" else e
    loss_delta = (a * (x_t + delta) - tgt) ** 2
    loss_via_r = (r + b * delta) ** 2
    step2 = sp.expand(loss_delta.subs(x_t, (r + e) / a) - loss_via_r)  # x_t = (r + eps) / a
    # step 3 (for any real r, b): max of the two endpoint values, max(A, B) = (A + B)/2 + |A - B|/2
    bsym = sp.Symbol("b", real=True)
    A, B = (r + bsym * eta) ** 2, (r - bsym * eta) ** 2
    max_ab = (A + B) / 2 + sp.Abs(sp.expand(A - B)) / 2
    closed_inner = (sp.Abs(r) + eta * sp.Abs(bsym)) ** 2
    step3 = _sign_cases(max_ab - closed_inner, (r, bsym))
    # step 4: E|r| for r ~ N(0, V)
    Vs = sp.Symbol("V", positive=True)
    e_abs = sp.integrate(sp.Abs(r) * _gauss_pdf(r, 0, Vs), (r, -sp.oo, sp.oo))
    e_abs_r = e_abs.subs(Vs, V)
    loss = r**2 + 2 * eta * sp.Abs(b) * sp.Abs(r) + eta**2 * b**2  # (|r| + eta|b|)^2 with |r|^2 = r^2
    L = V + 2 * eta * sp.Abs(b) * e_abs_r + eta**2 * b**2  # E of the line above
    L_method = (a**2 * v - 2 * a * sigma + 1) + 2 * eta * sp.Abs(b) * sp.sqrt(2 * (a**2 * v - 2 * a * sigma + 1)
                                                                          / sp.pi) + eta**2 * b**2
    return _make(f"at_linear_gaussian[{target}]", L, (a, abar, sigma, s, eta),
                 {"V": V, "v": v, "b": b, "E_abs_r": e_abs_r, "worst_delta": eta * sp.sign(r * b),
                  "inner_max": closed_inner.subs(bsym, b), "pointwise_loss": loss},
                 {"V - (a^2 v - 2 a sigma + 1)": V - (a**2 * v - 2 * a * sigma + 1),
                  "loss(delta) - (r + b delta)^2": step2,
                  "max(endpoints) - (|r| + eta|b|)^2": step3,
                  "E|r| - sqrt(2V/pi)": e_abs - sp.sqrt(2 * Vs / sp.pi),
                  "L_AT - paper form": L - L_method},
                 "L_AT(a) = V + 2 eta |b| sqrt(2V/pi) + eta^2 b^2, b = a - 1/sigma (equivariant) or a (invariant)")


def _sign_cases(expr: sp.Expr, syms: tuple[sp.Symbol, ...]) -> sp.Expr:
    """Sum of ``|expr|`` over all sign cases of the real symbols ``syms`` (each replaced by +- a positive symbol),
    simplified: ``0`` iff ``expr`` vanishes identically for non-zero reals (sympy does not simplify ``|r b|``
    against ``|r| |b|`` on its own)."""
    total = sp.Integer(0)
    pos = [sp.Symbol(f"{z.name}_pos", positive=True) for z in syms]
    for signs in itertools.product((1, -1), repeat=len(syms)):
        case = expr.subs({z: sg * p for z, sg, p in zip(syms, signs, pos, strict=True)})
        total = total + sp.Abs(sp.simplify(sp.expand(case)))
    return sp.simplify(total)


@cache
def derive_bayes_linear_coefficient() -> Derivation:
    """The clean (``eta = 0``) minimiser of ``V(a) = a^2 v - 2 a sigma + 1``: ``a* = sigma / v`` with
    ``v = abar s^2 + sigma^2`` (the Bayes eps-predictor ``E[eps | x_t] = a* x_t`` of 1-D Gaussian data), with
    minimum ``V(a*) = 1 - sigma^2 / v``. ``func(abar, sigma, s)``."""
    a, abar, sigma, s, _ = _c5_symbols()
    v = abar * s**2 + sigma**2
    V = a**2 * v - 2 * a * sigma + 1
    (sol,) = sp.solve(sp.diff(V, a), a)
    return _make("bayes_linear_coefficient", sp.simplify(sol), (abar, sigma, s),
                 {"V_min": sp.simplify(V.subs(a, sol))},
                 {"a* - sigma/v": sol - sigma / v, "V(a*) - (1 - sigma^2/v)": V.subs(a, sol) - (1 - sigma**2 / v),
                  "V''(a) > 0": sp.Integer(0) if sp.diff(V, a, 2).is_positive else sp.Integer(1)},
                 "a* = sigma / (abar s^2 + sigma^2)")


def at_linear_gaussian_minimiser(abar: float, sigma: float, s: float, eta: float, target: str = "equivariant",
                                 xatol: float = 1e-12) -> tuple[float, float]:
    """The minimiser ``a_AT`` of :func:`derive_at_linear_gaussian`'s ``L_AT(a)`` and the minimum; returns
    ``(a_AT, L_AT(a_AT))``.

    The minimiser lies between the Bayes coefficient ``a* = sigma / v`` (the minimiser of ``V``) and the zero
    ``a0`` of ``b`` (``1/sigma`` for the equivariant target, ``0`` for the invariant one): outside that interval
    both ``V`` and ``|b|`` grow. ``L_AT`` has a kink at ``a0`` and may attain its minimum there (large
    ``eta``), so the bounded Brent search (``scipy.optimize.minimize_scalar``) is compared with both endpoints.
    ``eta = 0`` returns ``a*``.
    """
    from scipy.optimize import minimize_scalar

    for name, val in (("abar", abar), ("sigma", sigma), ("s", s)):
        if not (math.isfinite(val) and val > 0):
            raise ValueError(f"{name}: expected a positive finite number, got {val!r}")
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta: expected a non-negative finite number, got {eta!r}")
    L = derive_at_linear_gaussian(target).func
    a_star = sigma / (abar * s**2 + sigma**2)
    a0 = 1.0 / sigma if target == "equivariant" else 0.0
    lo, hi = min(a_star, a0), max(a_star, a0)
    if eta == 0 or hi - lo < 1e-15:
        return a_star, float(L(a_star, abar, sigma, s, eta))
    res = minimize_scalar(lambda a: float(L(a, abar, sigma, s, eta)), bounds=(lo, hi), method="bounded",
                          options={"xatol": xatol})
    cands = [(float(res.fun), float(res.x)), (float(L(lo, abar, sigma, s, eta)), lo),
             (float(L(hi, abar, sigma, s, eta)), hi)]
    best = min(cands)
    return best[1], best[0]


# ------------------------------------------------------------------------------------------------------------
# C6: random perturbations and input perturbation (IP) rescale the optimal eps
# ------------------------------------------------------------------------------------------------------------
@cache
def _c6_symbols() -> tuple[sp.Symbol, ...]:
    abar, sigma, s, c, gamma = sp.symbols("abar sigma s c gamma", positive=True)
    z0, e, xi = sp.symbols("z0 eps xi", real=True)
    return abar, sigma, s, c, gamma, z0, e, xi


def _regression(target: dict, inp: dict) -> sp.Expr:
    """``E[T | X] = (Cov(T, X) / Var(X)) X`` for zero-mean jointly Gaussian ``T``, ``X``: the coefficient."""
    return sp.simplify(_linear_cov(target, inp) / _linear_cov(inp, inp))


@cache
def derive_random_delta_equivariant() -> Derivation:
    """Optimal eps-prediction under random perturbations ``delta = c xi`` (``xi ~ N(0, 1)`` independent) with the
    equivariant target ``eps + delta / sigma`` (claim C6, first half in ``docs/claims.md``).

    Input ``x~ = sqrt(abar) x0 + sigma eps + c xi``, target ``T = eps + c xi / sigma``, data ``x0 ~ N(0, s^2)``.
    Write ``n = sigma eps + c xi`` (the total noise, standard deviation ``sigma_eff = sqrt(sigma^2 + c^2)``) and
    ``eps_eff = n / sigma_eff`` (unit variance). Then ``T = n / sigma = (sigma_eff / sigma) eps_eff`` exactly, so

    **(i) for any data law**: ``E[T | x~] = (sqrt(sigma^2 + c^2) / sigma) E[eps_eff | x~]``, where
    ``E[eps_eff | x~]`` is the clean-data eps-optimum of the process ``sqrt(abar) x0 + sigma_eff eps_eff`` at the
    input ``x~``. This is the paper's factor ``sqrt(sigma^2 + c^2) / sigma`` (up), and it is exact in this
    sense.

    **(ii) 1-D Gaussian data**: the optimum is linear, ``E[T | x~] = k x~`` with
    ``k = (sigma^2 + c^2) / (sigma (abar s^2 + sigma^2 + c^2))`` (``expr``; ``func(abar, sigma, s, c)``).
    Relative to the clean model at the nominal noise level, ``a* = sigma / (abar s^2 + sigma^2)`` (what a
    network trained without perturbation would output at the same input), the factor is
    ``k / a* = (sigma^2 + c^2) (abar s^2 + sigma^2) / (sigma^2 (abar s^2 + sigma^2 + c^2))``
    (``extras["ratio_vs_clean_nominal"]``): data dependent, between ``1`` (``s -> 0``) and
    ``(sigma^2 + c^2) / sigma^2`` (``s -> inf``, the square of the paper's factor); it equals
    ``sqrt(sigma^2 + c^2) / sigma`` only at ``abar s^2 = sigma sqrt(sigma^2 + c^2)``. So the direction (up)
    holds in every sense, the exact factor ``sqrt(sigma^2 + c^2)/sigma`` only in sense (i).
    """
    abar, sigma, s, c, _, z0, e, xi = _c6_symbols()
    x_in = {z0: sp.sqrt(abar) * s, e: sigma, xi: c}
    T = {e: sp.Integer(1), xi: c / sigma}
    k = _regression(T, x_in)
    sig_eff = sp.sqrt(sigma**2 + c**2)
    eps_eff = {e: sigma / sig_eff, xi: c / sig_eff}
    k_eff = _regression(eps_eff, x_in)
    a_star = sigma / (abar * s**2 + sigma**2)
    ratio_eff = sp.simplify(k / k_eff)
    ratio_nom = sp.simplify(k / a_star)
    # T - (sigma_eff / sigma) eps_eff as a random variable (coefficients on eps and xi): identically 0
    rv_residual = sum(sp.Abs(sp.simplify(T[z] - sig_eff / sigma * eps_eff[z])) for z in (e, xi))
    return _make("random_delta_equivariant", k, (abar, sigma, s, c),
                 {"k_clean_effective": k_eff, "a_star_nominal": a_star, "ratio_vs_clean_effective": ratio_eff,
                  "ratio_vs_clean_nominal": ratio_nom,
                  "ratio_nominal_s_to_0": sp.limit(ratio_nom, s, 0),
                  "ratio_nominal_s_to_inf": sp.limit(ratio_nom, s, sp.oo)},
                 {"T - (sigma_eff/sigma) eps_eff (any data)": rv_residual,
                  "k - (sigma^2+c^2)/(sigma (abar s^2 + sigma^2 + c^2))":
                      k - (sigma**2 + c**2) / (sigma * (abar * s**2 + sigma**2 + c**2)),
                  "k/k_eff - sqrt(sigma^2+c^2)/sigma": ratio_eff - sig_eff / sigma,
                  "k/a* - (sigma^2+c^2) v / (sigma^2 (v + c^2))":
                      ratio_nom - (sigma**2 + c**2) * (abar * s**2 + sigma**2)
                      / (sigma**2 * (abar * s**2 + sigma**2 + c**2)),
                  "lim_{s->0} k/a* - 1": sp.limit(ratio_nom, s, 0) - 1,
                  "lim_{s->inf} k/a* - (sigma^2+c^2)/sigma^2": sp.limit(ratio_nom, s, sp.oo)
                      - (sigma**2 + c**2) / sigma**2,
                  "k/a* at abar s^2 = sigma sigma_eff - sigma_eff/sigma":
                      ratio_nom.subs(s, sp.sqrt(sigma * sig_eff / abar)) - sig_eff / sigma},
                 "E[eps + c xi/sigma | x~] = (sqrt(sigma^2+c^2)/sigma) E[eps_eff | x~] exactly (any data)")


@cache
def derive_ip_scaling() -> Derivation:
    """Optimal eps-prediction under input perturbation (IP, Ning et al. 2023; claim C6, second half).

    Input ``x = sqrt(abar) x0 + sigma (eps + gamma xi)``, target ``eps``. Write ``m = eps + gamma xi`` (the total
    noise in units of ``sigma``, variance ``1 + gamma^2``) and ``m' = m / sqrt(1 + gamma^2)`` (unit variance; the
    input is the clean process at ``sigma_eff = sigma sqrt(1 + gamma^2)``). Since ``eps - m / (1 + gamma^2)`` is
    uncorrelated with ``m`` (hence, being jointly Gaussian, independent of ``m`` and ``x0``, so of ``x``):

    **(i) for any data law**: ``E[eps | x] = E[eps + gamma xi | x] / (1 + gamma^2)`` -- a factor
    ``1 / (1 + gamma^2)`` relative to predicting the *total* noise ``m``; equivalently
    ``E[eps | x] = E[m' | x] / sqrt(1 + gamma^2)`` -- a factor ``1 / sqrt(1 + gamma^2)`` relative to the clean-data
    eps-optimum at the effective noise level ``sigma_eff``. The paper's ``1 / sqrt(1 + gamma^2)`` is the latter
    (the same convention as the ``sqrt(sigma^2 + c^2) / sigma`` of :func:`derive_random_delta_equivariant`); the
    ``1 / (1 + gamma^2)`` is the former. Both are exact; they differ only in what is normalised.

    **(ii) 1-D Gaussian data**: ``E[eps | x] = k x``, ``k = sigma / (abar s^2 + sigma^2 (1 + gamma^2))``
    (``expr``; ``func(abar, sigma, s, gamma)``). Relative to the clean model at the nominal level
    ``a* = sigma / (abar s^2 + sigma^2)`` the factor is ``v / (v + sigma^2 gamma^2)`` with ``v = abar s^2 +
    sigma^2`` (``extras["ratio_vs_clean_nominal"]``): data dependent, between ``1 / (1 + gamma^2)`` (``s -> 0``)
    and ``1`` (``s -> inf``), equal to ``1 / sqrt(1 + gamma^2)`` only at ``abar s^2 = sigma^2 sqrt(1 + gamma^2)``.
    The direction (down, opposite to the equivariant random perturbation) holds in every
    sense.
    """
    abar, sigma, s, _, gamma, z0, e, xi = _c6_symbols()
    x_in = {z0: sp.sqrt(abar) * s, e: sigma, xi: sigma * gamma}
    k = _regression({e: sp.Integer(1)}, x_in)
    k_total = _regression({e: sp.Integer(1), xi: gamma}, x_in)
    g = sp.sqrt(1 + gamma**2)
    k_norm = _regression({e: 1 / g, xi: gamma / g}, x_in)
    a_star = sigma / (abar * s**2 + sigma**2)
    v = abar * s**2 + sigma**2
    ratio_nom = sp.simplify(k / a_star)
    # eps - m/(1+gamma^2) is uncorrelated with m (so E[eps | x] = E[m | x]/(1+gamma^2) for any data law)
    resid = {e: 1 - 1 / (1 + gamma**2), xi: -gamma / (1 + gamma**2)}
    cov_resid_m = _linear_cov(resid, {e: sp.Integer(1), xi: gamma})
    return _make("ip_scaling", k, (abar, sigma, s, gamma),
                 {"k_total_noise": k_total, "k_clean_effective": k_norm, "a_star_nominal": a_star,
                  "ratio_vs_total_noise": sp.simplify(k / k_total), "ratio_vs_clean_effective":
                      sp.simplify(k / k_norm), "ratio_vs_clean_nominal": ratio_nom},
                 {"Cov(eps - m/(1+gamma^2), m) (any data)": cov_resid_m,
                  "k - sigma/(abar s^2 + sigma^2 (1+gamma^2))": k - sigma / (abar * s**2 + sigma**2 * (1 + gamma**2)),
                  "k/k_total - 1/(1+gamma^2)": k / k_total - 1 / (1 + gamma**2),
                  "k/k_eff - 1/sqrt(1+gamma^2)": k / k_norm - 1 / g,
                  "k/a* - v/(v + sigma^2 gamma^2)": ratio_nom - v / (v + sigma**2 * gamma**2),
                  "lim_{s->0} k/a* - 1/(1+gamma^2)": sp.limit(ratio_nom, s, 0) - 1 / (1 + gamma**2),
                  "lim_{s->inf} k/a* - 1": sp.limit(ratio_nom, s, sp.oo) - 1,
                  "k/a* at abar s^2 = sigma^2 sqrt(1+gamma^2) - 1/sqrt(1+gamma^2)":
                      ratio_nom.subs(s, sp.sqrt(sigma**2 * g / abar)) - 1 / g},
                 "E[eps | x] = E[eps + gamma xi | x]/(1+gamma^2) = E[m' | x]/sqrt(1+gamma^2) exactly (any data)")


# ------------------------------------------------------------------------------------------------------------
# C10: the exact consistency map of 1-D Gaussian data under VE
# ------------------------------------------------------------------------------------------------------------
@cache
def derive_ve_consistency_map() -> Derivation:
    """The exact probability-flow map and consistency function of 1-D Gaussian data ``N(0, s_d^2)`` under the
    VE process ``x_t = x0 + t z`` (claim C10 in ``docs/claims.md``).

    ``q(x_t) = N(0, t^2 + s_d^2)``, score ``d/dx log q = -x / (t^2 + s_d^2)`` (differentiated symbolically), the
    probability-flow ODE ``dx/dt = -t score = t x / (t^2 + s_d^2)`` solved by ``sympy.dsolve``:
    ``x(t) = C sqrt(t^2 + s_d^2)``, so the flow map from ``t`` to ``s`` is
    ``x_s = x_t sqrt(s^2 + s_d^2) / sqrt(t^2 + s_d^2)`` and the consistency function (flow to ``eps0 = 0.002``) is
    ``f(x, t) = x sqrt(eps0^2 + s_d^2) / sqrt(t^2 + s_d^2)``. The paper writes ``s`` for the data standard
    deviation ``s_d`` (and the same letter is used for a time here): with that reading it agrees. ``s_d`` is the
    *actual* data standard deviation, not the ``sigma_data = 0.5`` of the CM parameterisation.

    ``expr`` is ``f``, ``func(x, t, s_d, eps0)``; ``extras["flow_map"]`` is ``x_s`` as a function of
    ``(x, t, s, s_d)``, numerically ``d.lambdify("flow_map", tuple(d.extras["flow_args"]))``.
    """
    x, t, s, sd, eps0 = sp.symbols("x t s s_d eps0", positive=True)
    xr = sp.Symbol("x", real=True)
    logq = _gauss_logpdf(xr, 0, t**2 + sd**2)
    score = sp.simplify(sp.diff(logq, xr))
    X = sp.Function("X")
    ode = sp.Eq(X(t).diff(t), (-t * score).subs(xr, X(t)))
    sol = sp.dsolve(ode).rhs  # C1 * sqrt(t^2 + s_d^2)
    flow = sp.simplify(x * sol.subs(t, s) / sol)  # x_s from x_t = x: the constant cancels
    f = sp.simplify(flow.subs(s, eps0))
    # along a trajectory X(t), f(X(t), t) is constant: d/dt f = df/dt + df/dx * dX/dt = 0
    velocity = (-t * score).subs(xr, x)
    total_derivative = sp.simplify(sp.diff(f, t) + sp.diff(f, x) * velocity)
    return _make("ve_consistency_map", f, (x, t, sd, eps0),
                 {"score": score, "ode_solution": sol, "flow_map": flow, "flow_args": sp.Tuple(x, t, s, sd),
                  "velocity": velocity},
                 {"score + x/(t^2+s_d^2)": score + xr / (t**2 + sd**2),
                  "ODE residual of the solution": sp.simplify(sp.diff(sol, t) - (-t * score).subs(xr, sol)),
                  "flow - x sqrt(s^2+s_d^2)/sqrt(t^2+s_d^2)": flow - x * sp.sqrt(s**2 + sd**2) / sp.sqrt(t**2 + sd**2),
                  "f - x sqrt(eps0^2+s_d^2)/sqrt(t^2+s_d^2)": f - x * sp.sqrt(eps0**2 + sd**2) / sp.sqrt(t**2 + sd**2),
                  "f(x, eps0) - x": f.subs(t, eps0) - x,
                  "d/dt f(X(t), t)": total_derivative},
                 "f(x, t) = x sqrt(eps0^2 + s_d^2) / sqrt(t^2 + s_d^2)")

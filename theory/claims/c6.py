"""C6 (check, restated): random perturbations scale the Bayes eps-predictor. As worded (constant factors against
the clean predictor) the statement fails; it holds exactly against the Bayes predictor of the perturbed input's own
noise level (see ``docs/claims.md``). Monte Carlo regression on anisotropic Gaussian data against both readings."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from atdiff.processes import Process, VPDiscrete
from theory.at_linear import (
    clean_slope,
    equivariant_random_slope,
    ip_slope,
    reference_slope,
)
from theory.claims import Verdict, claim
from theory.claims.common import (
    F64,
    f64,
    new_generator,
    round_value,
    save_figure,
    single_thread,
    subplots,
    symbolic_error,
)
from theory.gaussian import (
    Gaussian,
)


def regress_affine(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Least squares ``y ~ x A^T + b`` with standard errors. ``x, y`` ``(n, d)``; returns ``A`` ``(d, d)``,
    ``b`` ``(d,)`` and the standard errors of ``A`` ``(d, d)`` (homoscedastic per output)."""
    n, d = x.shape
    design = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
    coef = torch.linalg.lstsq(design, y).solution  # (d + 1, d)
    resid = y - design @ coef
    res_var = (resid**2).sum(0) / (n - d - 1)  # (d,)
    inv_diag = torch.linalg.inv(design.T @ design).diagonal()[:d]  # (d,)
    se = (res_var[:, None] * inv_diag[None, :]).sqrt()
    return coef[:d].T, coef[d], se


def max_z(estimate: Tensor, predicted: Tensor, se: Tensor) -> float:
    """``max |estimate - predicted| / se`` (a z-score; below ~5 for a correct prediction)."""
    return float(((estimate - predicted).abs() / se).max())


def _rotation(d: int, gen: torch.Generator) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    return q


def c6_mc_slopes(data: Gaussian, process: VPDiscrete, t: float, gamma: float, n: int, gen: torch.Generator
                 ) -> dict[str, tuple[Tensor, Tensor]]:
    """Monte Carlo regression of the optimal affine predictors (matrix ``A`` and standard errors).

    ``eq``: ``delta = c xi`` with ``c = gamma sigma_t`` (a ``gaussian`` perturber of atdiff, rms budget), target
    ``eps + delta / sigma_t``; ``ip``: atdiff's ``input_perturbation(gamma)``, target ``eps``; ``clean``: no delta.
    """
    from atdiff.perturb import Perturber, input_perturbation

    tt = torch.full((n,), float(t), dtype=F64)
    sigma = float(process.sigma(f64(t)))
    x0 = data.mean + (torch.randn(n, data.dim, generator=gen, dtype=F64) * data.evals.sqrt()) @ data.evecs.T
    eps = torch.randn(n, data.dim, generator=gen, dtype=F64)
    x_t = process.add_noise(x0, eps, tt)
    eq = Perturber("gaussian", budget="rms", radius=gamma * sigma)
    ip = input_perturbation(gamma)
    d_eq = eq.init_delta(x0, eq.radius_for(x0, tt, process), gen)
    d_ip = ip.init_delta(x0, ip.radius_for(x0, tt, process), gen)
    fits = {"clean": regress_affine(x_t, eps), "eq": regress_affine(x_t + d_eq, eps + d_eq / sigma),
            "ip": regress_affine(x_t + d_ip, eps)}
    return {k: (A, se) for k, (A, _, se) in fits.items()}


def c6_predicted(data: Gaussian, process: VPDiscrete, t: float, gamma: float, *, eq_factor: float | None = None,
                 ip_factor: float | None = None, base: str = "ref") -> dict[str, Tensor]:
    """Predicted predictor matrices ``U diag(slope) U^T`` ``(d, d)`` for ``clean``, ``eq`` and ``ip``.

    ``eq = eq_factor * base``, ``ip = ip_factor * base``, where ``base`` is the ``ref`` slope (Bayes predictor at
    ``sigma' = sigma sqrt(1 + gamma^2)``) or the ``clean`` slope. The defaults are the paper's factors
    ``sqrt(sigma^2 + c^2)/sigma = sqrt(1 + gamma^2)`` (with ``c = gamma sigma``) and ``1/sqrt(1 + gamma^2)``; with
    ``base="ref"`` they are exact (:func:`equivariant_random_slope`, :func:`ip_slope`). A test or a claim feeds
    other factors or ``base="clean"`` to see that Monte Carlo rejects them.
    """
    tt = f64(t)
    alpha, sigma = process.alpha(tt), process.sigma(tt)
    root = math.sqrt(1 + gamma**2)
    eq_factor = root if eq_factor is None else eq_factor
    ip_factor = 1 / root if ip_factor is None else ip_factor
    lam, u = data.evals, data.evecs
    clean = clean_slope(alpha, sigma, lam)
    if base == "ref":
        ref = reference_slope(alpha, sigma * root, lam)
    elif base == "clean":
        ref = clean
    else:
        raise ValueError(f"base: expected 'ref' or 'clean', got {base!r}")
    slopes = {"clean": clean, "eq": eq_factor * ref, "ip": ip_factor * ref}
    return {k: (u * v) @ u.T for k, v in slopes.items()}


def c6_factor_table(alpha: Tensor, sigma: Tensor, lam: Tensor, gamma: Tensor) -> dict[str, Tensor]:
    """Per-eigenvalue factors: relative to the reference predictor at ``sigma' = sigma sqrt(1+gamma^2)`` and
    relative to the clean predictor at the same input."""
    sig_ref = sigma * (1 + gamma**2).sqrt()
    ref = reference_slope(alpha, sig_ref, lam)
    clean = clean_slope(alpha, sigma, lam)
    eq, ip = equivariant_random_slope(alpha, sigma, lam, gamma * sigma), ip_slope(alpha, sigma, lam, gamma)
    return {"eq_over_ref": eq / ref, "ip_over_ref": ip / ref, "eq_over_clean": eq / clean,
            "ip_over_clean": ip / clean}


def symbolic_c6_check(process: Process) -> dict[str, Any]:
    """The 1-D slopes :func:`equivariant_random_slope` and :func:`ip_slope` against :mod:`theory.symbolic`'s
    regression derivations (largest relative error over ``t``, ``s``, ``c``, ``gamma``)."""
    from theory import symbolic as sym  # sympy loads in ~1 s: only when a full run needs it

    eq, ip = sym.derive_random_delta_equivariant(), sym.derive_ip_scaling()
    err = 0.0
    for t in (10.0, 300.0, 900.0):
        tt = f64(t)
        alpha, sigma = process.alpha(tt), process.sigma(tt)
        abar, sg = float(alpha**2), float(sigma)
        for s_data in (0.1, 1.0, 5.0):
            for g in (0.1, 0.7):
                mine_eq = equivariant_random_slope(alpha, sigma, f64(s_data**2), f64(g) * sigma)
                mine_ip = ip_slope(alpha, sigma, f64(s_data**2), f64(g))
                err = max(err, abs(float(mine_eq) / float(eq.func(abar, sg, s_data, g * sg)) - 1),
                          abs(float(mine_ip) / float(ip.func(abar, sg, s_data, g)) - 1))
    return {"symbolic_rel_error": err, "symbolic_derivations_verified": bool(eq.verified and ip.verified)}


def _c6_data(d: int, gen: torch.Generator) -> Gaussian:
    lam = torch.logspace(-2, 1, d, dtype=F64)
    u = _rotation(d, gen)
    return Gaussian(torch.randn(d, generator=gen, dtype=F64), (u * lam) @ u.T)


def _c6_figure(out: Path | None, process: Process, gamma: float) -> list[str]:
    if out is None:
        return []
    lam = torch.logspace(-4, 3, 200, dtype=F64)
    fig, axes = subplots(2, size=(5.0, 3.4))
    axes = axes[0]
    for t in (20.0, 200.0, 600.0):
        tt = f64(t)
        f = c6_factor_table(process.alpha(tt), process.sigma(tt), lam, f64(gamma))
        axes[0].plot(lam, f["eq_over_clean"], label=f"t={t:g}")
        axes[1].plot(lam, f["ip_over_clean"], label=f"t={t:g}")
    for ax, name, val in ((axes[0], "equivariant random delta", math.sqrt(1 + gamma**2)),
                          (axes[1], "input perturbation", 1 / math.sqrt(1 + gamma**2))):
        ax.axhline(val, color="k", ls="--", label="the paper's factor")
        ax.axhline(1.0, color="gray", ls=":")
        ax.set(xscale="log", xlabel="data eigenvalue lam", ylabel="slope / clean Bayes slope",
               title=f"{name}, gamma = {gamma:g}")
        ax.legend(fontsize=7)
    return save_figure(fig, out, "c6_factors.png", dpi=90)


@claim("C6")
@single_thread
def claim_c6(*, quick: bool, seed: int, out: Path | None) -> Verdict:
    """C6: exact scaling factors of the Bayes eps-predictor under random equivariant delta and IP, checked against
    Monte Carlo regression on anisotropic Gaussian data."""
    gen = new_generator(seed)
    process = VPDiscrete("linear")
    d, n = (3, 20_000) if quick else (4, 400_000)
    data = _c6_data(d, gen)
    cases = ((300.0, 0.1), (300.0, 0.5)) if quick else ((50.0, 0.5), (300.0, 0.1), (300.0, 0.5), (700.0, 1.0))
    z_exact, z_clean, factors = [], [], {}
    direction_ok = True
    for t, gamma in cases:
        mc = c6_mc_slopes(data, process, t, gamma, n, gen)
        exact = c6_predicted(data, process, t, gamma)
        z_exact.append(max(max_z(mc[k][0], exact[k], mc[k][1]) for k in ("clean", "eq", "ip")))
        on_clean = c6_predicted(data, process, t, gamma, base="clean")
        z_clean.append(max(max_z(mc[k][0], on_clean[k], mc[k][1]) for k in ("eq", "ip")))
        tt, g = f64(t), f64(gamma)
        f = c6_factor_table(process.alpha(tt), process.sigma(tt), data.evals, g)
        direction_ok &= bool((f["eq_over_clean"] >= 1).all() and (f["ip_over_clean"] <= 1).all())
        eq_c, ip_c = f["eq_over_clean"], f["ip_over_clean"]
        factors[f"t={t:g},gamma={gamma:g}"] = {
            "sqrt(1+gamma^2)": round_value(math.sqrt(1 + gamma**2), 8),
            "eq_over_clean_range": [round_value(float(eq_c.min())), round_value(float(eq_c.max()))],
            "ip_over_clean_range": [round_value(float(ip_c.min())), round_value(float(ip_c.max()))],
            "mc_max_z_exact": round_value(z_exact[-1], 3),
            "mc_max_z_paper_factor_on_clean": round_value(z_clean[-1], 3),
        }
    z_max = max(z_exact)
    sym = {"symbolic_check": "skipped in quick mode (sympy derivations ~1 s)"} if quick else symbolic_c6_check(process)
    sym_ok = quick or symbolic_error(sym, ("symbolic_rel_error",), "symbolic_derivations_verified") < 1e-10
    holds = z_max < 6 and direction_ok and sym_ok
    as_stated = max(z_clean) < 6
    quantities = {
        "mc_vs_exact_max_z": z_max,
        "as_stated_mc_max_z": max(z_clean),
        "opposite_directions_vs_clean": direction_ok,
        **sym,
        "factors": factors,
        "n_mc": n,
    }
    restatement = (f"as stated (constant factors on the clean predictor) the MC rejects it, max z {max(z_clean):.1f}; "
                   f"restated: relative to eps*_(alpha, sigma'), the Bayes predictor at the perturbed input's own "
                   f"noise level sigma' = sqrt(sigma^2 + c^2) (c = gamma sigma), the equivariant random delta scales "
                   f"by exactly sqrt(1+gamma^2) and IP by 1/sqrt(1+gamma^2) (MC max z {z_max:.2f}); relative to the "
                   "clean predictor the factors depend on the data eigenvalue lam, eq = (1+gamma^2) r(lam) in "
                   "[1, 1+gamma^2] and ip = r(lam) in [1/(1+gamma^2), 1], r = (alpha^2 lam + sigma^2)/(alpha^2 lam + "
                   "sigma'^2): still opposite directions.")
    notes = ("Monte Carlo regression of the optimal affine predictors (atdiff's gaussian perturber with the "
             "equivariant target; atdiff's input_perturbation) on anisotropic Gaussian data against the exact "
             "restated factors (mc_vs_exact_max_z) and against the paper's constant factors applied to the clean "
             "predictor (as_stated_mc_max_z). The check is the restatement; margin: 6 - max z.")
    return Verdict(
        id="C6", kind="check", relation="eq/ref = sqrt(1+gamma^2) > 1 > 1/sqrt(1+gamma^2) = ip/ref",
        statement="Random delta = c xi with the equivariant target scales the optimal eps up by "
                  "sqrt(sigma^2+c^2)/sigma; IP scales it down by 1/sqrt(1+gamma^2) (opposite directions)",
        quantities=quantities, holds=holds, margin=6 - z_max, notes=notes, as_stated=as_stated,
        restatement="" if as_stated else restatement, figures=_c6_figure(out, process, 0.5))

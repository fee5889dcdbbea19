"""Figures and the table of C5: the DRO-ideal AT loss L_AT(a) (part a); the W2 of each arm over the Bayes
model's, per NFE, and the final standard-deviation ratio (part b)."""

from __future__ import annotations

from pathlib import Path

import torch

from atdiff.processes import Process
from theory.at_linear import at_minimiser_1d, bayes_slope, l_at_1d
from theory.claims.common import F64, f64, save_figure, subplots

__all__ = ["c5_figures", "c5_markdown_table", "l_at_figure"]

_STYLE = {"free-at": "C0", "dro": "C3", "ip": "C2", "es": "C1"}


def c5_figures(out: Path | None, table: dict, nfes: tuple[int, ...], settings, rho: float) -> list[str]:
    """``c5_final_w2.png``: per setting (columns) and sampler (rows), final W2 / Bayes W2 against NFE for the four
    arms at strength ``rho``; the Bayes model's final sd / data sd in the title."""
    if out is None:
        return []
    fig, axes = subplots(len(settings), 2, size=(3.4, 2.9))
    for col, setting in enumerate(settings):
        for row, sampler in enumerate(("ddim", "ddpm")):
            ax = axes[row][col]
            base = table[f"{setting.name}/{sampler}/bayes"]
            for arm, color in _STYLE.items():
                w2 = table[f"{setting.name}/{sampler}/{arm}@{rho:.3g}"]["w2"]
                ax.plot(nfes, [w / b for w, b in zip(w2, base["w2"], strict=True)], "-o", color=color, ms=3,
                        label=arm)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(list(nfes), [str(k) for k in nfes])
            ax.set_xticks([], minor=True)
            sd = ", ".join(f"{v:.2f}" for v in base["sd_ratio"])
            ax.set_title(f"{setting.name} {sampler}\nBayes sd ratio {sd}", fontsize=8)
            if col == 0:
                ax.set_ylabel("W2 / W2 (Bayes)")
            if row == 1:
                ax.set_xlabel("NFE")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"C5: final W2 over the Bayes model's, arms at rho = {rho:g}", fontsize=10)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.1, top=0.84, wspace=0.3, hspace=0.55)
    return save_figure(fig, out, "c5_final_w2.png", layout=False, dpi=80)


def l_at_figure(out: Path | None, process: Process) -> list[str]:
    """``c5_l_at_curves.png``: ``L_AT(a)`` of 1-D ``N(0, 0.25)`` at three times and four radii, with minimisers."""
    if out is None:
        return []
    fig, axes = subplots(3, size=(4.0, 3.4))
    lam = f64(0.25)
    for ax, t in zip(axes[0], (20.0, 200.0, 600.0), strict=True):
        tt = f64([t])
        alpha, sigma = process.alpha(tt), process.sigma(tt)
        a_star, inv = float(bayes_slope(alpha, sigma, lam)), float(1 / sigma)
        a = torch.linspace(a_star - 0.6 * (inv - a_star), inv + 0.3 * (inv - a_star), 300, dtype=F64)
        etas = f64([0.0, 0.03, 0.1, 0.3])
        for eta in etas:
            ax.plot(a, l_at_1d(a, alpha, sigma, lam, eta), label=f"eta={float(eta):g}")
        a_at = at_minimiser_1d(alpha, sigma, lam, etas)
        ax.plot(a_at, l_at_1d(a_at, alpha, sigma, lam, etas), "k.")
        ax.axvline(a_star, color="gray", ls=":", label="a* = sigma/v")
        ax.axvline(inv, color="gray", ls="--", label="1/sigma")
        ax.set(title=f"t = {t:g} (sigma = {float(sigma):.3f})", xlabel="a", ylabel="L_AT(a)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("C5: DRO-ideal L_AT(a), 1-D N(0, 0.25), eps = a x (dots: minimisers)")
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.15, top=0.83, wspace=0.25)
    return save_figure(fig, out, "c5_l_at_curves.png", layout=False, dpi=90)


def c5_markdown_table(table: dict[str, dict[str, list[float]]], nfes: tuple[int, ...], rho: float) -> str:
    """The C5 table at strength ``rho``: one row per setting / sampler / arm, W2 over the Bayes model's W2 per
    NFE, and the final sd ratio (the Bayes row gives its W2 and sd ratio)."""
    lines = ["| setting / sampler | arm | " + " | ".join(f"NFE {k}" for k in nfes) + " | final sd / data sd |",
             "|---|---|" + "---|" * (len(nfes) + 1)]
    for key, row in table.items():
        setting, sampler, name = key.split("/")
        if name != "bayes" and name != f"{name.split('@')[0]}@{rho:.3g}":
            continue
        base = table[f"{setting}/{sampler}/bayes"]["w2"]
        if name == "bayes":
            cells = [f"W2 {w:.3g}" for w in row["w2"]]
        else:
            cells = [f"{w / b:.3f}" for w, b in zip(row["w2"], base, strict=True)]
        sd = " / ".join(f"{v:.3f}" for v in row["sd_ratio"])
        lines.append(f"| {setting} / {sampler} | {name} | " + " | ".join(cells) + f" | {sd} |")
    return "\n".join(lines)

"""Figures of C5: the W2 of each arm over the Bayes model's, per NFE, and the final standard-deviation ratio."""

from __future__ import annotations

from pathlib import Path

from theory.claims.common import save_figure, subplots

__all__ = ["c5_figures"]

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

"""The paper's results layout: one metric in a table of samplers (rows) by NFE (columns), as markdown and as a
plot of the metric against NFE (Wang et al. 2025 report FID this way for IDDPM, DDIM, ES and DPM-Solver)."""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["nfe_table_markdown", "plot_metric_vs_nfe"]


def nfe_table_markdown(results: Mapping[str, Mapping[int, float]], metric: str = "FID",
                       floor: float | None = None, command: str | None = None) -> str:
    """``results[sampler][nfe] = value`` as a markdown table: one row per sampler (in the given order), one column
    per NFE (ascending, the union over samplers; a missing run shows ``-``); the real-vs-real ``floor`` and the
    ``command`` that produced it below the table when given."""
    nfes = sorted({int(n) for row in results.values() for n in row})
    lines = [f"| {metric} \\ NFE | " + " | ".join(str(n) for n in nfes) + " |",
             "|---|" + "---|" * len(nfes)]
    for sampler, row in results.items():
        cells = [f"{row[n]:.4g}" if n in row else "-" for n in nfes]
        lines.append(f"| {sampler} | " + " | ".join(cells) + " |")
    if floor is not None:
        lines.append(f"\nreal-vs-real floor: {floor:.4g}")
    if command:
        lines.append(f"\ncommand: `{command}`")
    return "\n".join(lines)


def plot_metric_vs_nfe(results: Mapping[str, Mapping[int, float]], path: str | os.PathLike | None = None,
                       metric: str = "FID", floor: float | None = None):
    """One line per sampler (metric against NFE, log-x), a dashed line at the floor; saved to ``path`` when given.
    Returns the matplotlib figure."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend and figure list alone

    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    for sampler, row in results.items():
        nfes = sorted(row)
        ax.plot(nfes, [row[n] for n in nfes], marker="o", label=sampler)
    if floor is not None:
        ax.axhline(floor, color="gray", linestyle="--", label="real-vs-real floor")
    ax.set_xscale("log")
    ax.set_xlabel("NFE (network evaluations per sample)")
    ax.set_ylabel(metric)
    ax.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig

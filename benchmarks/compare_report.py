"""The reproduction study's result and its report: paired statistics over seeds, the paper-layout table, JSON, plots.

Every suite of :mod:`benchmarks.compare` (the image suites, and the toy suite of :mod:`benchmarks.compare_toy`)
returns a :class:`SuiteResult`; :func:`write_report` turns it into ``compare.md``, ``compare.json``,
``metric_vs_nfe.png`` and ``robustness.png``.

Statistics. Lower is better for the primary metric. For a method ``m`` and a baseline ``b`` (``std``, or ``std+es*``,
the std model with its tuned epsilon scaling) the paired difference on seed ``s`` is
``metric(m, s) - metric(b, s)``: both were fine-tuned from the same pretrained weights on the same data stream and
sampled from the same noise, so the pairing removes what the seeds share. Its 95 % interval is Student's t over the
seeds (``mean +- t_{0.975, n-1} sd / sqrt(n)``). A WIN needs the whole interval below 0, a LOSS the whole interval
above 0; an interval that contains 0 is a TIE, and so is a single seed (no interval).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["METHODS", "SAMPLERS", "NFES", "ES_ROW", "SuiteResult", "paired_interval", "verdict", "mean_spread",
           "cell_values", "paired_comparisons", "results_table", "comparison_table", "records_table",
           "write_report"]

#: fine-tuning methods (std = continued clean training), in the order of every table
METHODS = ("std", "ip", "at", "at-true-grad", "at-kl")
#: registry names in atdiff.samplers (the paper's four samplers)
SAMPLERS = ("iddpm", "iddpm-es", "ddim", "dpm-solver++")
NFES = (5, 8, 10, 20, 50)
#: the pseudo-method: the std model sampled with epsilon scaling at its tuned lambda per (sampler, NFE)
ES_ROW = "std+es*"
LEVEL = 0.95


@dataclass
class SuiteResult:
    """What a suite of the reproduction study returns (see the module docstring of :mod:`benchmarks.compare`)."""

    suite: str
    metric: str
    seeds: list[int]
    floor: dict[str, float]
    cells: list[dict]
    robustness: list[dict]
    tuning: dict
    extra: dict = field(default_factory=dict)
    grids: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- statistics


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation with ddof 1; 0 for a single value) of ``values`` ``(n,)``."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("values: expected at least one value")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def paired_interval(diffs: Sequence[float], level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, lower, upper) of the ``level`` Student-t interval of the mean of paired differences ``diffs``
    ``(n,)``; with one difference the interval is unbounded (``-inf, inf``): one seed cannot separate methods."""
    from scipy.stats import t as student_t

    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"diffs: expected a non-empty 1-D sequence, got shape {d.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level: expected a probability in (0, 1), got {level}")
    mean = float(d.mean())
    if d.size == 1:
        return mean, -math.inf, math.inf
    half = float(student_t.ppf(0.5 + level / 2, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size))
    return mean, mean - half, mean + half


def verdict(lower: float, upper: float) -> str:
    """``win`` (interval below 0: lower metric than the baseline), ``loss`` (above 0), else ``tie``."""
    if upper < 0:
        return "win"
    if lower > 0:
        return "loss"
    return "tie"


def cell_values(cells: Sequence[dict], metric: str, seeds: Sequence[int]) -> dict[tuple[str, str, int], list[float]]:
    """``{(method, sampler, nfe): [value per seed in the order of seeds]}`` for the cells present on every seed."""
    by_key: dict[tuple[str, str, int], dict[int, float]] = {}
    for c in cells:
        if c.get(metric) is None:
            continue
        by_key.setdefault((c["method"], c["sampler"], int(c["nfe"])), {})[int(c["seed"])] = float(c[metric])
    return {k: [v[s] for s in seeds] for k, v in by_key.items() if all(s in v for s in seeds)}


def paired_comparisons(result: SuiteResult, baseline: str, metric: str | None = None) -> list[dict]:
    """One row per (method, sampler, nfe) other than ``baseline`` present for the baseline too: ``diff`` (mean
    paired difference method - baseline), ``lower``, ``upper`` (95 % t interval over the seeds), ``verdict``."""
    metric = metric or result.metric
    values = cell_values(result.cells, metric, result.seeds)
    rows = []
    for (method, sampler, nfe), vals in values.items():
        base = values.get((baseline, sampler, nfe))
        if method == baseline or base is None:
            continue
        mean, lo, hi = paired_interval(np.subtract(vals, base))
        rows.append(dict(method=method, baseline=baseline, sampler=sampler, nfe=nfe, diff=mean, lower=lo, upper=hi,
                         verdict=verdict(lo, hi)))
    return rows


# ----------------------------------------------------------------------------------------------- markdown


def _fmt(x: Any) -> str:
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, int | np.integer):
        return str(int(x))
    if isinstance(x, float | np.floating):
        return "inf" if math.isinf(x) and x > 0 else "-inf" if math.isinf(x) else f"{float(x):.4g}"
    if isinstance(x, list | tuple):
        return ", ".join(_fmt(v) for v in x)
    return str(x).replace("|", "/")


def _ordered(names: Sequence[str], known: Sequence[str]) -> list[str]:
    return [n for n in known if n in names] + sorted(n for n in names if n not in known)


def results_table(result: SuiteResult, metric: str | None = None) -> str:
    """The paper's layout: one row per (sampler, method), one column per NFE holding ``mean +- sd`` over the seeds,
    and the real-vs-real floor at the same sample size in the last column."""
    metric = metric or result.metric
    values = cell_values(result.cells, metric, result.seeds)
    nfes = sorted({k[2] for k in values})
    samplers = _ordered({k[1] for k in values}, SAMPLERS)
    methods = _ordered({k[0] for k in values}, (*METHODS, ES_ROW))
    floor = result.floor.get(metric)
    lines = ["| sampler | method | " + " | ".join(f"NFE {n}" for n in nfes) + " | floor |",
             "|---|---|" + "---|" * (len(nfes) + 1)]
    for s in samplers:
        for m in methods:
            if not any((m, s, n) in values for n in nfes):
                continue
            cells = []
            for n in nfes:
                if (m, s, n) not in values:
                    cells.append("-")
                    continue
                mean, sd = mean_spread(values[(m, s, n)])
                cells.append(f"{mean:.4g} +- {sd:.2g}")
            lines.append(f"| {s} | {m} | " + " | ".join(cells) + f" | {_fmt(floor) if floor is not None else '-'} |")
    return "\n".join(lines)


def comparison_table(rows: Sequence[dict]) -> str:
    """Paired differences (rows of :func:`paired_comparisons`) as a (sampler, method) x NFE table of
    ``diff [lower, upper] verdict``, then the win/tie/loss counts per method."""
    if not rows:
        return "(no paired comparison: the baseline has no cells)"
    nfes = sorted({r["nfe"] for r in rows})
    samplers = _ordered({r["sampler"] for r in rows}, SAMPLERS)
    methods = _ordered({r["method"] for r in rows}, (*METHODS, ES_ROW))
    index = {(r["method"], r["sampler"], r["nfe"]): r for r in rows}
    lines = ["| sampler | method | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|---|" + "---|" * len(nfes)]
    for s in samplers:
        for m in methods:
            if not any((m, s, n) in index for n in nfes):
                continue
            cells = []
            for n in nfes:
                r = index.get((m, s, n))
                cells.append("-" if r is None else
                             f"{r['diff']:+.3g} [{_fmt(r['lower'])}, {_fmt(r['upper'])}] {r['verdict']}")
            lines.append(f"| {s} | {m} | " + " | ".join(cells) + " |")
    lines += ["", "| method | win | tie | loss |", "|---|---|---|---|"]
    for m in methods:
        mine = [r["verdict"] for r in rows if r["method"] == m]
        lines.append(f"| {m} | {mine.count('win')} | {mine.count('tie')} | {mine.count('loss')} |")
    return "\n".join(lines)


def records_table(records: Sequence[dict]) -> str:
    """A list of flat dicts as a markdown table (columns: the union of the keys in first-seen order)."""
    if not records:
        return "(empty)"
    cols: list[str] = []
    for r in records:
        cols += [k for k in r if k not in cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in records]
    return "\n".join(lines)


def _robustness_summary(result: SuiteResult) -> list[dict]:
    """Mean +- sd over seeds of ``move`` and the metric per (method, kind, radius), and the paired move difference
    against std with its verdict (a smaller move is a win)."""
    groups: dict[tuple, dict[int, dict]] = {}
    for r in result.robustness:
        groups.setdefault((r["method"], r["kind"], float(r["radius"])), {})[int(r["seed"])] = r
    rows = []
    def order(key: tuple) -> tuple:
        return (METHODS.index(key[0]) if key[0] in METHODS else len(METHODS), *key)

    for (method, kind, radius), by_seed in sorted(groups.items(), key=lambda kv: order(kv[0])):
        seeds = [s for s in result.seeds if s in by_seed]
        move = mean_spread([by_seed[s]["move"] for s in seeds])
        metric = mean_spread([by_seed[s][result.metric] for s in seeds])
        row = {"method": method, "kind": kind, "radius": radius, "move": f"{move[0]:.4g} +- {move[1]:.2g}",
               result.metric: f"{metric[0]:.4g} +- {metric[1]:.2g}"}
        base = groups.get(("std", kind, radius), {})
        if method != "std" and all(s in base for s in seeds):
            mean, lo, hi = paired_interval([by_seed[s]["move"] - base[s]["move"] for s in seeds])
            row["move - std"] = f"{mean:+.3g} [{_fmt(lo)}, {_fmt(hi)}] {verdict(lo, hi)}"
        rows.append(row)
    return rows


def _render_extra(extra: dict, depth: int = 3) -> list[str]:
    out: list[str] = []
    for key, value in extra.items():
        if key == "timing":
            continue
        out.append(f"{'#' * depth} {key}\n")
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            out.append(records_table(value))
        elif isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()) and depth < 5:
            out += _render_extra(value, depth + 1)
            continue
        elif isinstance(value, dict):
            out.append(records_table([{"key": k, "value": v} for k, v in value.items()]))
        elif isinstance(value, list):
            out += [f"- {_fmt(v)}" for v in value]
        else:
            out.append(_fmt(value))
        out.append("")
    return out


def _tuning_lines(tuning: dict) -> list[str]:
    """The chosen values: the ES lambda as a sampler x NFE table, every other scalar as a line; the searches
    (every score of every candidate) stay in ``compare.json``."""
    lines, es = [], tuning.get("es_lambda")
    if isinstance(es, dict) and es:
        nfes = sorted({int(n) for row in es.values() for n in row})
        lines += ["ES lambda of `std+es*`, chosen per sampler and NFE:", "",
                  "| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
        for sampler, row in es.items():
            by_nfe = {int(n): v for n, v in row.items()}
            lines.append(f"| {sampler} | " + " | ".join(_fmt(by_nfe.get(n, "")) for n in nfes) + " |")
        lines.append("")
    for key, value in tuning.items():
        if key != "es_lambda" and not isinstance(value, dict | list):
            lines.append(f"- {key}: {_fmt(value)}")
    searched = [key for key, value in tuning.items() if isinstance(value, dict | list) and key != "es_lambda"]
    if searched:
        lines.append(f"- every candidate's score: `compare.json`, tuning keys {', '.join(searched)}")
    return lines + [""]


def _timing_lines(timing: dict) -> list[str]:
    return [f"- {k}: {v:.1f} s" if isinstance(v, int | float) else f"- {k}: {v}" for k, v in timing.items()]


def _sizes_line(extra: dict) -> list[str]:
    """One line naming the run's sizes when ``extra["sizes"]`` has them (image suites), else nothing."""
    z = extra.get("sizes")
    keys = ("num_samples", "updates", "pretrain_steps")
    if not isinstance(z, dict) or not all(k in z for k in keys):
        return []
    return [f"Sizes: {z['num_samples']} samples per cell (the floor compares {z['num_samples']} real images with "
            f"{z['num_samples']} others), {z['updates']} parameter updates per fine-tuning run from "
            f"{z['pretrain_steps']} clean pretraining steps; all sizes under Details.", ""]


def markdown(result: SuiteResult, command: str, machine: str) -> str:
    """The text of ``compare.md``."""
    secondary = sorted({k for c in result.cells for k in c} - {"method", "seed", "sampler", "nfe", "nfe_measured",
                                                               result.metric})
    lines = [f"# Reproduction study, suite `{result.suite}`: {result.metric} (lower is better)", "",
             f"Reported seeds {result.seeds} (mean +- sample sd over seeds in every cell); the tuning seed "
             f"{result.tuning.get('held_out_seed')} is not reported. Floor: the same metric between two disjoint "
             "real subsets of the same size as the samples.", "", *_sizes_line(result.extra),
             f"command: `{command}`", "", f"machine: {machine}", "", "![metric vs NFE](metric_vs_nfe.png)", "",
             f"## {result.metric} by sampler, method and NFE", "", results_table(result), ""]
    for base in ("std", ES_ROW):
        lines += [f"## Paired differences against `{base}` ({result.metric}; negative = better than {base})", "",
                  "Mean difference over seeds, its 95 % Student-t interval, and the verdict: an interval that contains "
                  "0 is a tie, never a win.", "", comparison_table(paired_comparisons(result, base)), ""]
    for metric in secondary:
        lines += [f"## {metric}", "", results_table(result, metric), ""]
    if result.robustness:
        lines += ["## Robustness of the sampling trajectory", "", "![robustness](robustness.png)", "",
                  "`move`: rms over samples of ||x_final(perturbed) - x_final(clean)|| / sqrt(d); a smaller move "
                  "against std (paired over seeds) is a win.", "", records_table(_robustness_summary(result)), ""]
    lines += ["## Tuning (held-out seed)", "", *_tuning_lines(result.tuning)]
    if result.grids:
        lines += ["## Sample grids", ""] + [f"- {m}: ![{m}]({p})" for m, p in result.grids.items()] + [""]
    if result.extra:
        lines += ["## Details", ""] + _render_extra(result.extra)
    timing = result.extra.get("timing")
    if isinstance(timing, dict):
        lines += ["## Timing", ""] + _timing_lines(timing) + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- plots and files


def plot_metric_vs_nfe(result: SuiteResult, path: Path) -> None:
    """One panel per sampler: the metric against NFE, a line per method with error bars (sd over seeds), the
    floor dashed."""
    from matplotlib.figure import Figure

    values = cell_values(result.cells, result.metric, result.seeds)
    samplers = _ordered({k[1] for k in values}, SAMPLERS) or ["(none)"]
    methods = _ordered({k[0] for k in values}, (*METHODS, ES_ROW))
    fig = Figure(figsize=(4 * len(samplers), 3.6))
    axes = fig.subplots(1, len(samplers), squeeze=False)[0]
    for ax, s in zip(axes, samplers, strict=True):
        for m in methods:
            nfes = sorted(n for (mm, ss, n) in values if mm == m and ss == s)
            if not nfes:
                continue
            stats = [mean_spread(values[(m, s, n)]) for n in nfes]
            ax.errorbar(nfes, [a for a, _ in stats], yerr=[b for _, b in stats], marker="o", capsize=3, label=m,
                        linestyle="--" if m == ES_ROW else "-")
        if result.metric in result.floor:
            ax.axhline(result.floor[result.metric], color="gray", linestyle=":", label="real-vs-real floor")
        ax.set_xscale("log")
        ticks = sorted({n for (_, ss, n) in values if ss == s})
        ax.set_xticks(ticks, [str(n) for n in ticks])
        ax.minorticks_off()
        ax.set_title(s)
        ax.set_xlabel("NFE")
        ax.set_ylabel(result.metric)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_robustness(result: SuiteResult, path: Path) -> None:
    """One panel per perturbation kind: ``move`` against the radius, a line per method (mean +- sd over seeds)."""
    from matplotlib.figure import Figure

    kinds = sorted({r["kind"] for r in result.robustness}) or ["(none)"]
    fig = Figure(figsize=(4.5 * len(kinds), 3.6))
    axes = fig.subplots(1, len(kinds), squeeze=False)[0]
    for ax, kind in zip(axes, kinds, strict=True):
        for m in _ordered({r["method"] for r in result.robustness}, METHODS):
            by_radius: dict[float, list[float]] = {}
            for r in result.robustness:
                if r["method"] == m and r["kind"] == kind:
                    by_radius.setdefault(float(r["radius"]), []).append(float(r["move"]))
            radii = sorted(by_radius)
            stats = [mean_spread(by_radius[x]) for x in radii]
            ax.errorbar(radii, [a for a, _ in stats], yerr=[b for _, b in stats], marker="o", capsize=3, label=m)
        ax.set_title(f"{kind} perturbation")
        ax.set_xlabel("radius (per-coordinate rms)")
        ax.set_ylabel("move of the final sample (rms)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _finite(value: Any) -> Any:
    """Infinite and NaN floats as strings (JSON has no infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_report(result: SuiteResult, out: Path, command: str, machine: str) -> None:
    """Write ``compare.md``, ``compare.json`` (the result, the paired comparisons, command and machine),
    ``metric_vs_nfe.png`` and ``robustness.png`` (if there are robustness records) into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(markdown(result, command, machine))
    payload = dataclasses.asdict(result)
    payload["comparisons"] = {base: paired_comparisons(result, base) for base in ("std", ES_ROW)}
    payload.update(command=command, machine=machine)
    (out / "compare.json").write_text(json.dumps(_finite(payload), indent=1, default=_json_default) + "\n")
    if result.cells:
        plot_metric_vs_nfe(result, out / "metric_vs_nfe.png")
    if result.robustness:
        plot_robustness(result, out / "robustness.png")


def load_result(path: Path) -> tuple[SuiteResult, str, str]:
    """``(result, command, machine)`` read back from a ``compare.json`` written by :func:`write_report` (to redraw a
    report without recomputing it; non-finite numbers come back as None)."""
    payload = json.loads(Path(path).read_text())
    names = [f.name for f in dataclasses.fields(SuiteResult)]
    missing = [n for n in names if n not in payload]
    if missing:
        raise ValueError(f"path: {path} is not a compare.json (missing {missing})")
    return SuiteResult(**{n: payload[n] for n in names}), payload.get("command", ""), payload.get("machine", "")

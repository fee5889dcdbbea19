"""Temporary stand-in for benchmarks.compare_report until that module is merged (removed afterwards)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

METHODS = ("std", "ip", "at", "at-true-grad", "at-kl")
SAMPLERS = ("iddpm", "iddpm-es", "ddim", "dpm-solver++")
NFES = (5, 8, 10, 20, 50)


@dataclass
class SuiteResult:
    suite: str
    metric: str
    seeds: list[int]
    floor: dict[str, float]
    cells: list[dict]
    robustness: list[dict]
    tuning: dict
    extra: dict = field(default_factory=dict)
    grids: dict[str, str] = field(default_factory=dict)


def paired_interval(diffs, level: float = 0.95) -> tuple[float, float, float]:
    from scipy.stats import t as student_t

    d = np.asarray(diffs, dtype=np.float64)
    mean = float(d.mean())
    if d.size == 1:
        return mean, -math.inf, math.inf
    half = float(student_t.ppf(0.5 + level / 2, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size))
    return mean, mean - half, mean + half


def verdict(lower: float, upper: float) -> str:
    if upper < 0:
        return "win"
    if lower > 0:
        return "loss"
    return "tie"

"""Paired, interleaved wall-clock timing: the ratio of two code paths' times with a confidence interval.

On a shared machine single timings drift by several times within a minute, so a ratio of two medians taken at
different moments means little. Here every *round* times each function once, back to back, in an order that
rotates from round to round; the ratio of two functions is read per round (a slow stretch hits both) and
summarised by the median over rounds, with a percentile-bootstrap confidence interval over rounds.
Used by C11 (``theory.claims.c11``) and by ``benchmarks/at_overhead.py``.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable

__all__ = ["interleaved_times", "paired_ratios", "median_ratio_ci", "repeat_call"]


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int, *, budget: float = math.inf,
                      min_repeats: int = 5, warmup: bool = True, sync: Callable[[], object] | None = None,
                      on_call: Callable[[str], object] | None = None) -> dict[str, list[float]]:
    """Wall time (s) of each function over interleaved rounds.

    One untimed warm-up call each (``warmup``), then ``repeats`` rounds, or fewer (but at least ``min_repeats``)
    once ``budget`` seconds have passed. Round ``r`` calls the functions in their order rotated by ``r``. ``sync``
    (e.g. ``torch.cuda.synchronize``) runs before and after every timed call; ``on_call(name)`` after it (a
    progress bar). Returns ``{name: [seconds per round]}``, all lists of equal length.
    """
    if repeats < 1 or min_repeats < 1:
        raise ValueError(f"repeats: expected repeats >= 1 and min_repeats >= 1, got {repeats}, {min_repeats}")
    sync = sync or (lambda: None)
    names = list(fns)
    if warmup:
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in names}
    begin = time.perf_counter()
    for r in range(repeats):
        if r >= min_repeats and time.perf_counter() - begin > budget:
            break
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync()
            start = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - start)
            if on_call is not None:
                on_call(name)
    return times


def paired_ratios(times: list[float], reference: list[float]) -> list[float]:
    """``times[i] / reference[i]`` per round."""
    if len(times) != len(reference) or not times:
        raise ValueError(f"times: expected as many rounds as reference (> 0), got {len(times)}, {len(reference)}")
    return [a / b for a, b in zip(times, reference, strict=True)]


def median_ratio_ci(times: list[float], reference: list[float], *, level: float = 0.95, resamples: int = 2000,
                    seed: int = 0) -> tuple[float, float, float]:
    """The median over rounds of the paired ratio ``times / reference`` and a percentile-bootstrap confidence
    interval at ``level`` (resampling rounds with replacement). Returns ``(median, low, high)``."""
    if not 0 < level < 1:
        raise ValueError(f"level: expected a number in (0, 1), got {level}")
    ratios = paired_ratios(times, reference)
    rng = random.Random(seed)
    boots = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    tail = (1 - level) / 2
    low = boots[int(math.floor(tail * (resamples - 1)))]
    high = boots[int(math.ceil((1 - tail) * (resamples - 1)))]
    return statistics.median(ratios), low, high


def repeat_call(fn: Callable[[], object], n: int) -> Callable[[], None]:
    """A function calling ``fn`` ``n`` times (to time blocks of equal work)."""

    def block() -> None:
        for _ in range(n):
            fn()

    return block

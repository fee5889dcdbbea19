"""``theory.timing``: interleaved rounds, paired ratios and their bootstrap interval."""

from __future__ import annotations

import random

import pytest

from theory.timing import interleaved_times, median_ratio_ci, paired_ratios, repeat_call


def test_a_constant_ratio_has_a_degenerate_interval():
    ref = [1.0, 2.0, 3.0, 10.0, 0.5]
    assert median_ratio_ci([1.5 * r for r in ref], ref) == pytest.approx((1.5, 1.5, 1.5))


def test_the_interval_covers_the_true_ratio_under_shared_drift():
    rng = random.Random(0)
    drift = [rng.uniform(1, 5) for _ in range(60)]  # a machine slowing down and up hits both arms
    ref = [d * rng.gauss(1.0, 0.02) for d in drift]
    arm = [1.1 * d * rng.gauss(1.0, 0.02) for d in drift]
    median, low, high = median_ratio_ci(arm, ref, seed=1)
    assert low <= median <= high and low < 1.1 < high and high - low < 0.05


def test_rounds_are_interleaved_and_rotated():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    times = interleaved_times(fns, 3, warmup=False)
    assert calls == list("abc" "bca" "cab")
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_repeat_call_and_bad_input():
    calls = []
    repeat_call(lambda: calls.append(1), 4)()
    assert len(calls) == 4
    with pytest.raises(ValueError, match="^times"):
        paired_ratios([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="^level"):
        median_ratio_ci([1.0], [1.0], level=1.0)
    with pytest.raises(ValueError, match="^repeats"):
        interleaved_times({}, 0)

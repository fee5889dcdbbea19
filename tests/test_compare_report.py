"""The reproduction study's statistics and report writer (benchmarks.compare_report) on constructed data."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from benchmarks.compare_report import (
    ES_ROW,
    SuiteResult,
    paired_comparisons,
    paired_interval,
    results_table,
    verdict,
    write_report,
)


def _verdict_of(diffs):
    _, lo, hi = paired_interval(diffs)
    return verdict(lo, hi)


def test_constant_shift_without_noise_is_a_win_or_a_loss():
    assert _verdict_of([-2.0, -2.0, -2.0]) == "win"
    assert _verdict_of([0.5, 0.5, 0.5, 0.5]) == "loss"
    mean, lo, hi = paired_interval([-2.0, -2.0, -2.0])
    assert (mean, lo, hi) == (-2.0, -2.0, -2.0)


def test_symmetric_noise_around_zero_is_a_tie():
    assert _verdict_of([-1.0, 1.0, -1.0, 1.0]) == "tie"
    assert _verdict_of([-3.0, 0.0, 3.0]) == "tie"


def test_a_single_seed_is_never_a_win():
    mean, lo, hi = paired_interval([-100.0])
    assert mean == -100.0 and lo == -math.inf and hi == math.inf
    assert verdict(lo, hi) == "tie"


def test_an_interval_touching_zero_is_a_tie():
    assert verdict(-1.0, 0.0) == "tie" and verdict(0.0, 2.0) == "tie"


@pytest.mark.parametrize("n", [2, 3, 7])
def test_interval_is_the_paired_t_interval_of_scipy(n):
    rng = np.random.default_rng(n)
    a, b = rng.normal(size=n), rng.normal(size=n) + 0.3
    mean, lo, hi = paired_interval(a - b)
    ci = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert mean == pytest.approx(np.mean(a - b))
    assert (lo, hi) == pytest.approx((ci.low, ci.high), rel=1e-10)


def test_paired_interval_refuses_bad_input():
    with pytest.raises(ValueError, match="^diffs:"):
        paired_interval([])
    with pytest.raises(ValueError, match="^level:"):
        paired_interval([1.0, 2.0], level=1.5)


def _result() -> SuiteResult:
    """std at 10 + seed; at exactly 1 lower on every seed (a win); ip std +- 1 alternating (a tie); std+es* 0.5
    lower than std on every seed."""
    cells = []
    seeds = [1, 2, 3, 4]
    for seed in seeds:
        for nfe in (5, 10):
            base = 10.0 + seed + nfe
            for method, value in (("std", base), ("at", base - 1.0), ("ip", base + (1.0 if seed % 2 else -1.0)),
                                  (ES_ROW, base - 0.5)):
                cells.append(dict(method=method, seed=seed, sampler="ddim", nfe=nfe, nfe_measured=[nfe],
                                  **{"digits-fid": value, "kid": 0.01 * value, "var_bias": -0.1}))
    robustness = [dict(method=m, seed=s, sampler="ddim", nfe=10, step=5, kind=k, radius=0.1,
                       move=(0.2 if m == "std" else 0.1) + 0.001 * s, **{"digits-fid": 30.0})
                  for m in ("std", "at") for s in seeds for k in ("random", "adversarial")]
    return SuiteResult(suite="digits", metric="digits-fid", seeds=seeds, floor={"digits-fid": 4.5, "kid": 0.001},
                       cells=cells, robustness=robustness,
                       tuning={"held_out_seed": 1000, "es_lambda": {"ddim": {5: 1.003, 10: 1.0}}},
                       extra={"timing": {"sampling": 12.5}, "sizes": {"num_samples": 400}},
                       grids={"std": "grids/std.png"})


def test_paired_comparisons_on_a_constructed_result():
    rows = {(r["method"], r["nfe"]): r for r in paired_comparisons(_result(), "std")}
    assert rows[("at", 5)]["verdict"] == "win" and rows[("at", 5)]["diff"] == pytest.approx(-1.0)
    assert rows[("ip", 10)]["verdict"] == "tie" and rows[("ip", 10)]["diff"] == pytest.approx(0.0)
    against_es = {(r["method"], r["nfe"]): r for r in paired_comparisons(_result(), ES_ROW)}
    assert against_es[("at", 5)]["diff"] == pytest.approx(-0.5) and against_es[("at", 5)]["verdict"] == "win"
    assert against_es[("std", 10)]["verdict"] == "loss"


def test_results_table_layout():
    text = results_table(_result())
    lines = text.splitlines()
    assert lines[0] == "| sampler | method | NFE 5 | NFE 10 | floor |"
    assert lines[1] == "|---|---|---|---|---|"
    # rows in the order std, ip, at, then the pseudo-method; cells "mean +- sd" over the four seeds
    assert [ln.split(" | ")[1] for ln in lines[2:]] == ["std", "ip", "at", ES_ROW]
    std5 = [10.0 + s + 5 for s in (1, 2, 3, 4)]
    assert lines[2] == (f"| ddim | std | {np.mean(std5):.4g} +- {np.std(std5, ddof=1):.2g} | "
                        f"{np.mean(std5) + 5:.4g} +- {np.std(std5, ddof=1):.2g} | 4.5 |")


def test_write_report_files(tmp_path):
    result = _result()
    write_report(result, tmp_path, "python -m benchmarks.compare --suite digits", "2 CPUs, torch x")
    md = (tmp_path / "compare.md").read_text()
    assert "python -m benchmarks.compare --suite digits" in md and "2 CPUs, torch x" in md
    assert "| at | 2 | 0 | 0 |" in md  # at wins both (ddim, NFE) cells against each baseline
    assert "![std](grids/std.png)" in md and "sampling: 12.5 s" in md
    data = json.loads((tmp_path / "compare.json").read_text())
    assert data["metric"] == "digits-fid" and len(data["cells"]) == len(result.cells)
    verdicts = {(r["method"], r["nfe"]): r["verdict"] for r in data["comparisons"]["std"]}
    assert verdicts[("at", 10)] == "win" and verdicts[("ip", 5)] == "tie"
    assert (tmp_path / "metric_vs_nfe.png").stat().st_size > 0 and (tmp_path / "robustness.png").stat().st_size > 0
    # robustness: at moves 0.1 less than std on every seed: a win
    assert "| at | random | 0.1 | " in md and "-0.1 [-0.1, -0.1] win" in md

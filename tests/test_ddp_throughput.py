"""The 1-process against 2-process gloo timing (benchmarks.ddp_throughput) and the train_throughput CLI's flags."""

from __future__ import annotations

import pytest
import torch

from atdiff.threads import one_thread
from benchmarks.ddp_throughput import MODES, GlooConfig, build_trainer, flat_parameters, measure_gloo
from benchmarks.train_throughput import parse_args

TINY = GlooConfig(size=8, batch=4, steps=1, seed=3, lr=1e-4)


def test_two_gloo_ranks_end_where_one_process_does():
    """Both ranks answered, hold bit-identical weights (DDP gave them the same averaged gradient), and match the
    1-process arms on the same global batch within float tolerance: the runs differ only by the summation order
    of the gradient (measured ~3e-6 after the 9 free-AT updates); a rank drawing its own times and noise, or
    training on the wrong half of the batch, moves the weights by ~lr = 1e-4 per update instead. Only the
    1-thread 1-process arm: two threads on a loaded 2-core host cost seconds per step (the same code path)."""
    summary, params = measure_gloo(TINY, repeats=2, progress=False, one_process={"1proc-1thread": 1})
    assert [tuple(r) for r in summary["ranks"]] == [(0, 2), (1, 2)]
    for mode in MODES:
        p = params[mode]
        assert torch.equal(p["rank0"], p["rank1"]), mode
        start = flat_parameters(build_trainer(TINY, mode, 0, 1, torch.device("cpu")).model)
        assert (p["rank0"] - start).abs().max() > 2e-4, mode  # the timed steps did train
        assert set(p) == {"1proc-1thread", "rank0", "rank1"}
        torch.testing.assert_close(p["rank0"], p["1proc-1thread"], rtol=0, atol=2e-5, msg=mode)
        two = summary["seconds_per_update"][mode]["2proc-gloo"]["samples"]
        for arm in ("1proc-1thread",):
            one = summary["seconds_per_update"][mode][arm]["samples"]
            ratio = summary["ratios"][mode][f"2proc-gloo / {arm}"]
            assert ratio["paired"] == pytest.approx([a / b for a, b in zip(two, one, strict=True)])
            assert ratio["ci_low"] <= ratio["median"] <= ratio["ci_high"]
        assert all(0 < s for s in summary["allreduce_share"][mode]["samples"])


def test_measure_gloo_refuses_an_odd_global_batch():
    with pytest.raises(ValueError, match="^batch: expected a positive multiple of 2"):
        measure_gloo(GlooConfig(size=8, batch=3, steps=1, seed=0, lr=1e-4), repeats=1, progress=False)
    with pytest.raises(ValueError, match="^repeats: "):
        measure_gloo(TINY, repeats=0, progress=False)


@pytest.mark.parametrize(("argv", "flag"), [(["--repeats", "0"], "--repeats"), (["--gloo-batch", "5"], "--gloo-batch"),
                                            (["--gloo-size", "7"], "--gloo-size"),
                                            (["--skip-gloo", "--skip-diffusers"], "--skip-gloo")])
def test_cli_bad_input_names_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert f"error: {flag}:" in capsys.readouterr().err


def test_diffusers_ratios_are_the_medians_of_the_paired_timings():
    """A tiny run of the diffusers comparison: every reported ratio is the median of the per-repeat ratios of the
    timings it reports, its interval holds the median, and --skip-gloo leaves the gloo comparison out."""
    pytest.importorskip("diffusers")
    import statistics

    from benchmarks.train_throughput import RATIOS, run

    args = parse_args(["--skip-gloo", "--channels", "32", "--blocks", "1", "--head-channels", "32", "--size", "8",
                       "--batch", "2", "--steps", "1", "--repeats", "3", "--threads", "1"])
    assert (args.skip_gloo, args.skip_diffusers) == (True, False)
    with one_thread():  # run() sets --threads; the context restores the count for the tests after this one
        result = run(args)
    times = result["seconds_per_update"]
    assert "gloo" not in result and set(result["ratios"]) == set(RATIOS)
    for key, (num, den) in RATIOS.items():
        paired = [a / b for a, b in zip(times[num]["samples"], times[den]["samples"], strict=True)]
        r = result["ratios"][key]
        assert len(paired) == 3 and r["median"] == pytest.approx(statistics.median(paired), rel=1e-12)
        assert r["ci_low"] <= r["median"] <= r["ci_high"]

"""The 1-process against 2-process gloo timing (benchmarks.ddp_throughput) and the train_throughput CLI's flags."""

from __future__ import annotations

import pytest
import torch

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


def test_cli_skip_flags_are_parsed():
    args = parse_args(["--skip-diffusers", "--gloo-batch", "6"])
    assert (args.skip_diffusers, args.skip_gloo, args.gloo_batch) == (True, False, 6)

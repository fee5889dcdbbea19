import pytest

from atdiff.samplers import REGISTRY
from toy.train_toy import main, parse_args


def test_brief_training_beats_the_unimodal_and_untrained_baselines(tmp_path):
    args = "--steps 1200 --batch 512 --lr 3e-3 --n-eval 1000 --sample-steps 25 --quiet".split()
    report = main([*args, "--json", str(tmp_path / "r.json")])
    r = report["results"]
    trained, gauss, untrained, oracle = r["trained (EMA)"], r["gaussian oracle"], r["untrained"], r["oracle"]
    # the best unimodal model puts most samples between the 8 modes; a briefly trained MLP must not
    assert trained["w2"] < 0.75 * gauss["w2"], r
    assert trained["off_mode_fraction"] < 0.5 * gauss["off_mode_fraction"], r
    assert trained["w2"] < 0.05 * untrained["w2"], r
    # the oracle with the same sampler is close to the truth: its W2 is within the estimator's floor range
    assert oracle["w2"] < 2 * r["true samples"]["w2"] + 0.05, r
    assert (tmp_path / "r.json").is_file()


def test_sampler_flag_lists_and_checks_the_names(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    help_text = capsys.readouterr().out
    assert all(name in help_text for name in REGISTRY)
    with pytest.raises(SystemExit):
        parse_args(["--sampler", "euler-maruyama-typo"])
    assert "invalid choice" in capsys.readouterr().err
    assert parse_args(["--sampler", "heun", "--sample-steps", "7"]).sampler == "heun"


@pytest.mark.parametrize("argv", [
    ["--lr", "inf"], ["--lr", "nan"], ["--lr", "0"], ["--ema", "1.5"], ["--seed", str(2**64)], ["--seed", "-1"],
    ["--sample-steps", "5000"],  # more steps than the 1000-step process has: refused before training
    ["--json", "{file}/r.json"],  # a folder that is a file
])
def test_bad_flags_are_refused_before_any_training(argv, capsys, tmp_path):
    (tmp_path / "file").write_text("")
    argv = [a.format(file=tmp_path / "file") for a in argv]
    with pytest.raises(SystemExit) as err:
        parse_args(argv)
    assert err.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_non_finite_samples_are_counted_not_replaced():
    import torch

    from atdiff.processes import VPDiscrete
    from toy.mixtures import make_mixture
    from toy.train_toy import evaluate

    mix = make_mixture("ring8")
    x = torch.zeros(10, 2)
    x[3, 1] = float("nan")
    out = evaluate(x, mix, torch.zeros(10, 2), VPDiscrete("cosine"))
    assert out["non_finite"] == 1 and all(out[k] != out[k] for k in ("w2", "off_mode_fraction", "cross_entropy"))

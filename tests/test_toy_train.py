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

"""python -m benchmarks.sweep: each cell is the metric of exactly the samples benchmarks.sample draws (common random
numbers), unattainable budgets are named, the table, JSON and plot are written, bad input is refused."""

from __future__ import annotations

import json

import pytest

from atdiff.eval.features import compute_metrics, load_reference_dataset, make_extractor
from atdiff.eval.samples_io import load_samples
from benchmarks import sample as sample_cli
from benchmarks import sweep

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks (see conftest.py)


@pytest.fixture
def run(tiny_digits_runs):
    return tiny_digits_runs / "plain"


def test_each_cell_is_the_metric_of_the_samples_benchmarks_sample_draws(run, tmp_path):
    report = sweep.main(["--checkpoint", str(run), "--samplers", "ddim,heun", "--nfe", "3,4", "--num-samples", "40",
                         "--batch", "16", "--seed", "2", "--out", str(tmp_path / "sw"), "--no-progress"])
    assert sorted(report["results"]) == ["ddim", "heun"]
    assert sorted(report["results"]["ddim"]) == [3, 4] and sorted(report["results"]["heun"]) == [3]
    assert report["skipped"].keys() == {"heun"} and list(report["skipped"]["heun"]) == [4]  # Heun: 2n - 1, odd only
    assert report["nfe_measured"]["ddim"] == {3: [3], 4: [4]}
    # independent path: benchmarks.sample with the same seed and batch, then the metric on its file
    npz = sample_cli.main(["--checkpoint", str(run), "--sampler", "ddim", "--nfe", "4", "--num-samples", "40",
                           "--batch", "16", "--seed", "2", "--out", str(tmp_path / "s"), "--no-progress"])
    images, _ = load_samples(npz)
    extractor = make_extractor("digits")
    real, _ = extractor.outputs(load_reference_dataset("digits")[0], False)
    fake, _ = extractor.outputs(images, False)
    direct = compute_metrics(fake, real, ["fid"], seed=2)["fid"]
    assert report["results"]["ddim"][4] == pytest.approx(direct, rel=1e-9)
    assert report["floor"] > 0 and report["floor_subset_size"] == 40
    text = (tmp_path / "sw/sweep.md").read_text()
    assert "| ddim |" in text and "real-vs-real floor" in text and "python -m benchmarks.sweep" in text
    assert "not attainable exactly" in text and (tmp_path / "sw/sweep.png").is_file()
    saved = json.loads((tmp_path / "sw/sweep.json").read_text())
    assert saved["results"]["ddim"]["4"] == pytest.approx(direct, rel=1e-9)


@pytest.mark.parametrize(("argv", "name"), [
    (["--samplers", "ddim,nope"], "samplers"),
    (["--samplers", "ddim,ddim"], "samplers"),
    (["--nfe", "5,x"], "nfe"),
    (["--nfe", "0"], "nfe"),
    (["--num-samples", "0"], "num-samples"),
    (["--metric", "fid"], "ref"),
])
def test_bad_input_is_refused_before_sampling(run, tmp_path, argv, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        sweep.main(["--checkpoint", str(run), "--out", str(tmp_path / "o"), "--no-progress", *argv])

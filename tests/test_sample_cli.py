"""python -m benchmarks.sample: ADM-format output, NFE as asked, shards equal to one process, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from atdiff.eval.samples_io import load_samples
from atdiff.eval.sharding import batch_plan, merge_shards
from benchmarks import sample as sample_cli
from benchmarks import train as launcher

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks (see conftest.py)


@pytest.fixture
def runs(tiny_digits_runs):
    return tiny_digits_runs


def test_samples_npz_labels_and_nfe(runs, tmp_path):
    npz = sample_cli.main(["--checkpoint", str(runs / "cond"), "--sampler", "ddim", "--nfe", "3", "--num-samples", "6",
                           "--batch", "4", "--seed", "1", "--classes", "2,7", "--out", str(tmp_path / "s"),
                           "--no-progress"])
    images, labels = load_samples(npz)
    assert npz.name == "samples_6x8x8x1.npz" and images.dtype == np.uint8 and images.shape == (6, 8, 8, 1)
    assert set(labels.tolist()) <= {2, 7} and labels.dtype == np.int64
    info = json.loads((tmp_path / "s/info.json").read_text())
    assert info["nfe_measured"] == [3] and info["classes"] == [2, 7]
    assert (tmp_path / "s/grid.png").is_file()

    # two shards of 2 processes, merged, are the one-process file bit for bit
    model, _, recipe = launcher.load_run(runs / "cond")
    shards = []
    for rank in range(2):
        batches = batch_plan(6, 4, rank, 2)
        imgs, labs, _ = sample_cli.generate(model, recipe, batches, sampler="ddim", nfe=3, steps=None, seed=1,
                                            classes=[2, 7], device=torch.device("cpu"),
                                            opts=sample_cli.clip_options("ddim"))
        shards.append((batches, imgs, labs))
    assert np.array_equal(merge_shards([(b, i) for b, i, _ in shards]), images)
    assert np.array_equal(merge_shards([(b, la) for b, _, la in shards]), labels)


def test_heun_nfe_rule_and_unconditional(runs, tmp_path):
    npz = sample_cli.main(["--checkpoint", str(runs / "plain" / "ckpt" / "latest.pt"), "--sampler", "heun", "--nfe",
                           "5", "--num-samples", "3", "--batch", "3", "--out", str(tmp_path / "h"), "--no-progress"])
    images, labels = load_samples(npz)
    assert labels is None and images.shape == (3, 8, 8, 1)
    assert json.loads((tmp_path / "h/info.json").read_text())["nfe_measured"] == [5]  # Heun: 3 steps, 2 * 3 - 1


def test_sample_cli_refusals(runs, tmp_path):
    base = ["--checkpoint", str(runs / "plain"), "--out", str(tmp_path / "x"), "--no-progress"]
    with pytest.raises(ValueError, match="^sampler: unknown sampler 'euler-a'"):
        sample_cli.main([*base, "--sampler", "euler-a", "--nfe", "4"])
    with pytest.raises(ValueError, match="^nfe"):
        sample_cli.main([*base, "--sampler", "heun", "--nfe", "4"])  # Heun spends odd numbers only
    with pytest.raises(ValueError, match="^classes: the model of digits-std is unconditional"):
        sample_cli.main([*base, "--sampler", "ddim", "--nfe", "2", "--classes", "1"])
    with pytest.raises(ValueError, match=r"^classes: expected classes in 0..9"):
        sample_cli.main(["--checkpoint", str(runs / "cond"), "--out", str(tmp_path / "y"), "--sampler", "ddim",
                         "--nfe", "2", "--classes", "3,10"])
    with pytest.raises(ValueError, match="^num-samples: expected >= 1"):
        sample_cli.main([*base, "--sampler", "ddim", "--nfe", "2", "--num-samples", "0"])
    assert not (tmp_path / "x").exists()


def test_clip_x0_auto_clamps_where_the_sampler_can_and_is_recorded(runs, tmp_path):
    """``--clip-x0 auto`` (default) gives improved-diffusion's clamp to [-1, 1] for the samplers that have an x0 to
    clamp and nothing for the others; it changes the samples of a sampler that clips (bound 1e-3: every predicted
    x0 pinned near 0) and a bound is refused for a sampler that cannot clip."""
    assert sample_cli.clip_options("iddpm") == {"clip_x0": 1.0}
    assert sample_cli.clip_options("dpm-solver++") == {"clip_x0": 1.0}
    assert sample_cli.clip_options("heun") == {} and sample_cli.clip_options("ddim", "none") == {}
    assert sample_cli.clip_options("ddim", "0.5") == {"clip_x0": 0.5}
    for bad, why in (("heun", "2"), ("ddim", "-1"), ("ddim", "inf"), ("ddim", "big")):
        with pytest.raises(ValueError, match="^clip-x0: "):
            sample_cli.clip_options(bad, why)
    base = ["--checkpoint", str(runs / "plain"), "--sampler", "ddim", "--nfe", "3", "--num-samples", "4", "--batch",
            "4", "--no-progress"]
    tight = load_samples(sample_cli.main([*base, "--clip-x0", "1e-3", "--out", str(tmp_path / "t")]))[0]
    free = load_samples(sample_cli.main([*base, "--clip-x0", "none", "--out", str(tmp_path / "f")]))[0]
    assert not np.array_equal(tight, free)
    # the deterministic DDIM endpoint at t_end ~ 0 is the clamped x0: uint8 127-128, the middle grey
    assert np.abs(tight.astype(int) - 127.5).max() <= 1
    assert json.loads((tmp_path / "t/info.json").read_text())["clip_x0"] == 1e-3
    with pytest.raises(ValueError, match="^clip-x0: sampler 'heun' has no x0 prediction"):
        sample_cli.main([*base[:2], "--sampler", "heun", "--nfe", "3", "--clip-x0", "1", "--out", str(tmp_path / "h")])

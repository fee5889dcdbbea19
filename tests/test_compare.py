"""The reproduction study's CLI (benchmarks.compare) and its fine-tuning bookkeeping (benchmarks.compare_finetune)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from atdiff.threads import one_thread
from benchmarks.compare import check_plan, main, var_bias
from benchmarks.compare_finetune import (
    IMAGE_SUITES,
    adam_updates,
    checkpoint_payload,
    finetune,
    finetune_perturber,
    method_recipe,
    weights_sha,
)
from benchmarks.compare_report import METHODS
from benchmarks.recipes import get_recipe, smoke_version
from benchmarks.train import train

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- CLI errors


def test_unknown_suite_is_refused():
    with pytest.raises(ValueError, match="^suite: unknown suite 'nope'"):
        main(["--suite", "nope"])


def test_zero_seeds_are_refused():
    with pytest.raises(ValueError, match="^seeds: expected >= 1"):
        main(["--suite", "digits", "--seeds", "0"])


def test_cifar10_without_data_fails_early(tmp_path):
    with pytest.raises(ValueError, match="^data-root: the cifar10 suite"):
        main(["--suite", "cifar10", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="^data-root: .*not found"):
        main(["--suite", "cifar10", "--data-root", str(tmp_path / "missing"), "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="^inception: the cifar10 suite"):
        main(["--suite", "cifar10", "--data-root", str(tmp_path), "--out", str(tmp_path)])
    assert not (tmp_path / "work").exists()  # nothing was started


def test_usage_error_exits_with_code_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.compare", "--suite", "imagenet64", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: data-root:")


# ----------------------------------------------------------------------------------------------- pieces


def test_a_rerun_with_the_same_plan_resumes_and_another_plan_is_refused(tmp_path):
    plan = {"suite": "digits", "sizes": {"nfes": (5, 10), "updates": 30}, "device": "cpu"}
    check_plan(tmp_path, plan)
    check_plan(tmp_path, dict(plan))  # tuples read back from JSON as lists: the same plan
    with pytest.raises(ValueError, match=r"^out: .* another plan \(differs in \['sizes'\]\)"):
        check_plan(tmp_path, {**plan, "sizes": {"nfes": (5, 10), "updates": 60}})


def test_var_bias():
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (500, 4, 4, 1)).astype(np.uint8)
    assert var_bias(data, data) == pytest.approx(0.0, abs=1e-12)
    half = (data // 2).astype(np.uint8)  # every coordinate's spread halves (up to the floor of odd values)
    expected = (data // 2).reshape(500, -1).astype(float).var(0).sum() / data.reshape(500, -1).astype(float).var(
        0).sum() - 1
    assert var_bias(half, data) == pytest.approx(expected) and -0.8 < expected < -0.7


def test_updates_must_be_a_multiple_of_the_free_at_passes():
    with pytest.raises(ValueError, match="^updates: 10 is not a multiple"):
        method_recipe(IMAGE_SUITES["digits"], "at", updates=10, seed=1)
    r = method_recipe(IMAGE_SUITES["digits"], "at-kl", updates=9, seed=4, eta0=0.32)
    assert (r.train.steps, r.perturb.replay, r.train.seed, r.perturb.radius) == (3, 3, 4, 0.32)
    r = method_recipe(IMAGE_SUITES["digits"], "ip", updates=9, seed=4)
    assert (r.train.steps, r.perturb.kind, r.optim) == (9, "ip", get_recipe("digits-at").optim)


# ----------------------------------------------------------------------------------------------- bookkeeping


@pytest.fixture(scope="module")
def tiny_finetunes(tmp_path_factory):
    """A smoke-sized digits-std pretraining (3 steps) and every method fine-tuned from it for 3 updates."""
    root = tmp_path_factory.mktemp("ft")
    with one_thread():
        return _finetune_every_method(root)


def _finetune_every_method(root):
    smoke = smoke_version(get_recipe("digits-std"))
    full = get_recipe("digits-std")
    extra = tuple(f"network.{k}={v}" for k, v in smoke.network.items() if full.network[k] != v)
    extra += (f"optim.batch_size={smoke.optim.batch_size}",)
    pre = root / "pretrain"
    train(smoke, pre, progress=False)
    metas = {}
    for method in METHODS:
        eta0 = 0.32 if method == "at-kl" else None
        recipe = method_recipe(IMAGE_SUITES["digits"], method, updates=3, seed=7, eta0=eta0, extra=extra)
        metas[method] = finetune(recipe, root / method, pre, finetune_perturber(method, eta0), torch.device("cpu"),
                                 progress=False)
    return root, pre, metas, smoke


def test_every_method_made_the_same_updates_from_the_same_weights(tiny_finetunes):
    root, pre, metas, smoke = tiny_finetunes
    pre_ema = checkpoint_payload(pre)["ema"]["model"]
    lr = smoke.optim.lr
    for method in METHODS:
        assert adam_updates(root / method) == 3, method
        assert metas[method]["updates"] == 3
        assert metas[method]["minibatch_steps"] == (1 if method.startswith("at") else 3), method
        assert metas[method]["init_ema_sha"] == weights_sha(pre_ema)
        # the raw weights moved at most a few Adam steps of size lr from the pretrained EMA weights
        raw = checkpoint_payload(root / method)["model"]
        gap = max(float((raw[k].float() - pre_ema[k].float()).abs().max()) for k in pre_ema)
        assert gap <= 10 * 3 * lr, method
    # a different start (fresh weights of another seed) would be far from them: the bound above means something
    torch.manual_seed(123)
    from benchmarks.build import build_model

    fresh = build_model(smoke).state_dict()
    assert max(float((fresh[k].float() - pre_ema[k].float()).abs().max()) for k in pre_ema) > 10 * 10 * 3 * lr


def test_at_kl_trained_with_the_kl_ball(tiny_finetunes):
    root, _, metas, _ = tiny_finetunes
    assert "budget='kl'" in metas["at-kl"]["perturber"] and "radius=0.32" in metas["at-kl"]["perturber"]
    assert metas["at"]["perturber"] == "recipe"
    assert json.loads((root / "at-kl" / "compare_meta.json").read_text()) == metas["at-kl"]
    config = json.loads((root / "at-true-grad" / "config.json").read_text())
    assert config["diffusion"]["target_mode"] == "equivariant"
    # a finished run is reused, not retrained
    assert finetune(None, root / "std", root / "pretrain", None, torch.device("cpu"), False) == metas["std"]


# ----------------------------------------------------------------------------------------------- determinism


def _strip_timing(value):
    if isinstance(value, dict):
        return {k: _strip_timing(v) for k, v in value.items() if k != "timing"}
    if isinstance(value, list):
        return [_strip_timing(v) for v in value]
    return value


@pytest.mark.slow
def test_quick_digits_is_deterministic(tmp_path):
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        with one_thread():  # --threads 1 sets the count; the context restores it for the tests after this one
            main(["--suite", "digits", "--quick", "--no-progress", "--threads", "1", "--out", str(out)])
        data = json.loads((out / "compare.json").read_text())
        data.pop("command")
        outs.append(_strip_timing(data))
    assert outs[0] == outs[1]
    assert len(outs[0]["cells"]) == 6 * 4 * 2  # five methods and std+es*, four samplers, NFE 5 and 10

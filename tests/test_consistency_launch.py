"""Consistency models in the launcher (benchmarks.recipes, benchmarks.build, benchmarks.train, benchmarks.sample):
the recipes' published settings, a smoke run of every consistency recipe, exact resume of CT, CD from a tiny teacher
run, sampling a consistency run, the VP -> VE teacher wrapper against closed forms, refusals before training."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from atdiff.checkpoint import load_checkpoint
from atdiff.consistency import cm_at_preset
from atdiff.eval.samples_io import load_samples, to_uint8
from atdiff.eval.sharding import batch_generator
from atdiff.precond import ConsistencyModel, VEFromVP, ve_from_vp_coordinates
from atdiff.processes import VE, VPContinuous, VPDiscrete
from benchmarks import sample as sample_cli
from benchmarks import train as launcher
from benchmarks.build import build_teacher
from benchmarks.recipes import RECIPES, recipe_from_dict, recipe_to_dict, resolve, smoke_version
from theory.gaussian import Gaussian, oracle_model

pytestmark = pytest.mark.usefixtures("one_thread")

CM_RECIPES = [name for name, r in RECIPES.items() if r.consistency.kind != "none"]
#: the default run smokes the CPU recipes (CD with its smoke teacher, CT, both with free AT); the paper-scale smokes
#: (20-30 s each on a busy 2-core host) are marked slow
SMOKE = [pytest.param(name, marks=() if name.startswith("digits") else pytest.mark.slow) for name in CM_RECIPES]


def _tiny(name: str, *sets: str):
    return resolve(name, ["network.model_channels=8", "network.num_head_channels=4", "optim.batch_size=16",
                          "train.log_every=1", "train.sample_every=0", "train.checkpoint_every=0",
                          "train.num_samples=4", *sets])


def _log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------- recipes


def test_consistency_recipes_have_the_published_settings():
    assert set(CM_RECIPES) == {f"{b}{s}" for b in ("cifar10-cd", "cifar10-ct", "imagenet64-cd", "digits-cd",
                                                     "digits-ct") for s in ("", "-at")}
    cd, ct, inet = resolve("cifar10-cd"), resolve("cifar10-ct"), resolve("imagenet64-cd")
    assert (cd.consistency.kind, cd.consistency.N, cd.consistency.mu, cd.consistency.solver) == ("cd", 18, 0.95, "heun")
    assert (cd.optim.batch_size, cd.optim.lr, cd.train.steps, cd.optim.ema) == (512, 4e-4, 800_000, 0.9999)
    assert (ct.consistency.kind, ct.consistency.s0, ct.consistency.s1, ct.consistency.mu) == ("ct", 2, 150, 0.9)
    assert (ct.optim.batch_size, ct.optim.lr, ct.train.steps) == (512, 4e-4, 800_000)
    assert (inet.consistency.N, inet.consistency.mu, inet.optim.batch_size, inet.optim.lr) == (40, 0.95, 2048, 8e-6)
    assert inet.data.class_cond and inet.network["num_classes"] == 1000 and inet.network["model_channels"] == 192
    preset = cm_at_preset("paper")
    for name in CM_RECIPES:
        r = resolve(name)
        c = r.consistency
        assert (c.sigma_min, c.sigma_max, c.rho, c.sigma_data) == (0.002, 80.0, 7.0, 0.5)
        assert not r.network["learn_sigma"] and r.network["dropout"] == 0.0 and r.train.sampler == "consistency"
        if name.endswith("-at"):  # CM-AT: the preset's perturber, replay and target, the rest as the clean recipe
            pert = launcher.build_perturber(r)
            for key in ("kind", "norm", "budget", "radius", "step_size", "step_units", "step_rule", "init"):
                assert getattr(pert, key) == getattr(preset["perturber"], key), key
            assert (r.perturb.replay, r.diffusion.target_mode) == (preset["replay"], preset["target_mode"])
            clean = recipe_to_dict(resolve(name.removesuffix("-at")))
            mine = recipe_to_dict(r)
            assert {k for k in mine if mine[k] != clean[k]} == {"name", "perturb", "diffusion"}
        else:
            assert r.perturb.kind == "none"
    for name, r in RECIPES.items():  # the diffusion recipes are untouched by the new section
        assert (r.consistency.kind == "none") == (name not in CM_RECIPES)


def test_a_config_saved_before_the_consistency_section_still_loads():
    d = recipe_to_dict(resolve("digits-at"))
    old = {k: v for k, v in d.items() if k != "consistency"}
    assert recipe_to_dict(recipe_from_dict(old)) == d


# ----------------------------------------------------------------------------------------------- smoke runs


@pytest.mark.parametrize("name", SMOKE)
def test_smoke_run_of_every_consistency_recipe(tmp_path, name, capsys):
    """Three tiny steps (CD: an untrained teacher), both grids written, the checkpoint holding the target network
    and the curriculum step, the run loading as a consistency model on the VE path."""
    result = launcher.main(["--recipe", name, "--smoke", "--out", str(tmp_path / "run"), "--no-progress"])
    run_dir, recipe = result.run_dir, smoke_version(resolve(name))
    log = _log(run_dir)
    assert [line["step"] for line in log] == [1, 2, 3]
    assert all(math.isfinite(line["loss"]) and math.isfinite(line["grad_norm"]) for line in log)
    replay = recipe.perturb.replay if recipe.perturb.kind == "free-at" else 1
    for line in log:
        if replay > 1:  # pass 1 at delta = 0, then l2 steps of 0.1 (shorter where the input gradient is below the
            # floor 1e-8: at large sigma c_skip ~ (sigma_data / sigma)^2 and the untrained network's output is zero)
            assert line["delta_norm"][0] == 0.0 and 0.0 < line["delta_norm"][1] <= 0.1 + 1e-6
            assert line["delta_norm"][1] - 1e-6 <= line["delta_norm"][2] <= 0.2 + 1e-6
    assert {p.name for p in (run_dir / "samples").iterdir()} == {"step-0000003-1steps.png", "step-0000003-2steps.png"}
    payload = load_checkpoint(run_dir / "ckpt/latest.pt", restore_rng=False)
    assert payload["loss"]["curriculum"]["k"] == 3 * replay  # one curriculum step per parameter update
    assert payload["loss"]["curriculum"]["kind"] == {"cd": "fixed", "ct": "ct", "ict": "ict"}[recipe.consistency.kind]
    model, process, loaded = launcher.load_run(run_dir)
    assert isinstance(model, ConsistencyModel) and isinstance(process, VE) and process.sigma_max == 80.0
    assert loaded.name == f"{name}+smoke" and not model.training
    if recipe.consistency.kind == "ict":  # iCT: the target is the online network under stop-gradient
        assert payload["loss"]["target"] is None
        return
    # an EMA target of the online network's architecture, not equal to it (mu > 0 and updates happened)
    online, target = payload["model"], payload["loss"]["target"]["model"]
    assert set(target) == set(online)
    assert any(not torch.equal(target[k], online[k]) for k in online)


@pytest.mark.parametrize("sets", [(), ("consistency.kind=ct", "consistency.s0=2", "consistency.s1=150",
                                         "consistency.mu=0.9", "consistency.distance=l2")], ids=["ict", "ct"])
def test_ct_train_n_plus_resume_n_equals_train_2n(tmp_path, sets):
    """The curriculum step and (original CT) the target EMA go through the checkpoint: 6 + 6 steps equal 12 bit for
    bit (one curriculum of 12 updates for both, as a run interrupted at step 6)."""
    recipe = _tiny("digits-ct", "train.steps=12", "consistency.curriculum_steps=12", *sets)
    straight = launcher.train(recipe, tmp_path / "straight", progress=False)
    half = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, steps=6))
    launcher.train(half, tmp_path / "resumed", progress=False)
    resumed = launcher.train(recipe, tmp_path / "resumed", resume=True, progress=False)
    assert resumed.step == straight.step == 12
    a = load_checkpoint(tmp_path / "straight/ckpt/latest.pt", restore_rng=False)
    b = load_checkpoint(tmp_path / "resumed/ckpt/latest.pt", restore_rng=False)
    assert a["loss"]["curriculum"]["k"] == 12 and (a["loss"]["target"] is None) == (not sets)
    for key in ("model", "ema", "optimizer", "loss"):
        _equal(a[key], b[key], key)
    assert _log(tmp_path / "resumed")[-1]["loss"] == _log(tmp_path / "straight")[-1]["loss"]


def _equal(a, b, where):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_cd_distils_a_teacher_run(tmp_path):
    """A tiny digits-std run as the teacher of digits-cd: the teacher the launcher builds is that run's EMA model
    under the exact VP -> VE change of variables, and a teacher of other images is refused before training."""
    teacher_recipe = resolve("digits-std", ["network.model_channels=8", "network.num_head_channels=4",
                                            "diffusion.steps=20", "optim.batch_size=8", "train.steps=2",
                                            "train.sample_steps=2", "train.num_samples=4"])
    launcher.train(teacher_recipe, tmp_path / "teacher", progress=False)
    recipe = _tiny("digits-cd", "train.steps=2", f"consistency.teacher={tmp_path / 'teacher'}")
    launcher.train(recipe, tmp_path / "cd", progress=False)
    assert [line["step"] for line in _log(tmp_path / "cd")] == [1, 2]
    teacher = build_teacher(recipe)
    vp_model, vp_process, _ = launcher.load_run(tmp_path / "teacher")
    x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([0.05, 1.0, 30.0])
    t, alpha = ve_from_vp_coordinates(sigma, vp_process)
    with torch.no_grad():
        expected = vp_model(alpha[:, None, None, None].float() * x, t)[:, :1]  # eps channel of the learned-var output
        torch.testing.assert_close(teacher(x, sigma), expected)
    assert not any(p.requires_grad for p in teacher.parameters())
    mnist = resolve("mnist5k-std", ["network.model_channels=8", "network.num_head_channels=4", "diffusion.steps=20",
                                    "optim.batch_size=4", "train.steps=1", "train.sample_steps=2",
                                    "train.num_samples=4"])
    launcher.train(mnist, tmp_path / "mnist", progress=False)
    with pytest.raises(ValueError, match="^consistency.teacher: .*data.image_size = 32"):
        launcher.train(_tiny("digits-cd", f"consistency.teacher={tmp_path / 'mnist'}"), tmp_path / "bad",
                       progress=False)
    with pytest.raises(ValueError, match="^consistency.teacher: .*is a consistency run"):
        launcher.train(_tiny("digits-cd", f"consistency.teacher={tmp_path / 'cd'}"), tmp_path / "bad2",
                       progress=False)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad2").exists()


def test_sample_cli_draws_from_a_consistency_run(tmp_path):
    """One consistency step from ``x_T = sigma_max z`` of the batch's generator: the npz is ``f(80 z, 80)``."""
    run = launcher.train(_tiny("digits-ct", "train.steps=2"), tmp_path / "ct", progress=False).run_dir
    npz = sample_cli.main(["--checkpoint", str(run), "--sampler", "consistency", "--nfe", "1", "--num-samples", "5",
                           "--batch", "5", "--out", str(tmp_path / "s1"), "--no-progress"])
    images, _ = load_samples(npz)
    model, process, _ = launcher.load_run(run)
    gen = batch_generator(0, 0)
    x_T = torch.randn((5, 1, 8, 8), generator=gen)
    with torch.no_grad():
        direct = to_uint8(model(80.0 * x_T, torch.full((5,), 80.0)))
    np.testing.assert_array_equal(images, direct)
    info = json.loads((tmp_path / "s1/info.json").read_text())
    assert info["nfe_measured"] == [1]
    sample_cli.main(["--checkpoint", str(run), "--sampler", "consistency", "--steps", "2", "--num-samples", "5",
                     "--out", str(tmp_path / "s2"), "--no-progress"])
    assert json.loads((tmp_path / "s2/info.json").read_text())["nfe_measured"] == [2]


# ----------------------------------------------------------------------------------------------- VP -> VE teacher


@pytest.mark.parametrize("process", [VPContinuous("linear"), VPDiscrete("cosine", 1000)],
                         ids=["continuous", "discrete"])
def test_ve_from_vp_matches_the_closed_form_on_gaussian_data(process):
    """Data N(m, s^2 I): the exact VE noise prediction is ``sigma (x - m) / (s^2 + sigma^2)``; the exact VP
    eps-model seen through VEFromVP gives it at every level inside the VP process's range."""
    d, s = 4, 0.7
    m = torch.tensor([0.3, -1.0, 0.5, 2.0], dtype=torch.float64)
    data = Gaussian(m, s**2 * torch.eye(d, dtype=torch.float64))
    wrapped = VEFromVP(oracle_model(data, process), process)
    sigma = torch.tensor([0.01, 0.2, 1.0, 5.0, 40.0], dtype=torch.float64)
    x = m + (s**2 + sigma[:, None] ** 2).sqrt() * torch.randn(5, d, dtype=torch.float64,
                                                               generator=torch.Generator().manual_seed(0))
    closed = sigma[:, None] * (x - m) / (s**2 + sigma[:, None] ** 2)
    torch.testing.assert_close(wrapped(x, sigma), closed, rtol=1e-9, atol=1e-9)
    t, alpha = ve_from_vp_coordinates(sigma, process)  # the VP level has the same noise-to-signal ratio
    torch.testing.assert_close(process.sigma(t) / process.alpha(t), sigma, rtol=1e-9, atol=0)
    torch.testing.assert_close(alpha, process.alpha(t), rtol=1e-9, atol=0)


def test_ve_from_vp_refuses_a_ve_model():
    with pytest.raises(ValueError, match="^process: expected a variance-preserving process"):
        VEFromVP(oracle_model(Gaussian(torch.zeros(2), torch.eye(2)), VE()), VE())


# ----------------------------------------------------------------------------------------------- bad input


def test_bad_consistency_settings_are_refused_before_training(tmp_path):
    out = tmp_path / "r"
    cases = [(["--recipe", "digits-ct", "--set", "consistency.kind=lcm"], "^consistency.kind: expected one of"),
             (["--recipe", "digits-cd"], "^consistency.teacher: consistency distillation needs a diffusion run"),
             (["--recipe", "digits-cd", "--set", "consistency.N=1"], "^consistency.N: expected >= 2 levels"),
             (["--recipe", "digits-ct", "--set", "consistency.s1=1"], "^consistency.s1: expected >= consistency.s0"),
             (["--recipe", "digits-ct", "--set", "consistency.mu=1.0"], "^consistency.mu: expected an EMA decay"),
             (["--recipe", "digits-ct", "--set", "perturb.kind=ip"], "^perturb.kind: input perturbation"),
             (["--recipe", "digits-std", "--set", "consistency.kind=ct"], "^train.sampler: a consistency model"),
             (["--recipe", "digits-std", "--set", "train.sampler=consistency"], "^train.sampler: the consistency "),
             (["--recipe", "digits-cd", "--set", "consistency.teacher=/nonexistent/run"], "^consistency.teacher: ")]
    for argv, message in cases:
        with pytest.raises(ValueError, match=message):
            launcher.main([*argv, "--out", str(out), "--no-progress"])
        assert not out.exists(), argv

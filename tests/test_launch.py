"""The recipes and the launcher (benchmarks.recipes, benchmarks.train): resolution and --set checks, one smoke run per
family, exact resume, 2-process gloo against 1 process, clear errors before training."""

from __future__ import annotations

import json
import math
import os
import socket

import numpy as np
import pytest
import torch

from atdiff.checkpoint import load_checkpoint
from atdiff.distributed import DistInfo, global_draw
from atdiff.losses import HybridLoss
from atdiff.networks.unet import AttentionBlock, ResBlock, unet_cifar10_adm
from atdiff.processes import VPDiscrete
from benchmarks import train as launcher
from benchmarks.recipes import (
    RECIPES,
    recipe_from_dict,
    recipe_to_dict,
    resolve,
    smoke_version,
)

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks (see conftest.py)


def _tiny(name: str, *sets: str):
    """A fast CPU version of a recipe (hybrid loss on a 10-step process so the time sampler warms up quickly)."""
    return resolve(name, ["network.model_channels=8", "network.num_head_channels=4", "diffusion.steps=10",
                          "optim.batch_size=16", "train.log_every=1", "train.sample_every=0",
                          "train.checkpoint_every=0", "train.sample_steps=2", "train.num_samples=4", *sets])


# ----------------------------------------------------------------------------------------------- recipes


def test_every_recipe_dry_run_prints_the_resolved_recipe(capsys):
    for name in RECIPES:
        assert launcher.main(["--recipe", name, "--dry-run"]) is None
        printed = json.loads(capsys.readouterr().out)
        assert printed == recipe_to_dict(resolve(name))
        assert recipe_to_dict(recipe_from_dict(printed)) == printed


def test_paper_cifar10_recipe_has_the_papers_settings():
    r = resolve("cifar10-adm-at")
    n = r.network
    assert (n["model_channels"], n["channel_mult"], n["num_res_blocks"]) == (128, [1, 2, 2, 2], 3)
    assert (n["attention_resolutions"], n["num_head_channels"], n["resblock_updown"]) == ([16, 8], 32, True)
    assert (n["use_scale_shift_norm"], n["dropout"], n["learn_sigma"], n["attention_order"]) == (True, 0.3, True, "new")
    d, o, p = r.diffusion, r.optim, r.perturb
    assert (d.schedule, d.steps, d.loss, d.importance_sampling, d.target_mode) == \
        ("cosine", 1000, "hybrid", True, "equivariant-detached")
    assert (o.lr, o.weight_decay, o.batch_size, o.ema, o.precision) == (1e-4, 0.0, 128, 0.9999, "bf16")
    assert (p.kind, p.replay, p.radius, p.step_size) == ("free-at", 3, 0.1, 0.1)
    assert r.train.requires_init and not resolve("cifar10-adm").train.requires_init
    assert resolve("cifar10-adm-ip").perturb.gamma == 0.1 and resolve("cifar10-adm-ip").perturb.kind == "ip"
    assert resolve("imagenet64-adm").network["num_classes"] == 1000 and resolve("imagenet64-adm").data.class_cond


def test_paper_cifar10_network_structure():
    """15 attention layers (3 + 3 down, 4 + 4 up at 16 and 8, one in the middle) with channels / 32 heads; 3 down and
    3 up residual resampling blocks; learned sigma doubles the output channels."""
    model = launcher.build_model(resolve("cifar10-adm"))
    attn = [m for m in model.modules() if isinstance(m, AttentionBlock)]
    assert len(attn) == 15
    assert all(m.num_heads == m.qkv.in_channels // 32 for m in attn)
    res = [m for m in model.modules() if isinstance(m, ResBlock)]
    assert sum(m.down for m in res) == 3 and sum(m.up for m in res) == 3
    assert model.net.out_channels == 6 and model.learned_variance
    preset = unet_cifar10_adm()  # the library's preset of the same network
    assert {k: v.shape for k, v in model.net.state_dict().items()} == \
        {k: v.shape for k, v in preset.state_dict().items()}
    assert sum(p.numel() for p in model.parameters()) == 57_094_662


def test_set_overrides_are_type_checked():
    r = resolve("digits-at", ["optim.lr=2e-4", "network.channel_mult=1,2", "train.steps=7", "data.flip=True"])
    assert (r.optim.lr, r.network["channel_mult"], r.train.steps, r.data.flip) == (2e-4, [1, 2], 7, True)
    for bad, start in [("optim.nope=1", "set: unknown key 'optim.nope'"), ("network.foo=1", "set: unknown key"),
                       ("optim.lr=fast", "set optim.lr: expected a number"),
                       ("train.steps=1.5", "set train.steps: expected an integer"), ("optim.lr", "set: expected"),
                       ("data.flip=1", "set data.flip: expected True or False"),
                       ("network.in_channels=3", "network.in_channels: expected data.channels = 1"),
                       ("perturb.kind=pgd", "perturb.kind: expected one of")]:
        with pytest.raises(ValueError) as err:
            resolve("digits-at", [bad])
        assert str(err.value).startswith(start), str(err.value)
    with pytest.raises(ValueError, match="^recipe: unknown recipe 'cifar11'"):
        launcher.main(["--recipe", "cifar11", "--dry-run"])


# ----------------------------------------------------------------------------------------------- smoke runs


def _log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["cifar10-adm-at", "imagenet64-adm-ip"])
def test_paper_recipes_build_at_tiny_width(name):
    """The smoke version of a paper recipe keeps the structure (classes, learned sigma, levels) at width 16; its
    output convolution starts at zero, so the hybrid loss's first term is exactly the mean squared noise."""
    recipe = smoke_version(resolve(name))
    images, labels = launcher.read_data(recipe, smoke=True)
    assert images.dtype == np.uint8 and images.shape[1:] == (3, recipe.data.image_size, recipe.data.image_size)
    process = launcher.build_process(recipe)
    model = launcher.build_model(recipe, process)
    loss = launcher.build_loss(recipe, process)
    x0 = torch.from_numpy(images[:2]).float() / 127.5 - 1
    record = loss.draw(x0, torch.Generator().manual_seed(0))
    cond = {"y": torch.from_numpy(labels[:2])} if recipe.data.class_cond else {}
    terms = loss.terms(model, x0, record.t, record.noise, cond=cond)
    torch.testing.assert_close(terms["mse"], record.noise.flatten(1).pow(2).mean(1))
    assert bool(torch.isfinite(terms["vb"]).all())
    assert (model.net.num_classes is not None) == recipe.data.class_cond and model.learned_variance
    assert launcher.build_perturber(recipe).kind == {"free-at": "fgsm", "ip": "gaussian"}[recipe.perturb.kind]


@pytest.mark.parametrize("name", ["digits-at", "mnist5k-ip"])
def test_smoke_run_per_family(tmp_path, name, capsys):
    result = launcher.main(["--recipe", name, "--smoke", "--out", str(tmp_path / "run"), "--no-progress"])
    run_dir = result.run_dir
    log = _log(run_dir)
    assert [line["step"] for line in log] == [1, 2, 3]
    assert all(math.isfinite(line["loss"]) and math.isfinite(line["grad_norm"]) for line in log)
    kind = resolve(name).perturb.kind
    for line in log:
        if kind == "free-at":  # pass 1 at delta = 0, pass 2 one l2 step of 0.1, pass 3 a second step
            assert line["delta_norm"][0] == 0.0 and line["delta_norm"][1] == pytest.approx(0.1, rel=1e-5)
            assert 0.1 < line["delta_norm"][2] <= 0.2 + 1e-6
        elif kind == "ip":
            assert len(line["delta_norm"]) == 1 and line["delta_norm"][0] > 0
        if resolve(name).diffusion.loss == "hybrid":
            assert line["loss_last"] == pytest.approx(line["mse"] + 0.001 * 1000 * line["vb"], rel=1e-5)
    config = json.loads((run_dir / "config.json").read_text())
    assert config == recipe_to_dict(smoke_version(resolve(name)))
    png = run_dir / "samples" / "step-0000003.png"
    from PIL import Image

    with Image.open(png) as im:
        size = config["data"]["image_size"] * launcher.grid_scale(config["data"]["image_size"])
        side = 2 * (size + 1) + 1  # 4 samples: a 2 x 2 grid with 1-pixel borders
        assert im.size == (side, side)
    model, process, recipe = launcher.load_run(run_dir)
    payload = load_checkpoint(run_dir / "ckpt/latest.pt", restore_rng=False)
    for key, value in model.state_dict().items():
        assert torch.equal(value, payload["ema"]["model"][key])
    assert recipe.name == config["name"] and process.T == config["diffusion"]["steps"]
    assert payload["step"] == 3 and not model.training


# ----------------------------------------------------------------------------------------------- exact resume


def _states_equal(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _states_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _states_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and where.endswith("elapsed"):
        return
    else:
        assert a == b, where


@pytest.mark.parametrize("sets", [("network.dropout=0.2",), ("perturb.kind=ip",)], ids=["at-dropout", "ip"])
def test_train_n_plus_resume_n_equals_train_2n(tmp_path, sets):
    """Free AT with the importance sampler (warm within the first half on a 10-step process) and dropout (global
    RNG), and input perturbation (per-rank generator): 8 + 8 steps through a checkpoint equal 16 steps bit for bit."""
    recipe = _tiny("digits-at", "train.steps=16", "optim.batch_size=32", *sets)
    straight = launcher.train(recipe, tmp_path / "straight", progress=False)
    half = resolve_steps(recipe, 8)
    launcher.train(half, tmp_path / "resumed", progress=False)
    resumed = launcher.train(recipe, tmp_path / "resumed", resume=True, progress=False)
    assert resumed.step == straight.step == 16
    a = load_checkpoint(tmp_path / "straight/ckpt/latest.pt", restore_rng=False)
    b = load_checkpoint(tmp_path / "resumed/ckpt/latest.pt", restore_rng=False)
    a.pop("config"), b.pop("config")
    _states_equal(a, b)
    sampler = HybridLoss(VPDiscrete("cosine", 10), importance_sampling=True).time_sampler
    sampler.load_state_dict(a["loss"])
    assert sampler.warm  # the importance weights were in use in the second half
    assert [line["step"] for line in _log(tmp_path / "resumed")] == list(range(1, 17))
    assert _log(tmp_path / "resumed")[-1]["loss"] == _log(tmp_path / "straight")[-1]["loss"]


def resolve_steps(recipe, steps):
    import dataclasses

    return dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, steps=steps))


# ----------------------------------------------------------------------------------------------- distributed


def test_global_draw_slices_one_record():
    loss = HybridLoss(VPDiscrete("cosine", 10))
    x = torch.zeros(3, 1, 4, 4)
    whole = loss.draw(torch.zeros(6, 1, 4, 4), torch.Generator().manual_seed(5))
    parts = [global_draw(loss, x, torch.Generator().manual_seed(5), r, 2) for r in range(2)]
    assert torch.equal(torch.cat([p.t for p in parts]), whole.t)
    assert torch.equal(torch.cat([p.noise for p in parts]), whole.noise)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, recipe_dict: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from atdiff.distributed import cleanup, init_distributed

    info = init_distributed("cpu")
    try:
        result = launcher.train(recipe_from_dict(recipe_dict), out, info=info, progress=False)
        torch.save(result.model.state_dict(), f"{out}/rank{rank}.pt")
    finally:
        cleanup()


def test_two_gloo_processes_match_one_process(tmp_path):
    """Free AT + importance sampler on a global batch of 16: 2 processes (8 each) end where 1 process does, within
    float tolerance: 24 Adam updates of size ~lr = 1e-4 each move the weights by ~2e-3, the runs differ by the
    summation order of the gradient average only (measured <= 7e-6; a wrong slice of the record or an unfed time
    sampler differs by ~1e-3). At lr 1e-3 Adam's normalisation amplifies the rounding of near-zero gradients to
    ~4e-4, hence the small lr here. About 19 s on a quiet 2-core machine (two spawned interpreters)."""
    recipe = _tiny("digits-at", "train.steps=8", "optim.lr=1e-4")
    one = launcher.train(recipe, tmp_path / "one", progress=False)
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), recipe_to_dict(recipe), str(tmp_path / "two")),
                                nprocs=2, join=True)
    r0 = torch.load(tmp_path / "two/rank0.pt")
    r1 = torch.load(tmp_path / "two/rank1.pt")
    for key, value in one.model.state_dict().items():
        assert torch.equal(r0[key], r1[key]), key
        torch.testing.assert_close(r0[key], value, rtol=0, atol=2e-5, msg=key)
    a = load_checkpoint(tmp_path / "one/ckpt/latest.pt", restore_rng=False)
    b = load_checkpoint(tmp_path / "two/ckpt/latest.pt", restore_rng=False)
    assert torch.equal(a["loss"]["counts"], b["loss"]["counts"])  # the sampler saw every rank's times
    assert b["world_size"] == 2 and len(b["ranks"]) == 2
    assert not torch.equal(b["ranks"][0]["generator"], b["ranks"][1]["generator"])


# ----------------------------------------------------------------------------------------------- bad input


def test_missing_data_root_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="^data.root: /nonexistent/cifar does not exist"):
        launcher.main(["--recipe", "cifar10-adm", "--set", "data.root=/nonexistent/cifar", "--out",
                       str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()


def test_wrong_image_size_is_refused(tmp_path):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "img" / cls).mkdir(parents=True)
        Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "img" / cls / "0.png")
    with pytest.raises(ValueError, match=r"^data.root: .*0.png is 16x16 \(width x height\), expected 32x32"):
        launcher.main(["--recipe", "cifar10-adm", "--set", "data.dataset=folder", "--set",
                       f"data.root={tmp_path / 'img'}", "--out", str(tmp_path / "r")])


def test_init_from_checks_the_architecture(tmp_path):
    source = launcher.train(_tiny("digits-std", "train.steps=1"), tmp_path / "src", progress=False)
    with pytest.raises(ValueError, match="^init_from: .* holds another network"):
        launcher.train(_tiny("mnist5k-at", "train.steps=1"), tmp_path / "m", init_from=str(tmp_path / "src"))
    other_width = resolve_steps(_tiny("digits-at", "network.model_channels=16", "network.num_head_channels=8"), 1)
    with pytest.raises(ValueError, match="^init_from: .*model_channels"):
        launcher.train(other_width, tmp_path / "w", init_from=str(tmp_path / "src"))
    target = launcher.build_model(_tiny("digits-at"))
    launcher._init_from(target, _tiny("digits-at"), str(tmp_path / "src"))
    for key, value in source.ema.model.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


def test_launcher_refusals(tmp_path):
    with pytest.raises(ValueError, match="^init_from: recipe cifar10-adm-at fine-tunes"):
        launcher.main(["--recipe", "cifar10-adm-at", "--out", str(tmp_path / "at")])
    launcher.train(_tiny("digits-std", "train.steps=1"), tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="^out: .* already holds a run"):
        launcher.main(["--recipe", "digits-std", "--out", str(tmp_path / "run")])
    with pytest.raises(ValueError, match=r"^set: \['optim.lr=1.0'\] cannot change on --resume"):
        launcher.main(["--resume", str(tmp_path / "run"), "--set", "optim.lr=1.0"])
    with pytest.raises(ValueError, match="^resume: .* has no config.json"):
        launcher.main(["--resume", str(tmp_path / "nothing")])

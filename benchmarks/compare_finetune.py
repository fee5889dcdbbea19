"""The fine-tuning half of the reproduction study (:mod:`benchmarks.compare`): the suites' sizes, the fine-tuning
recipes derived from the suites' recipes, and fine-tuning from the shared clean checkpoint with the bookkeeping of
parameter updates.

"Same number of parameter updates": free AT (:func:`atdiff.train.free_at_step`) makes K optimizer steps per
minibatch and ``benchmarks.train`` counts minibatches as ``train.steps``, so a free-AT run of ``U`` updates takes
``U / K`` steps (the first ``U / K`` minibatches of the seed's data stream) and std / ip take ``U`` steps.
:func:`finetune` reads the AdamW step counter from the checkpoint and records it with the hash of the initial
weights in ``compare_meta.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from atdiff.distributed import DistInfo
from atdiff.perturb import kl_ball_at
from benchmarks.compare_report import METHODS, NFES
from benchmarks.recipes import Recipe, apply_overrides, check_recipe, get_recipe
from benchmarks.train import LATEST

__all__ = ["Sizes", "ImageSuite", "IMAGE_SUITES", "method_recipe", "finetune_perturber", "adam_updates",
           "weights_sha", "checkpoint_payload", "finetune"]


@dataclass(frozen=True)
class Sizes:
    """How big a run is. ``pretrain_steps`` None: the recipe's length. ``updates``: parameter updates of every
    fine-tuning run (a multiple of K = 3). ``kl_rho``: the per-pixel rms grid that sets ``eta0 = d rho^2 / 2``.
    ``robust_step``: the grid index of the perturbation."""

    pretrain_steps: int | None
    updates: int
    num_samples: int
    batch: int
    nfes: tuple[int, ...]
    es_grid: tuple[float, ...]
    kl_rho: tuple[float, ...]
    tune_nfe: int
    robust_samples: int
    robust_radii: tuple[float, ...]
    robust_nfe: int
    robust_step: int
    attack_steps: int
    checkpoint_every: int


@dataclass(frozen=True)
class ImageSuite:
    """An image suite: the clean / IP / AT recipes, the primary metric and its features, where the data and the
    Inception weights must be, sizes, and the measured cost per training update and per sample-NFE (seconds, this
    machine at 2 threads for the CPU suites; used for the stage plan's estimates only)."""

    name: str
    recipes: tuple[str, str, str]
    metric: str
    features: str
    full: Sizes
    quick: Sizes
    sec_per_update: float
    sec_per_sample_nfe: float
    needs_data_root: bool = False


def _sizes(**kw) -> Sizes:
    base = dict(pretrain_steps=None, nfes=NFES, es_grid=(0.99, 0.995, 1.0, 1.005, 1.01, 1.02), kl_rho=(0.05, 0.1, 0.2),
                tune_nfe=10, robust_nfe=10, robust_step=5, attack_steps=5, robust_radii=(0.02, 0.05, 0.1),
                checkpoint_every=60)
    return Sizes(**{**base, **kw})


_QUICK = dict(nfes=(5, 10), es_grid=(0.995, 1.0, 1.005), kl_rho=(0.1, 0.2), robust_radii=(0.05, 0.1), attack_steps=2,
              checkpoint_every=15)
IMAGE_SUITES = {
    "digits": ImageSuite("digits", ("digits-std", "digits-ip", "digits-at"), "digits-fid", "digits",
                         full=_sizes(updates=240, num_samples=400, batch=200, robust_samples=128),
                         quick=_sizes(pretrain_steps=150, updates=30, num_samples=200, batch=200, robust_samples=32,
                                      **_QUICK),
                         sec_per_update=0.2, sec_per_sample_nfe=4.5e-4),
    "mnist5k": ImageSuite("mnist5k", ("mnist5k-std", "mnist5k-ip", "mnist5k-at"), "mnist5k-fid", "mnist5k",
                          full=_sizes(updates=600, num_samples=1000, batch=250, robust_samples=128),
                          quick=_sizes(pretrain_steps=100, updates=30, num_samples=200, batch=200, robust_samples=32,
                                       **_QUICK),
                          sec_per_update=0.45, sec_per_sample_nfe=4e-3),
    "cifar10": ImageSuite("cifar10", ("cifar10-adm", "cifar10-adm-ip", "cifar10-adm-at"), "fid", "inception",
                          full=_sizes(updates=30_000, num_samples=50_000, batch=500, robust_samples=1000,
                                      checkpoint_every=1000),
                          quick=_sizes(pretrain_steps=1000, updates=300, num_samples=5000, batch=500,
                                       robust_samples=250, **{**_QUICK, "checkpoint_every": 100}),
                          sec_per_update=0.25, sec_per_sample_nfe=2e-4, needs_data_root=True),
    "imagenet64": ImageSuite("imagenet64", ("imagenet64-adm", "imagenet64-adm-ip", "imagenet64-adm-at"), "fid",
                             "inception",
                             full=_sizes(updates=30_000, num_samples=50_000, batch=500, robust_samples=1000,
                                         checkpoint_every=1000),
                             quick=_sizes(pretrain_steps=1000, updates=300, num_samples=5000, batch=500,
                                          robust_samples=250, **{**_QUICK, "checkpoint_every": 100}),
                             sec_per_update=2.0, sec_per_sample_nfe=1e-3, needs_data_root=True),
}


# ----------------------------------------------------------------------------------------------- fine-tuning recipes


def method_recipe(suite: ImageSuite, method: str, *, updates: int, seed: int, eta0: float | None = None,
                  checkpoint_every: int = 0, extra: tuple[str, ...] = ()) -> Recipe:
    """The fine-tuning recipe of ``method`` for ``seed``: derived from the suite's recipes (the AT recipe's optimizer
    for all), ``updates`` parameter updates (``updates / K`` minibatch steps for the free-AT methods), the data and
    draw seed ``seed``, no intermediate grids. ``eta0``: the KL radius of ``at-kl`` (recorded in ``perturb.radius``;
    the perturber itself is :func:`finetune_perturber`). ``extra``: more ``--set`` overrides (applied first)."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    clean_name, ip_name, at_name = suite.recipes
    clean, ip, at = (apply_overrides(get_recipe(n), extra) for n in (clean_name, ip_name, at_name))
    if method == "std":
        base = dataclasses.replace(clean, optim=at.optim)
    elif method == "ip":
        base = dataclasses.replace(ip, optim=at.optim)
    elif method == "at":
        base = at
    elif method == "at-true-grad":
        base = dataclasses.replace(at, diffusion=dataclasses.replace(at.diffusion, target_mode="equivariant"))
    else:
        if eta0 is None:
            raise ValueError("eta0: at-kl needs its KL radius")
        base = dataclasses.replace(at, perturb=dataclasses.replace(at.perturb, radius=float(eta0)))
    free_at = base.perturb.kind == "free-at"
    replay = base.perturb.replay if free_at else 1
    if updates % replay:
        raise ValueError(f"updates: {updates} is not a multiple of the free-AT passes K = {replay}")
    steps = updates // replay
    name = f"{suite.name}-ft-{method}" + (f"-eta{eta0:g}" if eta0 is not None else "")
    train = dataclasses.replace(base.train, steps=steps, seed=seed, requires_init=True, sample_every=0,
                                checkpoint_every=checkpoint_every, keep_every=0, log_every=max(1, steps // 10),
                                sampler="ddim", sample_steps=10, num_samples=16)
    return check_recipe(dataclasses.replace(base, name=name, train=train))


def finetune_perturber(method: str, eta0: float | None):
    """The perturber that replaces the recipe's one (None: the recipe's own): the KL ball for ``at-kl``."""
    return kl_ball_at(float(eta0)) if method == "at-kl" else None


class _PerturberOverride:
    """Within the block, ``benchmarks.train`` builds ``perturber`` instead of the recipe's (the launcher's recipe
    format has no KL budget; see the report). Restores the original builder on exit."""

    def __init__(self, perturber) -> None:
        self.perturber = perturber

    def __enter__(self):
        import benchmarks.train as launcher

        self.saved = launcher.build_perturber
        if self.perturber is not None:
            launcher.build_perturber = lambda recipe: self.perturber
        return self

    def __exit__(self, *exc) -> None:
        import benchmarks.train as launcher

        launcher.build_perturber = self.saved


def weights_sha(state: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def checkpoint_payload(run_dir: Path) -> dict:
    from atdiff.checkpoint import load_checkpoint

    return load_checkpoint(run_dir / LATEST, restore_rng=False)


def adam_updates(run_dir: Path) -> int:
    """The optimizer steps a run made: AdamW's ``step`` counter of its checkpoint (the same for every parameter)."""
    state = checkpoint_payload(run_dir)["optimizer"]["state"]
    counts = {int(float(s["step"])) for s in state.values()}
    if len(counts) != 1:
        raise ValueError(f"run_dir: {run_dir} has parameters with different step counts {sorted(counts)}")
    return counts.pop()


def finetune(recipe: Recipe, run_dir: Path, init: Path, perturber, device: torch.device, progress: bool) -> dict:
    """Fine-tune ``recipe`` from the EMA weights of the run ``init`` into ``run_dir`` (resuming a killed run, reusing a
    finished one); returns ``compare_meta.json``: updates, minibatch steps, the sha of the initial weights, seconds."""
    from benchmarks.train import train

    meta_path = run_dir / "compare_meta.json"
    if meta_path.is_file():
        return json.loads(meta_path.read_text())
    resume = (run_dir / LATEST).is_file()
    with _PerturberOverride(perturber):
        train(recipe, run_dir, info=DistInfo(0, 1, 0, device), init_from=None if resume else str(init),
              resume=resume, progress=progress)
    payload = checkpoint_payload(run_dir)
    meta = {"recipe": recipe.name, "updates": adam_updates(run_dir), "minibatch_steps": int(payload["step"]),
            "init_from": str(init), "init_ema_sha": weights_sha(checkpoint_payload(init)["ema"]["model"]),
            "perturber": repr(perturber) if perturber is not None else "recipe", "seconds": float(payload["elapsed"])}
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    return meta

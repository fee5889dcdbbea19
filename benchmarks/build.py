"""Build what a recipe describes: the process, the network wrapped as a model, the loss (with a consistency recipe's
teacher), the perturber and the training images (uint8, padded to the network's size); load a run's model
(:func:`load_run`). Used by the launcher (:mod:`benchmarks.train`), the sampling and sweep commands."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from atdiff.checkpoint import load_checkpoint, read_config
from atdiff.consistency import ConsistencyLoss, cd_loss, ct_loss, ict_loss
from atdiff.data import read_cifar10, read_digits, read_image_folder, read_imagenet64_npz, read_mnist5k
from atdiff.losses import DenoisingLoss, HybridLoss
from atdiff.networks.unet import UNet
from atdiff.perturb import Perturber, input_perturbation
from atdiff.precond import ConsistencyModel, DiffusionModel, VEFromVP
from atdiff.processes import VE, VPDiscrete
from atdiff.samplers import REGISTRY
from benchmarks.recipes import Recipe, recipe_from_dict

__all__ = ["build_process", "build_model", "build_loss", "build_perturber", "build_teacher", "prior_std",
           "read_data", "load_run", "clip_options", "LATEST"]

LATEST = "ckpt/latest.pt"


def build_process(recipe: Recipe) -> VPDiscrete | VE:
    """The recipe's discrete VP process, or for a consistency recipe the VE path on ``[sigma_min, sigma_max]``."""
    c = recipe.consistency
    if c.kind != "none":
        return VE(c.sigma_min, c.sigma_max)
    return VPDiscrete(recipe.diffusion.schedule, recipe.diffusion.steps)


def build_model(recipe: Recipe, process: VPDiscrete | VE | None = None) -> DiffusionModel | ConsistencyModel:
    """``DiffusionModel(UNet(**recipe.network), process)`` predicting eps (and the variance if learn_sigma), or for a
    consistency recipe ``ConsistencyModel(UNet(...), sigma_data, sigma_min)``; either way the model carries its
    process as ``model.process`` (what the samplers are called with)."""
    process = build_process(recipe) if process is None else process
    net = UNet(**recipe.network)
    c = recipe.consistency
    if c.kind == "none":
        return DiffusionModel(net, process, "eps", learned_variance=bool(recipe.network.get("learn_sigma", False)))
    model = ConsistencyModel(net, sigma_data=c.sigma_data, sigma_min=c.sigma_min)
    model.process = process
    return model


def prior_std(process: VPDiscrete | VE) -> float:
    """The standard deviation of the sampler's starting point ``x_T``: ``sigma_max`` on the VE path, 1 for VP."""
    return float(process.sigma_max) if isinstance(process, VE) else 1.0


def build_teacher(recipe: Recipe, map_location: Any = "cpu", *, smoke: bool = False) -> VEFromVP | None:
    """The CD teacher of a ``consistency.kind = "cd"`` recipe (None otherwise): the EMA model of the diffusion run
    ``consistency.teacher`` seen on the VE path (:class:`atdiff.precond.VEFromVP`), frozen and in eval mode,
    checked against the recipe's data. ``smoke`` without a teacher: an untrained eps-network of the recipe's
    architecture on the cosine VP process (announced on stdout), so the pipeline runs without a teacher run."""
    c = recipe.consistency
    if c.kind != "cd":
        return None
    if not c.teacher:
        if not smoke:
            raise ValueError(f"consistency.teacher: consistency distillation needs a diffusion run to distil; pass "
                             f"--set consistency.teacher=RUN_DIR (a run of this launcher, e.g. digits-std for "
                             f"{recipe.name})")
        print("smoke: no consistency.teacher; distilling an untrained eps-network", flush=True)
        process = VPDiscrete("cosine", 1000)
        model = DiffusionModel(UNet(**recipe.network), process, "eps", learned_variance=False)
    else:
        try:
            model, process, teacher_recipe = load_run(c.teacher, map_location=map_location)
        except (FileNotFoundError, ValueError, OSError) as err:
            raise ValueError(f"consistency.teacher: {err}") from err
        _check_teacher(recipe, teacher_recipe, c.teacher)
    model.requires_grad_(False).eval()
    return VEFromVP(model, process).to(map_location).eval()


def _check_teacher(recipe: Recipe, teacher: Recipe, path: str) -> None:
    if teacher.consistency.kind != "none":
        raise ValueError(f"consistency.teacher: {path} is a consistency run ({teacher.name}); the teacher is a "
                         f"diffusion run")
    mine, theirs = recipe.data, teacher.data
    for key in ("channels", "image_size", "class_cond", "num_classes"):
        if getattr(mine, key) != getattr(theirs, key) and (key != "num_classes" or mine.class_cond):
            raise ValueError(f"consistency.teacher: {path} ({teacher.name}) has data.{key} = "
                             f"{getattr(theirs, key)!r}, the recipe {recipe.name} has {getattr(mine, key)!r}")


def build_loss(recipe: Recipe, process: VPDiscrete | VE, model: nn.Module | None = None,
               teacher: VEFromVP | None = None) -> DenoisingLoss | HybridLoss | ConsistencyLoss:
    """The hybrid loss (with the loss-second-moment time sampler if asked) or the eps-MSE loss; for a consistency
    recipe the CD / CT / iCT loss of ``model`` (its target EMA starts from ``model``; CD distils ``teacher``), the
    CM-AT target from ``diffusion.target_mode`` and the perturbation on the student's input. The curricula run
    over ``consistency.curriculum_steps`` parameter updates, by default ``train.steps`` minibatches of
    ``perturb.replay`` updates each under free AT (one otherwise)."""
    c = recipe.consistency
    if c.kind != "none":
        if model is None:
            raise ValueError("model: a consistency loss needs the model (its target network starts from it)")
        at = {"target_mode": recipe.diffusion.target_mode, "perturb": "student", "rho": c.rho,
              "distance": c.distance}
        updates = c.curriculum_steps or \
            recipe.train.steps * (recipe.perturb.replay if recipe.perturb.kind == "free-at" else 1)
        if c.kind == "cd":
            if teacher is None:
                raise ValueError("teacher: consistency distillation needs a teacher (build_teacher)")
            return cd_loss(teacher, model, process, N=c.N, mu=c.mu, solver=c.solver, **at)
        if c.kind == "ct":
            return ct_loss(model, process, total_steps=updates, s0=c.s0, s1=c.s1, mu0=c.mu, **at)
        return ict_loss(process, total_steps=updates, s0=c.s0, s1=c.s1, **at)
    d = recipe.diffusion
    if d.loss == "hybrid":
        return HybridLoss(process, vlb_weight=d.vlb_weight, importance_sampling=d.importance_sampling,
                          target_mode=d.target_mode)
    return DenoisingLoss(process, target="eps", target_mode=d.target_mode)


def build_perturber(recipe: Recipe) -> Perturber | None:
    """None (standard), input perturbation (gamma), or the free-AT l2 step inside radius ``radius sqrt(d)``."""
    p = recipe.perturb
    if p.kind == "ip":
        return input_perturbation(p.gamma)
    if p.kind == "free-at":
        return Perturber("fgsm", norm="l2", budget="rms", radius=p.radius, step_size=p.step_size,
                         step_units="absolute", step_rule="l2", init="zero")
    return None


# ----------------------------------------------------------------------------------------------- loading runs


def _checkpoint_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / LATEST if path.is_dir() else path


def load_run(path: str | os.PathLike, *, weights: str = "ema", map_location: Any = "cpu"
             ) -> tuple[DiffusionModel | ConsistencyModel, VPDiscrete | VE, Recipe]:
    """``(model, process, recipe)`` of a run directory (its ``ckpt/latest.pt``) or of one checkpoint of it.

    ``weights``: ``"ema"`` (the EMA parameters, what samplers and evaluators use) or ``"model"`` (the raw ones).
    The model is in eval mode on ``map_location``; the recipe is the one saved with the checkpoint (a consistency
    run gives a :class:`~atdiff.precond.ConsistencyModel` on the VE path, sampled with the ``consistency``
    sampler from ``x_T = sigma_max z``, :func:`prior_std`)."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights: expected 'ema' or 'model', got {weights!r}")
    ckpt = _checkpoint_path(path)
    recipe = recipe_from_dict(read_config(ckpt))
    process = build_process(recipe)
    model = build_model(recipe, process)
    payload = load_checkpoint(ckpt, restore_rng=False, map_location=map_location)
    state = payload["ema"]["model"] if weights == "ema" else payload["model"]
    _load_weights(model, state, ckpt, "path")
    return model.to(map_location).eval(), process, recipe


def _load_weights(model: nn.Module, state: dict, ckpt: Path, arg: str) -> None:
    mine = model.state_dict()
    missing, unexpected = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
    bad = [k for k in mine if k in state and tuple(state[k].shape) != tuple(mine[k].shape)]
    if missing or unexpected or bad:
        raise ValueError(f"{arg}: the weights in {ckpt} belong to another architecture (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, other shapes {bad[:3]})")
    model.load_state_dict(state)


# ----------------------------------------------------------------------------------------------- data


def _pad_uint8(images: np.ndarray, size: int) -> np.ndarray:
    h, w = images.shape[-2:]
    if size < max(h, w):
        raise ValueError(f"data.pad: {size} is smaller than the images ({h}x{w})")
    top, left = (size - h) // 2, (size - w) // 2
    return np.pad(images, ((0, 0), (0, 0), (top, size - h - top), (left, size - w - left)))


def _read_source(recipe: Recipe) -> tuple[Any, np.ndarray]:
    d = recipe.data
    if d.dataset == "digits":
        return read_digits()
    if d.dataset == "mnist5k":
        return read_mnist5k()
    root = Path(d.root)
    if not root.exists():
        raise ValueError(f"data.root: {root} does not exist (dataset {d.dataset}; set it with --set data.root=PATH)")
    try:
        if d.dataset == "cifar10":
            return read_cifar10(root)
        if d.dataset == "imagenet64":
            files = sorted(root.glob("*.npz")) if root.is_dir() else [root]
            if not files:
                raise ValueError(f"{root} holds no .npz files")
            return read_imagenet64_npz(files)
        return read_image_folder(root, size=None if d.pad else d.image_size,
                                 mode="L" if d.channels == 1 else "RGB")
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"data.root: {str(err).removeprefix('root: ')}") from err


def read_data(recipe: Recipe, *, smoke: bool = False) -> tuple[Any, np.ndarray | None]:
    """The recipe's training images as uint8 ``(N, C, H, W)`` (padded to ``data.pad``) and labels ``(N,)`` (None
    for an unconditional recipe). Sizes and labels are checked against the recipe (``ValueError`` naming the key).

    ``smoke``: a data set read from ``data.root`` that does not exist is replaced by 64 random images of the
    recipe's shape (announced on stdout), so a tiny end-to-end run needs no download.
    """
    d = recipe.data
    if smoke and d.dataset in ("cifar10", "imagenet64", "folder") and not Path(d.root).exists():
        print(f"smoke: {d.root!r} not found; using 64 random uint8 images {d.channels}x{d.image_size}x"
              f"{d.image_size}", flush=True)
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (64, d.channels, d.image_size, d.image_size), dtype=np.uint8)
        labels = rng.integers(0, d.num_classes, 64).astype(np.int64)
    else:
        images, labels = _read_source(recipe)
        if d.pad:
            if not isinstance(images, np.ndarray):
                raise ValueError("data.pad: padding is for data sets held in memory (digits, MNIST-5k, folders)")
            images = _pad_uint8(images, d.pad)
    shape = tuple(images.shape[1:])
    if shape != (d.channels, d.image_size, d.image_size):
        raise ValueError(f"data.image_size: {d.dataset} at {d.root or 'its package'} holds images of shape {shape} "
                         f"(C, H, W) after padding, the recipe expects ({d.channels}, {d.image_size}, "
                         f"{d.image_size})")
    if not d.class_cond:
        return images, None
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= d.num_classes):
        raise ValueError(f"data.num_classes: labels span {labels.min()}..{labels.max()}, the recipe has "
                         f"{d.num_classes} classes")
    return images, labels


def clip_options(sampler: str, clip_x0: str | float | None = "auto") -> dict[str, float]:
    """The ``clip_x0`` option for ``sampler`` on images in ``[-1, 1]``: ``"auto"`` clamps the predicted ``x0`` to
    ``[-1, 1]`` where the sampler has a data prediction to clamp (improved-diffusion's default ``clip_denoised``;
    on the cosine schedule IDDPM and DPM-Solver++ diverge from ``t = T`` without it) and nothing elsewhere;
    ``None`` / ``"none"``: no clipping; a number: that bound, refused for a sampler that cannot clip."""
    if sampler not in REGISTRY:
        raise ValueError(f"sampler: unknown sampler {sampler!r}; valid samplers: {', '.join(REGISTRY)}")
    clips = REGISTRY[sampler].clips
    if clip_x0 is None or clip_x0 == "none":
        return {}
    if clip_x0 == "auto":
        return {"clip_x0": 1.0} if clips else {}
    try:
        value = float(clip_x0)
    except (TypeError, ValueError):
        raise ValueError(f"clip-x0: expected 'auto', 'none' or a number > 0, got {clip_x0!r}") from None
    if not (value > 0 and np.isfinite(value)):
        raise ValueError(f"clip-x0: expected a finite number > 0, got {clip_x0!r}")
    if not clips:
        raise ValueError(f"clip-x0: sampler {sampler!r} has no x0 prediction to clip; use --clip-x0 auto or none")
    return {"clip_x0": value}

"""Build what a recipe describes: the process, the network wrapped as a model, the loss, the perturber and the
training images (uint8, padded to the network's size). Used by the launcher (:mod:`benchmarks.train`) and by
:func:`benchmarks.train.load_run`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from atdiff.data import read_cifar10, read_digits, read_image_folder, read_imagenet64_npz, read_mnist5k
from atdiff.losses import DenoisingLoss, HybridLoss
from atdiff.networks.unet import UNet
from atdiff.perturb import Perturber, input_perturbation
from atdiff.precond import DiffusionModel
from atdiff.processes import VPDiscrete
from benchmarks.recipes import Recipe

__all__ = ["build_process", "build_model", "build_loss", "build_perturber", "read_data"]


def build_process(recipe: Recipe) -> VPDiscrete:
    """The recipe's discrete VP process."""
    return VPDiscrete(recipe.diffusion.schedule, recipe.diffusion.steps)


def build_model(recipe: Recipe, process: VPDiscrete | None = None) -> DiffusionModel:
    """``DiffusionModel(UNet(**recipe.network), process)`` predicting eps (and the variance if learn_sigma)."""
    process = build_process(recipe) if process is None else process
    net = UNet(**recipe.network)
    return DiffusionModel(net, process, "eps", learned_variance=bool(recipe.network.get("learn_sigma", False)))


def build_loss(recipe: Recipe, process: VPDiscrete) -> DenoisingLoss | HybridLoss:
    """The hybrid loss (with the loss-second-moment time sampler if asked) or the eps-MSE loss."""
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



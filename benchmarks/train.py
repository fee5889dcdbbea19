"""Train a recipe of :mod:`benchmarks.recipes` on one process or many (``torchrun``), with exact resume.

    python -m benchmarks.train --recipe digits-at --out runs/digits-at
    torchrun --nproc_per_node 8 -m benchmarks.train --recipe cifar10-adm --out runs/cifar10-adm
    python -m benchmarks.train --resume runs/digits-at --set train.steps=6000

A run directory holds ``config.json`` (the resolved recipe), ``ckpt/latest.pt`` (+ its sidecar with the same
config; ``ckpt/step-NNNNNNN.pt`` every ``train.keep_every`` steps), ``log.jsonl`` (one line per logged step:
``loss`` (importance-weighted, mean over the free-AT passes), ``loss_last`` and its parts ``mse``, ``vb`` (unweighted
means of the last pass), ``grad_norm``, ``delta_norm`` (mean ``||delta||`` of each pass), ``lr``, ``samples_per_s``,
``elapsed_s``, ``skipped``) and sample grids
``samples/step-NNNNNNN.png`` drawn from the EMA model. A consistency recipe (``consistency.kind`` cd, ct, ict) trains a
:class:`atdiff.precond.ConsistencyModel` on the VE path with :class:`atdiff.consistency.ConsistencyLoss`; its target
network and curriculum move after every parameter update (``chain_updates(ema, loss)``) and are saved in every
checkpoint; its grids are drawn with the consistency sampler in 1 and ``train.sample_steps`` steps
(``samples/step-NNNNNNN-Ksteps.png``); CD loads the teacher run named by ``consistency.teacher``.
Under ``torchrun`` the model is wrapped in DistributedDataParallel (nccl on CUDA, gloo on the CPU); the recipe's
global batch is split over the processes; every rank slices one training record (times, noise) drawn for the global
batch, so the run does what one process would do on the same global batch (up to float summation order) whenever the
perturbation is deterministic (none, free AT from zero) and dropout is off. The time sampler is fed with the
all-gathered (t, losses). Rank 0 logs and writes checkpoints, which carry every rank's RNG state.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from atdiff.checkpoint import load_checkpoint, read_config, rng_state, save_checkpoint, set_rng_state
from atdiff.consistency import chain_updates
from atdiff.data import ImageStream
from atdiff.distributed import DistInfo, all_gather_cat, all_gather_objects, cleanup, global_draw, init_distributed
from atdiff.eval.samples_io import save_grid, to_uint8
from atdiff.losses import LossDraw
from atdiff.networks.unet import UNet
from atdiff.perturb import Perturber
from atdiff.precond import DiffusionModel
from atdiff.samplers import sample
from atdiff.train import EMA, free_at_step, train_step
from benchmarks.build import (
    LATEST,
    _checkpoint_path,
    _load_weights,
    build_loss,
    build_model,
    build_perturber,
    build_process,
    build_teacher,
    clip_options,
    load_run,
    prior_std,
    read_data,
)
from benchmarks.cli import run_cli
from benchmarks.recipes import (
    Recipe,
    apply_overrides,
    check_recipe,
    recipe_from_dict,
    recipe_names,
    recipe_to_dict,
    resolve,
    smoke_version,
)

__all__ = ["build_process", "build_model", "build_loss", "build_perturber", "read_data", "load_run", "grid_scale",
           "train", "main", "TrainResult"]

RESUMABLE = ("train.steps", "train.log_every", "train.sample_every", "train.checkpoint_every", "train.keep_every",
             "train.sampler", "train.sample_steps", "train.num_samples")


# ----------------------------------------------------------------------------------------------- the loss adapter


class _RunLoss:
    """The recipe's loss as the training steps see it: this rank's slice of a record drawn for the global batch
    (:func:`atdiff.distributed.global_draw`, from a generator in the same state on every rank), and a note of the
    last evaluation's parts and of the mean ``||delta||`` of every pass of the current step (for the log)."""

    def __init__(self, loss: Any, generator: torch.Generator, rank: int, world_size: int) -> None:
        self.inner, self.generator, self.rank, self.world_size = loss, generator, rank, world_size
        self.process = loss.process
        self.parts: dict[str, Tensor] = {}
        self.delta_norms: list[Tensor] = []

    def draw(self, x0: Tensor, generator: torch.Generator | None = None) -> LossDraw:
        return global_draw(self.inner, x0, self.generator, self.rank, self.world_size)

    def evaluate(self, model, x0: Tensor, record: LossDraw, delta: Tensor | None = None, *, cond=None) -> Tensor:
        zero = torch.zeros((), device=x0.device)
        self.delta_norms.append(zero if delta is None else
                                torch.linalg.vector_norm(delta.detach().flatten(1).float(), dim=1).mean())
        if hasattr(self.inner, "terms"):
            terms = self.inner.terms(model, x0, record.t, record.noise, delta, cond=cond)
            self.parts = {k: v.detach().float().mean() for k, v in terms.items() if k != "loss"}
            return terms["loss"]
        return self.inner.evaluate(model, x0, record, delta, cond=cond)

    def observe(self, record: LossDraw, losses: Tensor) -> None:
        self.inner.observe(record, losses)


# ----------------------------------------------------------------------------------------------- images


def grid_scale(image_size: int) -> int:
    """Pixel repetition that makes a grid of small images visible (about 64 pixels per image)."""
    return max(1, 64 // image_size)


def grid_steps(recipe: Recipe) -> list[int]:
    """The sampler steps of the run's grids: ``train.sample_steps``; a consistency model also draws a 1-step grid."""
    t = recipe.train
    return sorted({1, t.sample_steps}) if recipe.consistency.kind != "none" else [t.sample_steps]


def grid_path(run_dir: Path, recipe: Recipe, step: int, steps: int) -> Path:
    """``samples/step-NNNNNNN.png`` (a consistency run: ``samples/step-NNNNNNN-Ksteps.png``, one per grid)."""
    suffix = f"-{steps}steps" if recipe.consistency.kind != "none" else ""
    return run_dir / f"samples/step-{step:07d}{suffix}.png"


@torch.no_grad()
def sample_grid(model: nn.Module, recipe: Recipe, path: Path, device: torch.device,
                steps: int | None = None) -> Path | None:
    """``train.num_samples`` samples from ``model`` with ``train.sampler`` in ``steps`` (default
    ``train.sample_steps``) steps from ``x_T = prior_std z`` with a fixed seed (grids of one run are comparable) as
    a PNG grid (:func:`atdiff.eval.save_grid`), x0 clamped as :func:`benchmarks.build.clip_options` says; None,
    with a warning, if a sample is not finite."""
    d, t = recipe.data, recipe.train
    gen = torch.Generator(device=device).manual_seed(t.seed + 1)
    shape = (t.num_samples, d.channels, d.image_size, d.image_size)
    x_T = prior_std(model.process) * torch.randn(shape, generator=gen, device=device)
    labels = torch.arange(t.num_samples, device=device) % d.num_classes if d.class_cond else None
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the training's global RNG stream is left as it was
        result = sample(t.sampler, model.eval(), x_T, model.process, steps or t.sample_steps, generator=gen,
                        cond=None if labels is None else {"y": labels}, **clip_options(t.sampler))
    if not bool(torch.isfinite(result.x).all()):
        warnings.warn(f"samples: non-finite values in the grid for {path.name}; no grid written", stacklevel=2)
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    save_grid(path, to_uint8(result.x), pad=1, scale=grid_scale(d.image_size))
    return path


# ----------------------------------------------------------------------------------------------- init-from


def _with_defaults(network: dict[str, Any]) -> dict[str, Any]:
    """UNet keywords with the defaults filled in (a config written before a keyword existed compares equal)."""
    defaults = {k: p.default for k, p in inspect.signature(UNet.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return json.loads(json.dumps({**defaults, **network}))


def _check_init_from(recipe: Recipe, path: str | os.PathLike) -> Path:
    """The checkpoint behind ``path``, verified to hold the recipe's network (``ValueError`` naming what differs)."""
    ckpt = _checkpoint_path(path)
    try:
        saved = read_config(ckpt)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"init_from: {err}") from err
    net = saved.get("network") if isinstance(saved, dict) else None
    if not isinstance(net, dict):
        raise ValueError(f"init_from: {ckpt} was not written by benchmarks.train (its config has no network)")
    net, mine = _with_defaults(net), _with_defaults(recipe.network)
    if net != mine:
        diff = sorted(k for k in set(net) | set(mine) if net.get(k) != mine.get(k))
        raise ValueError(f"init_from: {ckpt} holds another network (keys that differ: {diff}); the recipe "
                         f"{recipe.name} needs {recipe.network}")
    return ckpt


def _init_from(model: DiffusionModel, recipe: Recipe, path: str | os.PathLike) -> None:
    """Start from the EMA weights of a checkpoint of the same network (checked before anything is loaded)."""
    ckpt = _check_init_from(recipe, path)
    payload = load_checkpoint(ckpt, restore_rng=False)
    _load_weights(model, payload["ema"]["model"], ckpt, "init_from")


# ----------------------------------------------------------------------------------------------- training


@dataclasses.dataclass
class _Run:
    model: nn.Module
    ddp: nn.Module
    loss: _RunLoss
    base_loss: Any
    perturber: Perturber | None
    optimizer: torch.optim.Optimizer
    ema: EMA
    scaler: Any
    stream: ImageStream
    draw_gen: torch.Generator
    rank_gen: torch.Generator
    autocast: torch.dtype | None
    updater: Any  # what moves after every parameter update: the EMA (and a consistency loss's target, curriculum)


def _rank_seed(seed: int, rank: int) -> int:
    return (seed * 1_000_003 + 7919 * (rank + 1)) % 2**63


def _build_run(recipe: Recipe, images: Any, labels: Any, info: DistInfo, init_from: str | None,
               smoke: bool = False) -> _Run:
    o = recipe.optim
    torch.manual_seed(recipe.train.seed)  # the same initial weights on every rank
    process = build_process(recipe)
    model = build_model(recipe, process)
    if init_from is not None:
        _init_from(model, recipe, init_from)
    model.to(info.device)
    torch.manual_seed(_rank_seed(recipe.train.seed, info.rank))  # dropout etc.: one stream per rank
    ddp = model
    if info.world_size > 1:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[info.device] if info.device.type == "cuda"
                                                  else None)
    teacher = build_teacher(recipe, info.device, smoke=smoke)
    base_loss = build_loss(recipe, process, model, teacher)
    draw_gen = torch.Generator(device=info.device).manual_seed(recipe.train.seed)
    rank_gen = torch.Generator(device=info.device).manual_seed(_rank_seed(recipe.train.seed, info.rank) + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    ema = EMA(model, o.ema, warmup=o.ema_warmup)
    cuda = info.device.type == "cuda"
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(o.precision) if cuda else None
    scaler = torch.amp.GradScaler("cuda") if cuda and o.precision == "fp16" else None
    stream = ImageStream(images, labels, o.batch_size, rank=info.rank, world_size=info.world_size,
                         seed=recipe.train.seed, flip=recipe.data.flip)
    updater = chain_updates(ema, base_loss) if recipe.consistency.kind != "none" else ema
    return _Run(model, ddp, _RunLoss(base_loss, draw_gen, info.rank, info.world_size), base_loss,
                build_perturber(recipe), optimizer, ema, scaler, stream, draw_gen, rank_gen, autocast, updater)


def _state(run: _Run, step: int, elapsed: float, world_size: int) -> dict[str, Any]:
    ranks = all_gather_objects({"rng": rng_state(), "generator": run.rank_gen.get_state()})
    state = dict(model=run.model, ema=run.ema, optimizer=run.optimizer, stream=run.stream, draw_generator=run.draw_gen,
                 step=step, elapsed=elapsed, world_size=world_size, ranks=ranks)
    if hasattr(run.base_loss, "state_dict"):
        state["loss"] = run.base_loss
    if run.scaler is not None:
        state["scaler"] = run.scaler
    return state


def _save(run: _Run, run_dir: Path, recipe: Recipe, step: int, elapsed: float, info: DistInfo) -> None:
    state = _state(run, step, elapsed, info.world_size)  # collective: every rank takes part
    if info.is_main:
        config = recipe_to_dict(recipe)
        save_checkpoint(run_dir / LATEST, config=config, **state)
        keep = recipe.train.keep_every
        if keep and step % keep == 0:
            save_checkpoint(run_dir / f"ckpt/step-{step:07d}.pt", config=config, **state)


def _resume(run: _Run, run_dir: Path, info: DistInfo) -> tuple[int, float]:
    ckpt = run_dir / LATEST
    targets = dict(model=run.model, ema=run.ema, optimizer=run.optimizer, stream=run.stream,
                   draw_generator=run.draw_gen)
    if hasattr(run.base_loss, "state_dict"):
        targets["loss"] = run.base_loss
    if run.scaler is not None:
        targets["scaler"] = run.scaler
    payload = load_checkpoint(ckpt, restore_rng=False, map_location=info.device, **targets)
    ranks = payload["ranks"]
    if payload["world_size"] == info.world_size:
        set_rng_state(ranks[info.rank]["rng"])
        run.rank_gen.set_state(ranks[info.rank]["generator"].cpu())
    else:
        warnings.warn(f"resume: {ckpt} was written by {payload['world_size']} processes, this run has "
                      f"{info.world_size}: the data, times and noise continue exactly, per-rank randomness "
                      f"(dropout, input perturbation) is reseeded", stacklevel=2)
        torch.manual_seed(_rank_seed(int(payload["step"]), info.rank))
        run.rank_gen.manual_seed(_rank_seed(int(payload["step"]), info.rank) + 1)
    return int(payload["step"]), float(payload["elapsed"])


def _one_step(run: _Run, recipe: Recipe, info: DistInfo) -> dict[str, Any]:
    x, y = next(run.stream)
    x = x.to(info.device, non_blocking=True)
    cond = {"y": y.to(info.device)} if recipe.data.class_cond else None
    run.loss.delta_norms = []
    kw = dict(cond=cond, ema=run.updater, grad_clip=recipe.optim.grad_clip or None, scaler=run.scaler,
              autocast_dtype=run.autocast, generator=run.rank_gen)
    if recipe.perturb.kind == "free-at":
        stats = free_at_step(run.ddp, x, run.loss, run.optimizer, replay=recipe.perturb.replay,
                             perturber=run.perturber, **kw)
    else:
        stats = train_step(run.ddp, x, run.loss, run.optimizer, perturber=run.perturber, **kw)
    t_all = all_gather_cat(stats["record"].t.detach())
    losses_all = all_gather_cat(stats["losses"].float())
    if bool(torch.isfinite(losses_all).all()):
        run.loss.observe(LossDraw(t_all, None), losses_all)
    return stats


def _log_line(run: _Run, stats: dict[str, Any], step: int, samples_per_s: float, elapsed: float) -> dict[str, Any]:
    local = {"loss": stats["loss"], "loss_last": float(stats["losses"].float().mean()), "grad_norm": stats["grad_norm"],
             **{k: float(v) for k, v in run.loss.parts.items()},
             "delta_norm": [float(v) for v in run.loss.delta_norms], "skipped": stats["skipped"]}
    every = all_gather_objects(local)
    line: dict[str, Any] = {"step": step}
    for key in local:
        if key == "delta_norm":
            line[key] = [float(np.mean([e[key][k] for e in every])) for k in range(len(local[key]))]
        elif key == "skipped":
            line[key] = int(sum(e[key] for e in every))
        else:
            line[key] = float(np.mean([e[key] for e in every]))
    line.update(lr=run.optimizer.param_groups[0]["lr"], samples_per_s=samples_per_s, elapsed_s=elapsed)
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in line.items()}


def _summary_writer(path: Path | None):
    """A tensorboard ``SummaryWriter`` on ``path`` (None: only check that tensorboard is installed)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ValueError("tensorboard: not installed (pip install tensorboard); drop --tensorboard") from err
    return None if path is None else SummaryWriter(str(path))


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines beyond ``step`` (written after the checkpoint a resumed run continues from)."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` leaves: the run directory, this rank's model and EMA, the last step."""

    run_dir: Path
    model: nn.Module
    ema: EMA
    step: int


def train(recipe: Recipe, run_dir: str | os.PathLike, *, info: DistInfo | None = None, init_from: str | None = None,
          resume: bool = False, smoke: bool = False, progress: bool = True, tensorboard: bool = False) -> TrainResult:
    """Train ``recipe`` into ``run_dir`` (see the module docstring).

    ``resume=True`` continues the run in ``run_dir`` from its ``ckpt/latest.pt`` exactly (model, EMA, optimiser,
    scaler, time-sampler history, data position, global and per-rank RNG, the draw generator). Every check
    (recipe, data, init checkpoint, run directory) happens before the first step.
    """
    info = info or DistInfo(0, 1, 0, torch.device("cpu"))
    run_dir = Path(run_dir)
    check_recipe(recipe)
    if recipe.optim.batch_size % info.world_size:
        raise ValueError(f"optim.batch_size: the global batch {recipe.optim.batch_size} is not divisible by the "
                         f"{info.world_size} processes")
    if recipe.train.requires_init and init_from is None and not resume and not smoke:
        raise ValueError(f"init_from: recipe {recipe.name} fine-tunes a clean checkpoint (as Wang et al. 2025 do); "
                         f"pass --init-from RUN_DIR_OR_CKPT (e.g. a run of the clean recipe) or --set "
                         f"train.requires_init=False to train from scratch")
    if resume and not (run_dir / LATEST).is_file():
        raise ValueError(f"resume: {run_dir} has no {LATEST}")
    if not resume and (run_dir / LATEST).exists():
        raise ValueError(f"out: {run_dir} already holds a run; continue it with --resume {run_dir} or choose "
                         f"another --out")
    if init_from is not None:
        _check_init_from(recipe, init_from)
    if tensorboard:
        _summary_writer(None)
    images, labels = read_data(recipe, smoke=smoke)
    run = _build_run(recipe, images, labels, info, init_from, smoke)
    step, elapsed = _resume(run, run_dir, info) if resume else (0, 0.0)
    writer = _summary_writer(run_dir / "tensorboard") if tensorboard and info.is_main else None
    log_path = run_dir / "log.jsonl"
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(recipe_to_dict(recipe), indent=2) + "\n")
        if resume:
            _truncate_log(log_path, step)
        elif log_path.exists():
            log_path.unlink()
    t = recipe.train
    from tqdm.auto import tqdm

    bar = tqdm(total=t.steps, initial=step, disable=not (progress and info.is_main), desc=recipe.name,
               dynamic_ncols=True)
    start, last_time, last_step = time.perf_counter(), time.perf_counter(), step
    while step < t.steps:
        stats = _one_step(run, recipe, info)
        step += 1
        bar.update(1)
        now = time.perf_counter()
        total_elapsed = elapsed + now - start
        if t.log_every and (step % t.log_every == 0 or step == t.steps):
            rate = (step - last_step) * recipe.optim.batch_size / max(now - last_time, 1e-9)
            line = _log_line(run, stats, step, rate, total_elapsed)
            last_time, last_step = now, step
            if info.is_main:
                with log_path.open("a") as f:
                    f.write(json.dumps(line) + "\n")
                bar.set_postfix(loss=f"{line['loss']:.4g}" if line["loss"] is not None else "nan")
                if writer is not None:
                    for k, v in line.items():
                        if isinstance(v, float):
                            writer.add_scalar(k, v, step)
        if info.is_main and ((t.sample_every and step % t.sample_every == 0) or step == t.steps):
            for steps in grid_steps(recipe):
                sample_grid(run.ema.model, recipe, grid_path(run_dir, recipe, step, steps), info.device, steps)
        if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.steps:
            _save(run, run_dir, recipe, step, elapsed + time.perf_counter() - start, info)
    bar.close()
    if writer is not None:
        writer.close()
    return TrainResult(run_dir, run.model, run.ema, step)


# ----------------------------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", help=f"recipe name: {', '.join(recipe_names())}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one recipe entry (repeatable), e.g. --set optim.lr=2e-4 --set network.dropout=0.1; "
                        "types are checked, unknown keys refused; with --resume only train.* length/feedback keys")
    p.add_argument("--init-from", help="start from the EMA weights of this checkpoint or run directory (same network)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR exactly from its latest checkpoint")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory (default runs/<recipe>)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny version of the recipe (width 16, 3 steps, batch 4; random images if data.root is "
                        "missing): checks the whole pipeline in seconds")
    p.add_argument("--dry-run", action="store_true", help="print the resolved recipe as JSON and exit")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="device (auto: CUDA if present)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads per process (torch.set_num_threads; 0: torch's default). On a busy machine 1 "
                        "thread per process is often much faster")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--tensorboard", action="store_true", help="also write tensorboard scalars (needs tensorboard)")
    return p


def _resolve_args(args: argparse.Namespace, world_size: int) -> tuple[Recipe, Path, bool]:
    if args.resume:
        if args.init_from:
            raise ValueError("init_from: a resumed run continues its own weights; drop --init-from")
        run_dir = Path(args.resume)
        config = run_dir / "config.json"
        if not config.is_file():
            raise ValueError(f"resume: {run_dir} has no config.json (not a run directory)")
        bad = [o for o in args.overrides if o.split("=", 1)[0].strip() not in RESUMABLE]
        if bad:
            raise ValueError(f"set: {bad} cannot change on --resume (the run's recipe is fixed); resumable keys: "
                             f"{', '.join(RESUMABLE)}")
        recipe = check_recipe(apply_overrides(recipe_from_dict(json.loads(config.read_text())), args.overrides))
        if args.recipe and args.recipe != recipe.name.removesuffix("+smoke"):
            raise ValueError(f"recipe: {run_dir} is a run of {recipe.name}, not {args.recipe}")
        return recipe, run_dir, True
    if not args.recipe:
        raise ValueError("recipe: give --recipe NAME (or --resume RUN_DIR)")
    recipe = resolve(args.recipe, [])
    if args.smoke:
        recipe = smoke_version(recipe, world_size)
    recipe = check_recipe(apply_overrides(recipe, args.overrides))
    return recipe, Path(args.out or f"runs/{recipe.name}"), False


def main(argv: list[str] | None = None) -> TrainResult | None:
    args = _parser().parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    recipe, run_dir, resume = _resolve_args(args, world)
    if args.dry_run:
        print(json.dumps(recipe_to_dict(recipe), indent=2))
        return None
    if args.threads < 0:
        raise ValueError(f"threads: expected >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    info = init_distributed(None if args.device == "auto" else args.device)
    try:
        if info.is_main:
            print(f"{recipe.name}: {info.world_size} process(es) on {info.device}, global batch "
                  f"{recipe.optim.batch_size}, run directory {run_dir}", flush=True)
            if info.device.type == "cpu" and recipe.optim.precision != "fp32":
                print(f"note: optim.precision={recipe.optim.precision} applies on CUDA; this CPU run is float32",
                      flush=True)
        return train(recipe, run_dir, info=info, init_from=args.init_from, resume=resume, smoke=args.smoke,
                     progress=not args.no_progress, tensorboard=args.tensorboard)
    finally:
        cleanup()


if __name__ == "__main__":
    run_cli(main)

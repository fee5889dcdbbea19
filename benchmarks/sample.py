"""Draw samples from a trained run at a given number of network evaluations (NFE), in ADM's ``.npz`` format.

    python -m benchmarks.sample --checkpoint runs/digits-at --sampler ddim --nfe 10 --num-samples 1000 --out S
    torchrun --nproc_per_node 8 -m benchmarks.sample --checkpoint runs/cifar10-adm-at --sampler iddpm --nfe 20 \\
        --num-samples 50000 --batch 500 --out samples/cifar10-at-iddpm-20

``--checkpoint`` is a run directory of ``benchmarks.train`` (its ``ckpt/latest.pt``) or one of its checkpoints; the
EMA weights are used (``--weights model`` for the raw ones); a consistency run (``consistency.kind`` cd / ct) samples
with ``--sampler consistency`` from ``x_T = sigma_max z``. ``--nfe N`` picks the step count of the sampler's
default grid that spends exactly ``N`` network evaluations (``atdiff.samplers.steps_for_nfe``: Heun ``2n - 1``,
single-step DPM-Solver-3 by DPM-Solver-fast's orders, ...); ``--steps`` gives the steps instead. Sample ``i`` depends
only on ``--seed``, ``--batch`` and ``i`` (``atdiff.eval.sharding``): under ``torchrun`` each rank samples every
``world_size``-th batch with that batch's own generator and rank 0 gathers, so any number of processes writes the
same file. Class-conditional models draw labels uniformly from ``--classes`` (default: all classes) with the same
generator. Output in ``--out``: ``samples_NxHxWxC.npz`` (uint8 NHWC under ``arr_0``, labels under ``arr_1``),
``grid.png`` (the first 64) and ``info.json`` (the command, the NFE asked for and measured, the steps, timings).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atdiff.distributed import DistInfo, cleanup, gather_objects, init_distributed
from atdiff.eval.samples_io import save_grid, save_samples, to_uint8
from atdiff.eval.sharding import Batch, batch_generator, batch_plan, merge_shards
from atdiff.samplers import REGISTRY, sample, sampler_help, steps_for_nfe
from benchmarks.build import clip_options, prior_std
from benchmarks.cli import run_cli
from benchmarks.recipes import Recipe
from benchmarks.train import grid_scale, load_run

__all__ = ["generate", "parse_classes", "clip_options", "main"]



def parse_classes(text: str | None, recipe: Recipe) -> list[int] | None:
    """The class list of ``--classes`` (``"3,5"`` or ``"all"``/None for every class) for a class-conditional recipe;
    None for an unconditional one (where ``--classes`` is refused)."""
    d = recipe.data
    if not d.class_cond:
        if text is not None:
            raise ValueError(f"classes: the model of {recipe.name} is unconditional")
        return None
    if text is None or text == "all":
        return list(range(d.num_classes))
    try:
        classes = sorted({int(c) for c in text.split(",") if c.strip()})
    except ValueError as err:
        raise ValueError(f"classes: expected comma-separated integers or 'all', got {text!r}") from err
    if not classes or classes[0] < 0 or classes[-1] >= d.num_classes:
        raise ValueError(f"classes: expected classes in 0..{d.num_classes - 1}, got {text!r}")
    return classes


@torch.no_grad()
def generate(model: torch.nn.Module, recipe: Recipe, batches: list[Batch], *, sampler: str, nfe: int | None,
             steps: int | None, seed: int, classes: list[int] | None, device: torch.device,
             progress: bool = False, opts: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray | None, list]:
    """Samples of the given global ``batches``: (uint8 ``(n, H, W, C)``, labels ``(n,)`` or None, the NFE each batch
    spent). Batch ``b`` draws its labels, then its initial noise and the sampler's noise, from
    ``batch_generator(seed, b)``."""
    from tqdm.auto import tqdm

    d = recipe.data
    images, labels, spent = [], [], []
    for b in tqdm(batches, disable=not progress, desc=f"{sampler} nfe={nfe or steps}"):
        gen = batch_generator(seed, b.index, device)
        n = b.stop - b.start
        cond, y = None, None
        if classes is not None:
            pick = torch.randint(len(classes), (n,), generator=gen, device=device)
            y = torch.as_tensor(classes, device=device)[pick]
            cond = {"y": y}
        x_T = prior_std(model.process) * torch.randn((n, d.channels, d.image_size, d.image_size), generator=gen,
                                                     device=device)
        kw = {"nfe": nfe} if nfe is not None else {"steps_or_grid": steps}
        result = sample(sampler, model, x_T, model.process, generator=gen, cond=cond, **kw, **(opts or {}))
        images.append(to_uint8(result.x))
        labels.append(None if y is None else y.cpu().numpy())
        spent.append(int(result.nfe))
    if not images:
        shape = (0, d.image_size, d.image_size, d.channels)
        return np.zeros(shape, np.uint8), (None if classes is None else np.zeros(0, np.int64)), spent
    return np.concatenate(images), (None if classes is None else np.concatenate(labels)), spent


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="samplers:\n" + sampler_help())
    p.add_argument("--checkpoint", required=True, help="run directory of benchmarks.train or a checkpoint in it")
    p.add_argument("--sampler", required=True, help=f"sampler name: {', '.join(REGISTRY)}")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--nfe", type=int, help="network evaluations per sample (the step count follows the sampler)")
    budget.add_argument("--steps", type=int, help="steps of the sampler's default grid (instead of --nfe)")
    p.add_argument("--num-samples", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--batch", type=int, default=64, help="samples per batch; with --seed it fixes every sample")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-batch generators")
    p.add_argument("--classes", help="class-conditional models: comma-separated classes to draw from (default all)")
    p.add_argument("--weights", choices=("ema", "model"), default="ema", help="EMA (default) or raw weights")
    p.add_argument("--clip-x0", default="auto", help="clamp the predicted x0: 'auto' (default: to [-1, 1] where the "
                   "sampler has an x0 to clamp, as improved-diffusion does), 'none', or a bound")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="device (auto: CUDA if present)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per process (0: torch's default)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if args.sampler not in REGISTRY:
        raise ValueError(f"sampler: unknown sampler {args.sampler!r}; valid samplers: {', '.join(REGISTRY)}")
    for name in ("nfe", "steps", "num_samples", "batch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"{name.replace('_', '-')}: expected >= 1, got {value}")
    if args.seed < 0 or args.threads < 0:
        raise ValueError("seed: expected >= 0" if args.seed < 0 else "threads: expected >= 0")
    if args.nfe is not None:
        steps_for_nfe(args.sampler, args.nfe)  # an unattainable budget is refused before the model loads
    clip_options(args.sampler, args.clip_x0)


def main(argv: list[str] | None = None) -> Path | None:
    args = _parser().parse_args(argv)
    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    info: DistInfo = init_distributed(None if args.device == "auto" else args.device)
    try:
        model, _, recipe = load_run(args.checkpoint, weights=args.weights, map_location=info.device)
        classes = parse_classes(args.classes, recipe)
        batches = batch_plan(args.num_samples, args.batch, info.rank, info.world_size)
        start = time.perf_counter()
        images, labels, spent = generate(model, recipe, batches, sampler=args.sampler, nfe=args.nfe,
                                         steps=args.steps, seed=args.seed, classes=classes, device=info.device,
                                         progress=info.is_main and not args.no_progress,
                                         opts=clip_options(args.sampler, args.clip_x0))
        seconds = time.perf_counter() - start
        shards = gather_objects((batches, images, labels, spent, seconds))
        if not info.is_main:
            return None
        all_images = merge_shards([(s[0], s[1]) for s in shards])
        all_labels = None if classes is None else merge_shards([(s[0], s[2]) for s in shards])
        measured = sorted({n for s in shards for n in s[3]})
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        n, h, w, c = all_images.shape
        npz = out / f"samples_{n}x{h}x{w}x{c}.npz"
        save_samples(npz, all_images, all_labels)
        save_grid(out / "grid.png", all_images[:64], pad=1, scale=grid_scale(h))
        info_json = {"command": "python -m benchmarks.sample " + " ".join(argv if argv is not None else sys.argv[1:]),
                     "checkpoint": str(args.checkpoint), "recipe": recipe.name, "weights": args.weights,
                     "sampler": args.sampler, **clip_options(args.sampler, args.clip_x0),
                     "nfe_requested": args.nfe, "steps_requested": args.steps,
                     "nfe_measured": measured, "num_samples": n, "batch": args.batch, "seed": args.seed,
                     "classes": classes, "world_size": info.world_size,
                     "seconds_per_rank": [round(s[4], 3) for s in shards], "npz": npz.name}
        (out / "info.json").write_text(json.dumps(info_json, indent=2) + "\n")
        if args.nfe is not None and measured != [args.nfe]:
            raise RuntimeError(f"nfe: asked for {args.nfe}, the sampler spent {measured}")
        print(f"wrote {npz} ({n} samples, NFE {measured}) and {out / 'grid.png'}", flush=True)
        return npz
    finally:
        cleanup()


if __name__ == "__main__":
    run_cli(main)

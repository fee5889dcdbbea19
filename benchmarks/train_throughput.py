"""Train-step throughput: the library's ADM UNet (standard training and free AT) against diffusers' ``UNet2DModel``.

Three arms train on the same minibatches, with the same loss (:class:`atdiff.losses.DenoisingLoss` on a cosine
``VPDiscrete`` process, T = 1000), optimiser (Adam) and train step (:func:`atdiff.train.train_step`):

* ``atdiff``          -- :class:`atdiff.networks.UNet` in the ADM layout of Wang et al. 2025's CIFAR-10 network
  (scale-shift norm, BigGAN up/down blocks, new attention order), scaled down by ``--channels`` / ``--blocks``;
* ``atdiff-free-at``  -- the same network under :func:`atdiff.train.free_at_step` (the paper's free AT:
  ``K`` replays per minibatch, each one parameter update, so its time is reported per update);
* ``diffusers``       -- a ``UNet2DModel`` of matched width and depth (the same block widths, residual blocks
  per level, attention levels and channels per head, scale-shift time conditioning), wrapped by
  :class:`atdiff.interop.DiffusersModel`.

The arms run interleaved in one process (their order rotates every repeat), each on its own copy of its
network, after an untimed warm-up. Each repeat gives one paired ratio per comparison (both arms timed within
the same repeat, so slow phases of a noisy machine hit both); the report is the median ratio over the repeats
with a percentile-bootstrap confidence interval (:func:`theory.timing.median_ratio_ci`, the interval of every
timing benchmark here).

Then (unless ``--skip-gloo``) one process against two gloo processes under DistributedDataParallel on the same
global batch (:mod:`benchmarks.ddp_throughput`): the library's ``unet_small`` train step (standard and free AT) in
one process with one and with two torch threads, and in two processes of one thread with half the batch each;
median paired ratios (2 processes / 1 process) with bootstrap intervals and the all-reduce share.
``--skip-diffusers`` runs the gloo comparison alone. Usage::

    python -m benchmarks.train_throughput [--quick] [--json PATH] [--repeats N] [--steps S] [--batch B]
                                          [--skip-gloo | --skip-diffusers] [--gloo-batch B] [--gloo-size S]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from atdiff.interop import DiffusersModel
from atdiff.losses import DenoisingLoss
from atdiff.networks import UNet
from atdiff.perturb import PAPER_REPLAY, PAPER_TARGET_MODE, paper_at
from atdiff.precond import DiffusionModel
from atdiff.processes import VPDiscrete
from atdiff.train import free_at_step, train_step
from benchmarks.ddp_throughput import GlooConfig, gloo_table, measure_gloo
from theory.timing import median_ratio_ci, paired_ratios

__all__ = ["library_unet", "diffusers_unet", "parse_args", "main"]


def library_unet(channels: int, blocks: int, size: int, head_channels: int) -> UNet:
    """The paper's ADM layout at width ``channels``, mult (1, 2, 2), attention at the two lower resolutions."""
    return UNet(3, channels, 3, blocks, attention_resolutions=(size // 2, size // 4), channel_mult=(1, 2, 2),
                num_head_channels=head_channels, use_scale_shift_norm=True, resblock_updown=True,
                attention_order="new", image_size=size)


def diffusers_unet(channels: int, blocks: int, size: int, head_channels: int) -> nn.Module:
    """diffusers' ``UNet2DModel`` with the same levels, widths, blocks per level and attention placement."""
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=size, in_channels=3, out_channels=3,
                       block_out_channels=(channels, 2 * channels, 2 * channels), layers_per_block=blocks,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                       attention_head_dim=head_channels, resnet_time_scale_shift="scale_shift",
                       downsample_type="resnet", upsample_type="resnet", norm_num_groups=32)


@dataclass
class Arm:
    name: str
    updates_per_call: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    run: Callable[[nn.Module, Tensor, torch.optim.Optimizer, torch.Generator], object]
    generator: torch.Generator


def time_arm(arm: Arm, batches: list[Tensor]) -> float:
    """Wall time (s) per parameter update of one pass of ``arm`` over ``batches``."""
    sync = torch.cuda.synchronize if batches[0].is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    for x0 in batches:
        arm.run(arm.model, x0, arm.optimizer, arm.generator)
    sync()
    return (time.perf_counter() - start) / (len(batches) * arm.updates_per_call)


def build_arms(args: argparse.Namespace, device: torch.device) -> tuple[list[Arm], dict]:
    process = VPDiscrete("cosine", T=1000)
    loss = DenoisingLoss(process)
    at_loss = DenoisingLoss(process, target_mode=PAPER_TARGET_MODE)
    perturber = paper_at()
    torch.manual_seed(args.seed)
    lib = DiffusionModel(library_unet(args.channels, args.blocks, args.size, args.head_channels), process)
    dif = DiffusersModel(diffusers_unet(args.channels, args.blocks, args.size, args.head_channels), process,
                         prediction="eps")
    params = {"atdiff": sum(p.numel() for p in lib.parameters()),
              "diffusers": sum(p.numel() for p in dif.parameters())}

    def standard(m, x, o, g):
        return train_step(m, x, loss, o, generator=g)

    def free(m, x, o, g):
        return free_at_step(m, x, at_loss, o, replay=PAPER_REPLAY, perturber=perturber, generator=g)

    arms = []
    for name, base, run, updates in (("atdiff", lib, standard, 1), ("atdiff-free-at", lib, free, PAPER_REPLAY),
                                     ("diffusers", dif, standard, 1)):
        model = copy.deepcopy(base).to(device).train()
        arms.append(Arm(name, updates, model, torch.optim.Adam(model.parameters(), lr=1e-4), run,
                        torch.Generator(device=device).manual_seed(args.seed + 1)))
    return arms, params


RATIOS = {"atdiff / diffusers": ("atdiff", "diffusers"),
          "atdiff-free-at / diffusers": ("atdiff-free-at", "diffusers"),
          "atdiff-free-at / atdiff": ("atdiff-free-at", "atdiff")}


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    arms, params = build_arms(args, device)
    gen = torch.Generator().manual_seed(args.seed)
    batches = [torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(device)
               for _ in range(args.steps)]
    for arm in arms:
        time_arm(arm, batches[:1])  # warm-up, untimed
    samples: dict[str, list[float]] = {arm.name: [] for arm in arms}
    with tqdm(total=args.repeats * len(arms), desc="train_throughput", file=sys.stderr) as bar:
        for r in range(args.repeats):
            for arm in arms[r % len(arms):] + arms[:r % len(arms)]:
                bar.set_postfix_str(arm.name)
                samples[arm.name].append(time_arm(arm, batches))
                bar.update(1)
    ratios = {}
    for key, (num, den) in RATIOS.items():
        paired = paired_ratios(samples[num], samples[den])
        med, lo, hi = median_ratio_ci(samples[num], samples[den], level=args.level, seed=args.seed)
        ratios[key] = {"median": med, "ci_low": lo, "ci_high": hi, "level": args.level, "paired": paired}
    return {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "parameters": params,
        "seconds_per_update": {name: {"median": statistics.median(v), "samples": v} for name, v in samples.items()},
        "ratios": ratios,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }


def table(result: dict) -> str:
    lines = [f"parameters: atdiff {result['parameters']['atdiff']:,}, diffusers {result['parameters']['diffusers']:,}",
             f"{'arm':<16} {'ms/update (median)':>20}"]
    for name, s in result["seconds_per_update"].items():
        lines.append(f"{name:<16} {1e3 * s['median']:>20.1f}")
    lines.append(f"{'ratio':<28} {'median':>8} {'CI':>20}")
    for key, r in result["ratios"].items():
        lines.append(f"{key:<28} {r['median']:>8.3f}   [{r['ci_low']:.3f}, {r['ci_high']:.3f}] "
                     f"({100 * r['level']:.0f}%)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_throughput", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--channels", type=int, default=32,
                   help="diffusers comparison: base width of both UNets (level widths C, 2C, 2C)")
    p.add_argument("--blocks", type=int, default=2,
                   help="diffusers comparison: residual blocks per encoder level (both UNets)")
    p.add_argument("--head-channels", type=int, default=32,
                   help="diffusers comparison: channels per attention head (both UNets)")
    p.add_argument("--size", type=int, default=32, help="diffusers comparison: image side length (3 channels)")
    p.add_argument("--batch", type=int, default=8, help="diffusers comparison: minibatch size")
    p.add_argument("--steps", type=int, default=2, help="minibatches per timed pass of one arm (both comparisons)")
    p.add_argument("--repeats", type=int, default=11,
                   help="timed passes per arm (interleaved; both comparisons); one paired ratio each")
    p.add_argument("--level", type=float, default=0.95,
                   help="confidence level of the median-ratio intervals (both comparisons)")
    p.add_argument("--threads", type=int, default=0,
                   help="diffusers comparison: torch intra-op threads (0: leave as is; the gloo comparison sets "
                        "its own: 1 and 2 in one process, 1 per process)")
    p.add_argument("--device", default="cpu",
                   help="diffusers comparison: torch device, e.g. cpu or cuda (the gloo comparison runs on the CPU)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the data, the initial networks and the steps (both comparisons)")
    p.add_argument("--skip-gloo", action="store_true",
                   help="skip the 1-process against 2-process gloo (DDP) comparison")
    p.add_argument("--skip-diffusers", action="store_true",
                   help="skip the atdiff against diffusers comparison (run the gloo comparison alone)")
    p.add_argument("--gloo-batch", type=int, default=16,
                   help="gloo comparison: the GLOBAL minibatch (even; each of the 2 processes takes half)")
    p.add_argument("--gloo-size", type=int, default=16, help="gloo comparison: image side length of unet_small")
    p.add_argument("--quick", action="store_true",
                   help="a small check: 16x16 (gloo 8x8), one minibatch per pass, 7 repeats")
    p.add_argument("--json", type=Path, default=None, help="also write the full result (with samples) here")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.gloo_size, args.steps, args.repeats = 16, 8, 1, 7
    if args.skip_gloo and args.skip_diffusers:
        p.error("--skip-gloo: cannot be combined with --skip-diffusers (nothing would run)")
    for name in ("channels", "blocks", "head_channels", "size", "batch", "steps", "repeats", "gloo_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected >= 1")
    if not 0 < args.level < 1:
        p.error("--level: expected a value in (0, 1)")
    if args.size % 4 or args.channels % 32 or args.channels % args.head_channels:
        p.error("--size must be a multiple of 4, --channels of 32 and of --head-channels")
    if args.gloo_batch % 2:
        p.error(f"--gloo-batch: expected an even global batch (2 processes), got {args.gloo_batch}")
    if args.gloo_size < 4 or args.gloo_size % 2:
        p.error(f"--gloo-size: expected an even side >= 4, got {args.gloo_size}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = {"config": {k: v for k, v in vars(args).items() if k != "json"}}
    if not args.skip_diffusers:
        result = run(args)
        print(table(result))
    if not args.skip_gloo:
        cfg = GlooConfig(size=args.gloo_size, batch=args.gloo_batch, steps=args.steps, seed=args.seed, lr=1e-4)
        result["gloo"], _ = measure_gloo(cfg, args.repeats, level=args.level)
        print(gloo_table(result["gloo"]))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

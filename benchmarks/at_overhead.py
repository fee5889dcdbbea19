"""Cost of adversarial training: time per parameter update and per data epoch (Wang et al. 2025, Algorithm 1;
claim C11 in ``docs/claims.md``).

Methods, all on the same network, process (linear VP, T = 1000) and data:

* ``standard``  -- :func:`atdiff.train.train_step`, one forward+backward per update;
* ``ip``        -- the same with Input Perturbation (:func:`atdiff.perturb.input_perturbation`, gamma 0.1);
* ``free-at-3`` -- :func:`atdiff.train.free_at_step` with ``replay=3`` and :func:`atdiff.perturb.paper_at`:
  three updates per minibatch, each one forward+backward;
* ``pgd-3``     -- ``train_step`` with a 3-step l2 PGD attack of the same budget (radius 0.1 sqrt(d),
  steps 0.1, detached equivariant target): four forward+backward passes per update.

Workloads: the toy MLP (``atdiff.networks.mlp.MLP``, batch 4096 of 2-D points) and a small conv net
(``atdiff.networks.unet.unet_small``, batch 64 of 1x16x16). A data epoch is ``--batches`` distinct
minibatches. All methods run in one process, interleaved (the order rotates every repeat; :mod:`theory.timing`),
each on its own copy of the same initial network; the table shows median times and, against ``standard``, the
median of the per-repeat paired ratios with a 95% bootstrap interval. The free-AT goal (per update at most
1.05x standard) is ``met`` when the whole interval is below it, ``missed`` when the whole interval is above it,
else ``undecided`` (run more ``--repeats``). Usage::

    python -m benchmarks.at_overhead [--json PATH] [--repeats N] [--batches B] [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from atdiff.losses import DenoisingLoss
from atdiff.networks.mlp import MLP
from atdiff.perturb import PAPER_REPLAY, PAPER_TARGET_MODE, Perturber, input_perturbation, paper_at
from atdiff.precond import DiffusionModel
from atdiff.processes import VPDiscrete
from atdiff.train import free_at_step, train_step
from theory.timing import interleaved_times, median_ratio_ci

FREE_AT_TARGET = 1.05  # free AT per update, relative to standard training (claim C11)


def conv_network(channels: int, size: int) -> tuple[nn.Module, str]:
    """The small ADM UNet and its name."""
    from atdiff.networks.unet import unet_small

    return unet_small(in_channels=channels, image_size=size), f"unet_small(in_channels={channels}, {size}x{size})"


@dataclass
class Method:
    name: str
    updates_per_batch: int
    passes_per_update: float  # forward+backward passes per parameter update
    run: Callable[[nn.Module, Tensor, torch.optim.Optimizer, torch.Generator], None]


def methods(process: VPDiscrete) -> list[Method]:
    """The four methods compared, each as ``run(model, x0, optimizer, generator)`` on one minibatch; the AT
    methods train with the detached equivariant target (``PAPER_TARGET_MODE``), the others with the clean one."""
    loss, at_loss = DenoisingLoss(process), DenoisingLoss(process, target_mode=PAPER_TARGET_MODE)
    ip, free = input_perturbation(0.1), paper_at()
    pgd = Perturber("pgd", norm="l2", budget="rms", radius=0.1, steps=3, step_size=0.1,
                    step_units="absolute", step_rule="l2", init="zero")
    return [
        Method("standard", 1, 1.0, lambda m, x, o, g: train_step(m, x, loss, o, generator=g)),
        Method("ip", 1, 1.0, lambda m, x, o, g: train_step(m, x, loss, o, perturber=ip, generator=g)),
        Method(f"free-at-{PAPER_REPLAY}", PAPER_REPLAY, 1.0,
               lambda m, x, o, g: free_at_step(m, x, at_loss, o, replay=PAPER_REPLAY, perturber=free,
                                               generator=g)),
        Method("pgd-3", 1, 4.0, lambda m, x, o, g: train_step(m, x, at_loss, o, perturber=pgd, generator=g)),
    ]


def epoch_runner(method: Method, model: nn.Module, opt: torch.optim.Optimizer, batches: list[Tensor],
                 gen: torch.Generator) -> Callable[[], None]:
    """A function running one pass of ``method`` over ``batches`` (one data epoch)."""

    def run() -> None:
        for x0 in batches:
            method.run(model, x0, opt, gen)

    return run


def bench_workload(name: str, net: nn.Module, net_name: str, shape: tuple[int, ...], n_batches: int,
                   repeats: int, bar: tqdm, device: torch.device) -> dict:
    """Interleaved timing of every method on one network (:func:`theory.timing.interleaved_times`, each method on
    its own copy of the network); returns medians, paired ratios with 95% intervals and raw samples."""
    process = VPDiscrete("linear")
    data_gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(shape, generator=data_gen).to(device) for _ in range(n_batches)]
    base = DiffusionModel(net, process).to(device)
    ms = methods(process)
    runners = {}
    for m in ms:
        model = copy.deepcopy(base)
        runners[m.name] = epoch_runner(m, model, torch.optim.Adam(model.parameters(), lr=1e-4), batches,
                                       torch.Generator(device=device).manual_seed(1))

    def progress(method: str) -> None:
        bar.set_postfix_str(f"{name}/{method}")
        bar.update(1)

    sync = torch.cuda.synchronize if device.type == "cuda" else None
    samples = interleaved_times(runners, repeats, min_repeats=repeats, sync=sync, on_call=progress)
    return summarise(net_name, shape, n_batches, ms, samples)


def summarise(net_name: str, shape: tuple[int, ...], n_batches: int, ms: list[Method],
              samples: dict[str, list[float]]) -> dict:
    """Median epoch and per-update times; per-update and per-epoch ratios to ``standard`` as medians of paired
    per-round ratios with 95% bootstrap intervals."""
    out: dict = {"network": net_name, "batch_shape": list(shape), "batches_per_epoch": n_batches,
                 "methods": {}}
    std = next(m for m in ms if m.name == "standard")
    for m in ms:
        epoch = statistics.median(samples[m.name])
        # per-update time = epoch time / updates per epoch, so the per-update ratio rescales the epoch ratio
        scale = std.updates_per_batch / m.updates_per_batch
        ratio, low, high = median_ratio_ci(samples[m.name], samples["standard"])
        out["methods"][m.name] = {
            "per_epoch_s": epoch, "per_update_s": epoch / (n_batches * m.updates_per_batch),
            "updates_per_minibatch": m.updates_per_batch, "passes_per_update": m.passes_per_update,
            "epoch_ratio": ratio, "epoch_ratio_ci95": [low, high],
            "update_ratio": ratio * scale, "update_ratio_ci95": [low * scale, high * scale],
            "epoch_samples_s": samples[m.name],
        }
    return out


def target_verdict(low: float, high: float, target: float) -> str:
    """``met`` when the whole interval is at or below ``target``, ``missed`` when it is above, else ``undecided``."""
    return "met" if high <= target else "missed" if low > target else "undecided"


def table(results: dict) -> str:
    """A readable table of the results."""
    head = (f"{'workload':<8} {'method':<11} {'update (ms)':>11} {'x std [95% CI]':>22} {'epoch (ms)':>11} "
            f"{'x std':>6} {'upd/batch':>9} {'fb/upd':>6}")
    lines = [head, "-" * len(head)]
    for wname, w in results["workloads"].items():
        for mname, r in w["methods"].items():
            low, high = r["update_ratio_ci95"]
            ratio = f"{r['update_ratio']:.3f} [{low:.3f}, {high:.3f}]"
            lines.append(f"{wname:<8} {mname:<11} {1e3 * r['per_update_s']:>11.2f} {ratio:>22} "
                         f"{1e3 * r['per_epoch_s']:>11.1f} {r['epoch_ratio']:>6.3f} "
                         f"{r['updates_per_minibatch']:>9d} {r['passes_per_update']:>6.1f}")
    for wname, w in results["workloads"].items():
        lines.append(f"{wname}: {w['network']}, batch {tuple(w['batch_shape'])}, "
                     f"{w['batches_per_epoch']} minibatches per epoch")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.at_overhead",
        description="Time per parameter update and per data epoch of standard, IP, free-AT (K=3) and PGD-3 "
                    "training on the toy MLP and a small conv net; medians of interleaved repeats in one "
                    "process, ratios relative to standard training.")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="also write the results (medians, ratios, raw per-repeat epoch times) as "
                             "JSON to this file")
    parser.add_argument("--repeats", type=int, default=None, metavar="N",
                        help="timed epochs per method and workload, interleaved (the order rotates every "
                             "repeat); the median is reported (default 9, or 3 with --quick)")
    parser.add_argument("--batches", type=int, default=None, metavar="B",
                        help="minibatches per data epoch (default 4, or 2 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="a fast smoke run: fewer repeats and batches, conv batch 16 instead of 64")
    parser.add_argument("--workloads", default="mlp,conv",
                        help="comma-separated subset of 'mlp' (MLP, batch 4096 of 2-D points) and 'conv' "
                             "(small UNet, batch 64 of 1x16x16) (default: both)")
    parser.add_argument("--device", default="cpu", help="torch device to run on (default cpu)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch CPU threads (default: torch's own choice; 1 is steadier on a busy "
                             "machine)")
    args = parser.parse_args(argv)
    args.repeats = args.repeats if args.repeats is not None else (3 if args.quick else 9)
    args.batches = args.batches if args.batches is not None else (2 if args.quick else 4)
    if args.repeats < 1 or args.batches < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--repeats, --batches and --threads must be >= 1")
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = set(args.workloads) - {"mlp", "conv"}
    if unknown or not args.workloads:
        parser.error(f"--workloads: expected a subset of mlp,conv, got {sorted(unknown) or 'nothing'}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    conv_batch = 16 if args.quick else 64
    specs = {
        "mlp": lambda: (MLP(2, hidden=256, depth=3), "MLP(2, hidden=256, depth=3)", (4096, 2)),
        "conv": lambda: (*conv_network(1, 16), (conv_batch, 1, 16, 16)),
    }
    total = len(args.workloads) * args.repeats * 4
    config = {"repeats": args.repeats, "batches": args.batches, "quick": args.quick, "device": str(device),
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "free_at_update_target": FREE_AT_TARGET}
    results = {"config": config, "workloads": {}}
    with tqdm(total=total, desc="at_overhead", file=sys.stderr) as bar:
        for name in args.workloads:
            net, net_name, shape = specs[name]()
            results["workloads"][name] = bench_workload(name, net, net_name, shape, args.batches,
                                                        args.repeats, bar, device)
    free = f"free-at-{PAPER_REPLAY}"
    results["free_at_update_target"] = {
        w: target_verdict(*r["methods"][free]["update_ratio_ci95"], FREE_AT_TARGET)
        for w, r in results["workloads"].items()}
    print(table(results))
    print(f"free-AT per update <= {FREE_AT_TARGET}x standard (95% interval): {results['free_at_update_target']}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()

"""Train the toy MLP on a 2-D Gaussian mixture and compare its samples with the oracle's.

    python -m toy.train_toy [--steps 3000] [--mixture ring8] [--sampler ddim] [--sample-steps 50] [--json out.json]

Prints the W2 distance (exact optimal transport, POT ``emd2``) between samples (DDIM by default) and fresh samples
of the true mixture for: the trained model (EMA weights), the oracle denoiser with the same sampler and grid, a
moment-matched Gaussian oracle (the best unimodal model) and the untrained network; beside W2, the statistics that
see blur and mode balance (off-mode fraction, mode-occupancy TV, cross-entropy under the true density) and the
true-vs-true W2 floor, since W2 of a few thousand samples alone cannot rank close models (its sampling floor is
about as large as the differences between training methods).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import ot
import torch
from tqdm.auto import trange

from atdiff.checkpoint import seed_everything
from atdiff.losses import DenoisingLoss
from atdiff.metrics import mode_statistics
from atdiff.networks import MLP
from atdiff.precond import DiffusionModel
from atdiff.processes import VPDiscrete
from atdiff.samplers import REGISTRY, default_grid, sample, sampler_help
from atdiff.train import EMA, train_step
from theory.gaussian import GaussianMixture, log_prob, oracle_model, sample_data
from toy.cli import check_json_path
from toy.mixtures import MIXTURES, make_mixture, moment_matched_gaussian


def w2(x: torch.Tensor, y: torch.Tensor) -> float:
    """Exact W2 between two equal-size point clouds (uniform weights)."""
    cost = ot.dist(x.double().numpy(), y.double().numpy())
    return float(ot.emd2([], [], cost) ** 0.5)


def evaluate(x: torch.Tensor, mix: GaussianMixture, reference: torch.Tensor, process: VPDiscrete) -> dict[str, float]:
    """W2 to the reference samples, mode statistics and cross-entropy ``E_x[-log q(x)]`` under the true law.

    Non-finite samples are counted, never replaced by made-up numbers: with any of them every statistic is NaN."""
    bad = int((~torch.isfinite(x).all(1)).sum())
    if bad:
        nan = math.nan
        return {"w2": nan, "off_mode_fraction": nan, "mode_tv": nan, "cross_entropy": nan, "non_finite": bad}
    stats = mode_statistics(x, mix.weights, mix.means, mix.covs)
    ce = -log_prob(mix, process, x.double(), 0.0).mean().item()
    return {"w2": w2(x, reference), **stats, "cross_entropy": ce, "non_finite": 0}


def train(mix: GaussianMixture, process: VPDiscrete, args: argparse.Namespace, gen: torch.Generator):
    net = MLP(2, hidden=args.hidden, depth=args.depth)
    model = DiffusionModel(net, process)
    untrained = DiffusionModel(MLP(2, hidden=args.hidden, depth=args.depth), process)
    untrained.load_state_dict(model.state_dict())
    ema = EMA(model, decay=args.ema, warmup=True)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps, eta_min=args.lr * 0.05)
    loss = DenoisingLoss(process)
    bar = trange(args.steps, desc="train", disable=args.quiet)
    skipped = 0
    for _ in bar:
        x0 = sample_data(mix, args.batch, gen).float()
        out = train_step(model, x0, loss, opt, ema=ema, generator=gen)
        skipped += out["skipped"]
        sched.step()
        bar.set_postfix(loss=f"{out['loss']:.4f}", skipped=skipped, refresh=False)
    return ema.model, untrained, skipped


def run(args: argparse.Namespace) -> dict:
    seed_everything(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    mix = make_mixture(args.mixture)
    process = VPDiscrete(args.schedule, T=1000)
    start = time.perf_counter()
    trained, untrained, skipped = train(mix, process, args, gen)
    train_seconds = time.perf_counter() - start

    x_T = torch.randn(args.n_eval, 2, generator=gen)
    reference = sample_data(mix, args.n_eval, gen)
    models = {
        "trained (EMA)": trained,
        "oracle": oracle_model(mix, process),
        "gaussian oracle": oracle_model(moment_matched_gaussian(mix), process),
        "untrained": untrained,
    }
    results = {}
    with torch.no_grad():
        for name, model in models.items():
            x = sample(args.sampler, model, x_T, process, args.sample_steps, generator=gen).x
            results[name] = evaluate(x.float(), mix, reference, process)
    results["true samples"] = evaluate(sample_data(mix, args.n_eval, gen).float(), mix, reference, process)
    return {"config": vars(args), "train_seconds": train_seconds, "skipped_updates": skipped, "results": results}


def format_table(report: dict) -> str:
    cfg = report["config"]
    lines = [f"{cfg['mixture']}: {cfg['steps']} steps in {report['train_seconds']:.1f} s; {cfg['sampler']} with "
             f"{cfg['sample_steps']} steps, {cfg['n_eval']} samples each",
             f"{'model':<18}{'W2':>9}{'off-mode':>10}{'mode TV':>9}{'cross-ent':>11}"]
    for name, r in report["results"].items():
        lines.append(f"{name:<18}{r['w2']:>9.4f}{r['off_mode_fraction']:>10.4f}{r['mode_tv']:>9.4f}"
                     f"{r['cross_entropy']:>11.4f}")
    lines.append("'true samples' is a second draw from the mixture: its W2 is the floor of the estimator.")
    if report["skipped_updates"]:
        lines.append(f"{report['skipped_updates']} updates were skipped for a non-finite loss or gradient.")
    bad = {name: r["non_finite"] for name, r in report["results"].items() if r["non_finite"]}
    if bad:
        lines.append(f"non-finite samples (statistics NaN): {bad}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mixture", default="ring8", choices=sorted(MIXTURES), help="the 2-D data law")
    p.add_argument("--steps", type=int, default=3000, help="parameter updates")
    p.add_argument("--batch", type=int, default=1024, help="fresh mixture samples per update")
    p.add_argument("--hidden", type=int, default=128, help="MLP width")
    p.add_argument("--depth", type=int, default=3, help="MLP hidden layers")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (cosine-annealed to 5%%)")
    p.add_argument("--ema", type=float, default=0.995, help="EMA decay of the evaluated weights")
    p.add_argument("--schedule", default="cosine", choices=["linear", "cosine"], help="VP beta schedule (T=1000)")
    p.add_argument("--sampler", default="ddim", choices=sorted(REGISTRY), metavar="NAME",
                   help="sampler of every model (default ddim), one of:\n" + sampler_help())
    p.add_argument("--sample-steps", type=int, default=50, help="sampler steps on its default grid")
    p.add_argument("--n-eval", type=int, default=2000, help="samples per model for the statistics")
    p.add_argument("--seed", type=int, default=0, help="seed of everything (0 <= seed < 2**63)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for name in ("steps", "batch", "hidden", "depth", "sample_steps", "n_eval"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not (math.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr must be a finite number > 0, got {args.lr}")
    if not (0.0 <= args.ema <= 1.0):
        p.error(f"--ema must lie in [0, 1], got {args.ema}")
    if not 0 <= args.seed < 2**63:
        p.error(f"--seed must lie in [0, 2**63), got {args.seed}")
    try:  # the sampler's grid is checked before training, not after it
        default_grid(args.sampler, VPDiscrete(args.schedule, T=1000), args.sample_steps)
    except ValueError as err:
        p.error(f"--sample-steps {args.sample_steps} does not fit sampler {args.sampler!r}: {err}")
    check_json_path(p, args.json)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report = run(args)
    print(format_table(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()

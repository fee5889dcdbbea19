"""Train the toy MLP on a 2-D Gaussian mixture and compare its samples with the oracle's.

    python -m toy.train_toy [--steps 3000] [--mixture ring8] [--sampler ddim] [--sample-steps 50] [--json out.json]

Prints the W2 distance (exact optimal transport, POT ``emd2``) between samples (DDIM by default) and fresh samples
of the true mixture for: the trained model (EMA weights), the oracle denoiser with the same sampler and grid, a
moment-matched Gaussian oracle (the best unimodal model) and the untrained network; beside W2, the statistics that
see blur and mode balance (off-mode fraction, mode-occupancy TV, cross-entropy under the true density) and the
true-vs-true W2 floor, since W2 of a few thousand samples alone cannot rank close models (method.md section 8).
"""

from __future__ import annotations

import argparse
import json
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
from atdiff.samplers import REGISTRY, sample, sampler_help
from atdiff.train import EMA, train_step
from theory.gaussian import GaussianMixture, log_prob, oracle_model, sample_data
from toy.mixtures import MIXTURES, make_mixture, moment_matched_gaussian


def w2(x: torch.Tensor, y: torch.Tensor) -> float:
    """Exact W2 between two equal-size point clouds (uniform weights)."""
    cost = ot.dist(x.double().numpy(), y.double().numpy())
    return float(ot.emd2([], [], cost) ** 0.5)


def evaluate(x: torch.Tensor, mix: GaussianMixture, reference: torch.Tensor, process: VPDiscrete) -> dict[str, float]:
    """W2 to the reference samples, mode statistics and cross-entropy ``E_x[-log q(x)]`` under the true law."""
    stats = mode_statistics(x, mix.weights, mix.means, mix.covs)
    finite = torch.isfinite(x).all(1)
    ce = -log_prob(mix, process, x[finite].double(), 0.0).mean().item()
    return {"w2": w2(x.nan_to_num(1e6).clamp(-1e6, 1e6), reference), **stats, "cross_entropy": ce}


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
    for _ in bar:
        x0 = sample_data(mix, args.batch, gen).float()
        out = train_step(model, x0, loss, opt, ema=ema, generator=gen)
        sched.step()
        bar.set_postfix(loss=f"{out['loss']:.4f}", refresh=False)
    return ema.model, untrained


def run(args: argparse.Namespace) -> dict:
    seed_everything(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    mix = make_mixture(args.mixture)
    process = VPDiscrete(args.schedule, T=1000)
    start = time.perf_counter()
    trained, untrained = train(mix, process, args, gen)
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
    return {"config": vars(args), "train_seconds": train_seconds, "results": results}


def format_table(report: dict) -> str:
    cfg = report["config"]
    lines = [f"{cfg['mixture']}: {cfg['steps']} steps in {report['train_seconds']:.1f} s; {cfg['sampler']} with "
             f"{cfg['sample_steps']} steps, {cfg['n_eval']} samples each",
             f"{'model':<18}{'W2':>9}{'off-mode':>10}{'mode TV':>9}{'cross-ent':>11}"]
    for name, r in report["results"].items():
        lines.append(f"{name:<18}{r['w2']:>9.4f}{r['off_mode_fraction']:>10.4f}{r['mode_tv']:>9.4f}"
                     f"{r['cross_entropy']:>11.4f}")
    lines.append("'true samples' is a second draw from the mixture: its W2 is the floor of the estimator.")
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
    p.add_argument("--seed", type=int, default=0, help="seed of everything")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for name in ("steps", "batch", "hidden", "depth", "sample_steps", "n_eval"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
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

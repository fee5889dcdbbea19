"""Consistency models on a 2-D Gaussian mixture: CD, CT and their adversarial training (CM-AT).

    python -m toy.consistency_toy --method cd|ct|cd-at|ct-at [--seeds 3] [--quick] [--json out.json]

Trains a consistency function ``f(x, sigma) = c_skip x + c_out MLP(c_in x, sigma)`` (VE / EDM path, sigma in
[0.002, 80], Karras levels rho = 7) on ``ring8`` and reports, per seed and as mean and spread over seeds, the
one-step and two-step samples' W2 to fresh data (exact optimal transport, POT) and off-mode fraction
(``atdiff.metrics.mode_statistics``), beside the untrained model and the estimator's floor (a second data draw).

* ``cd``: consistency distillation from the exact denoiser of the mixture (the Bayes-optimal oracle) with a Heun
  teacher step, ``N = 18`` levels, target EMA ``mu = 0.95``;
* ``ct``: improved consistency training (pseudo-Huber, lognormal levels, ``1 / (sigma_{n+1} - sigma_n)``, the
  doubling ``N(k)`` from 10 to 160, stop-gradient target); ``--ct-variant ct`` gives the original CT curriculum;
* ``-at``: the same loss through ``atdiff.train.free_at_step`` with the CM-AT preset (``--at-preset``: ``paper``
  perturbs the student's input with the paper's ascent step and the detached equivariant target, ``K = 3``
  passes per minibatch; the number of parameter updates is the same as without AT).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import trange

from atdiff.checkpoint import seed_everything
from atdiff.consistency import CM_AT_PRESETS, cd_loss, chain_updates, cm_at_preset, ct_loss, ict_loss
from atdiff.metrics import mode_statistics
from atdiff.networks import MLP
from atdiff.precond import ConsistencyModel
from atdiff.processes import VE
from atdiff.samplers.consistency import consistency_grid, sample_consistency
from atdiff.train import EMA, free_at_step, train_step
from theory.gaussian import oracle_model, sample_data
from toy.cli import check_json_path
from toy.mixtures import MIXTURES, make_mixture
from toy.train_toy import w2

METHODS = ("cd", "ct", "cd-at", "ct-at")
SIGMA_DATA = 1.4  # per-coordinate RMS of ring8 (radius 2, std 0.15)


def make_loss(method: str, model: ConsistencyModel, process: VE, args: argparse.Namespace):
    """The loss of ``method`` (AT options from the preset applied to the loss), and the preset (or None)."""
    preset = cm_at_preset(args.at_preset) if method.endswith("-at") else None
    at = {} if preset is None else {"target_mode": preset["target_mode"], "perturb": preset["perturb"]}
    if method.startswith("cd"):
        teacher = oracle_model(make_mixture(args.mixture), process)
        return cd_loss(teacher, model, process, N=args.cd_levels, mu=0.95, solver="heun", **at), preset
    if args.ct_variant == "ict":
        return ict_loss(process, total_steps=args.steps, s0=10, s1=160, **at), preset
    return ct_loss(model, process, total_steps=args.steps, s0=2, s1=150, mu0=0.9, **at), preset


def _float_data(mix, n: int, gen: torch.Generator) -> torch.Tensor:
    return sample_data(mix, n, gen).float()


def train(method: str, seed: int, args: argparse.Namespace) -> tuple[ConsistencyModel, ConsistencyModel, dict]:
    """Train one model; returns (evaluation EMA model, untrained model, stats)."""
    seed_everything(seed)
    gen = torch.Generator().manual_seed(seed)
    mix = make_mixture(args.mixture)
    process = VE(0.002, 80.0)
    model = ConsistencyModel(MLP(2, hidden=args.hidden, depth=args.depth), sigma_data=SIGMA_DATA)
    untrained = ConsistencyModel(MLP(2, hidden=args.hidden, depth=args.depth), sigma_data=SIGMA_DATA)
    untrained.load_state_dict(model.state_dict())
    loss, preset = make_loss(method, model, process, args)
    ema = EMA(model, decay=args.ema, warmup=True)
    updater = chain_updates(ema, loss)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    replay = 1 if preset is None else preset["replay"]
    batches = math.ceil(args.steps / replay)
    bar = trange(batches, desc=f"{method} seed {seed}", disable=args.quiet)
    skipped, last = 0, math.nan
    for _ in bar:
        x0 = _float_data(mix, args.batch, gen)
        if preset is None:
            out = train_step(model, x0, loss, opt, ema=updater, generator=gen)
        else:
            out = free_at_step(model, x0, loss, opt, replay=replay, perturber=preset["perturber"], ema=updater,
                               generator=gen)
        skipped += out["skipped"]
        last = out["loss"]
        bar.set_postfix(loss=f"{last:.4g}", N=loss.curriculum.num_levels(), refresh=False)
    return ema.model, untrained, {"skipped": skipped, "updates": loss.curriculum.k, "final_loss": last}


def evaluate(model, mix, process: VE, args: argparse.Namespace, gen: torch.Generator) -> dict[str, float]:
    """One- and two-step W2 and off-mode fraction of ``model``'s samples."""
    out = {}
    grids = {"1": consistency_grid(process, 1), "2": torch.tensor([process.sigma_max, args.tau], dtype=torch.float64)}
    for steps, grid in grids.items():
        reference = sample_data(mix, args.n_eval, gen)
        x_T = process.sigma_max * torch.randn(args.n_eval, 2, generator=gen)
        with torch.no_grad():
            x = sample_consistency(model, x_T, process, grid, generator=gen).x.double()
        if not bool(torch.isfinite(x).all()):
            out.update({f"w2_{steps}": math.nan, f"off_mode_{steps}": math.nan})
            continue
        out[f"w2_{steps}"] = w2(x, reference)
        out[f"off_mode_{steps}"] = mode_statistics(x, mix.weights, mix.means, mix.covs)["off_mode_fraction"]
    return out


def summarise(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and sample standard deviation over seeds of every statistic."""
    keys = rows[0].keys()
    return {k: {"mean": statistics.fmean(r[k] for r in rows),
                "std": statistics.stdev([r[k] for r in rows]) if len(rows) > 1 else 0.0} for k in keys}


def run(args: argparse.Namespace) -> dict:
    mix = make_mixture(args.mixture)
    process = VE(0.002, 80.0)
    per_seed, untrained_rows, floor_rows, stats = [], [], [], []
    start = time.perf_counter()
    for seed in range(args.seed, args.seed + args.seeds):
        trained, untrained, info = train(args.method, seed, args)
        gen = torch.Generator().manual_seed(10_000 + seed)
        per_seed.append(evaluate(trained, mix, process, args, gen))
        untrained_rows.append(evaluate(untrained, mix, process, args, gen))
        floor = w2(sample_data(mix, args.n_eval, gen), sample_data(mix, args.n_eval, gen))
        floor_rows.append({"w2_1": floor, "w2_2": floor, "off_mode_1": 0.0, "off_mode_2": 0.0})
        floor_rows[-1]["off_mode_1"] = mode_statistics(sample_data(mix, args.n_eval, gen), mix.weights, mix.means,
                                                       mix.covs)["off_mode_fraction"]
        floor_rows[-1]["off_mode_2"] = floor_rows[-1]["off_mode_1"]
        stats.append(info)
    return {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "seconds": time.perf_counter() - start, "per_seed": per_seed, "train_stats": stats,
            "summary": {args.method: summarise(per_seed), "untrained": summarise(untrained_rows),
                        "true samples": summarise(floor_rows)}}


def format_table(report: dict) -> str:
    cfg = report["config"]
    lines = [f"{cfg['mixture']}, {cfg['seeds']} seed(s), {cfg['steps']} updates, {cfg['n_eval']} samples; "
             f"two-step tau = {cfg['tau']}; {report['seconds']:.0f} s",
             f"{'model':<14}{'W2 1-step':>18}{'W2 2-step':>18}{'off-mode 1':>18}{'off-mode 2':>18}"]
    for name, s in report["summary"].items():
        cells = "".join(f"{s[k]['mean']:>10.4f} ± {s[k]['std']:<5.3f}" for k in ("w2_1", "w2_2", "off_mode_1",
                                                                                 "off_mode_2"))
        lines.append(f"{name:<14}{cells}")
    lines.append("mean ± standard deviation over seeds; 'true samples' (a second data draw) is the W2 floor.")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--method", choices=METHODS, default="ct", help="cd, ct, or either with CM-AT (-at)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (seed, seed+1, ...)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--mixture", default="ring8", choices=sorted(MIXTURES), help="the 2-D data law")
    p.add_argument("--steps", type=int, default=3000, help="parameter updates per seed")
    p.add_argument("--batch", type=int, default=256, help="fresh mixture samples per minibatch")
    p.add_argument("--hidden", type=int, default=64, help="MLP width")
    p.add_argument("--depth", type=int, default=3, help="MLP hidden layers")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--ema", type=float, default=0.995, help="EMA decay of the evaluated weights")
    p.add_argument("--cd-levels", type=int, default=18, help="CD: number N of Karras levels")
    p.add_argument("--ct-variant", choices=("ict", "ct"), default="ict",
                   help="ct: improved CT (default) or the original CT curriculum with an EMA target")
    p.add_argument("--at-preset", choices=sorted(CM_AT_PRESETS), default="paper",
                   help="CM-AT preset of atdiff.consistency.cm_at_preset (the -at methods)")
    p.add_argument("--tau", type=float, default=0.8, help="the intermediate level of two-step sampling")
    p.add_argument("--n-eval", type=int, default=2000, help="samples per statistic")
    p.add_argument("--quick", action="store_true",
                   help="a short run (600 updates of 256 samples, width 64, 1000 samples)")
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest for these sizes)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.n_eval, args.hidden, args.batch = 600, 1000, 64, 256
    for name in ("seeds", "steps", "batch", "hidden", "depth", "n_eval", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.cd_levels < 2:
        p.error("--cd-levels must be >= 2")
    if not (math.isfinite(args.lr) and args.lr > 0):
        p.error(f"--lr must be a finite number > 0, got {args.lr}")
    if not 0.0 <= args.ema <= 1.0:
        p.error(f"--ema must lie in [0, 1], got {args.ema}")
    if not 0.002 < args.tau < 80.0:
        p.error(f"--tau must lie in (0.002, 80), got {args.tau}")
    check_json_path(p, args.json)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    report = run(args)
    print(format_table(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

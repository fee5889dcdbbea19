"""C11 (measurement): the cost of free AT per parameter update and per data epoch (Wang et al. 2025, Algorithm 1:
every pass of the minibatch also updates the weights, so the attack costs no extra backward).

Timed with :mod:`theory.timing` (the helper ``benchmarks/at_overhead.py`` uses too): interleaved rounds, the median
of paired per-round ratios with a bootstrap confidence interval.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from atdiff.processes import VPDiscrete
from theory.claims import Verdict, claim
from theory.claims.common import new_generator, round_value, single_thread
from theory.timing import interleaved_times, median_ratio_ci, repeat_call

__all__ = ["claim_c11"]


@claim("C11")
@single_thread
def claim_c11(*, quick: bool, seed: int, out: Path | None) -> Verdict:
    """C11: free AT costs about one standard step per parameter update and K per minibatch (data epoch); PGD-(K-1)
    costs about K per update. Toy MLP on 2-D points, one process, interleaved rounds."""
    from atdiff.losses import DenoisingLoss
    from atdiff.networks.mlp import MLP
    from atdiff.perturb import PAPER_TARGET_MODE, Perturber, paper_at
    from atdiff.precond import DiffusionModel
    from atdiff.train import free_at_step, train_step

    gen = new_generator(seed)
    replay = 3
    hidden, batch, repeats, budget = (64, 256, 25, 0.4) if quick else (128, 1024, 40, 5.0)
    torch.manual_seed(seed)
    process = VPDiscrete("linear")
    model = DiffusionModel(MLP(2, hidden=hidden, depth=3), process)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss = DenoisingLoss(process, target_mode=PAPER_TARGET_MODE)
    x0 = torch.randn(batch, 2, generator=gen)
    pert = paper_at()
    pgd = Perturber("pgd", norm="l2", budget="rms", radius=0.1, steps=replay - 1, step_size=0.1,
                    step_units="absolute", step_rule="l2", init="zero")
    # every block makes K parameter updates: K standard steps, one free-AT minibatch, K PGD-(K-1) steps
    fns = {
        "standard": repeat_call(lambda: train_step(model, x0, loss, opt, generator=gen), replay),
        "free": lambda: free_at_step(model, x0, loss, opt, replay=replay, perturber=pert, generator=gen),
        "pgd": repeat_call(lambda: train_step(model, x0, loss, opt, perturber=pgd, generator=gen), replay),
    }
    times = interleaved_times(fns, repeats, budget=budget)
    free, free_lo, free_hi = median_ratio_ci(times["free"], times["standard"], seed=seed)
    pgd, pgd_lo, pgd_hi = median_ratio_ci(times["pgd"], times["standard"], seed=seed)
    quantities = {
        "free_per_update_ratio": free,
        "free_per_update_ratio_ci95": [round_value(free_lo, 4), round_value(free_hi, 4)],
        "free_per_minibatch_ratio": replay * free,
        "pgd_per_update_ratio": pgd,
        "pgd_per_update_ratio_ci95": [round_value(pgd_lo, 4), round_value(pgd_hi, 4)],
        "median_ms_per_update": {k: 1000 * statistics.median(v) / replay for k, v in times.items()},
        "K": replay,
        "rounds": len(times["standard"]),
    }
    return Verdict(
        id="C11", kind="measurement", relation="free per-update ratio <= 1.2",
        statement="Free AT costs about 1x standard training per parameter update and K x per data epoch",
        quantities=quantities, holds=free <= 1.2, margin=1.2 - free,
        notes=f"MLP(2, hidden {hidden}, depth 3), batch {batch}, Adam, one torch thread, {len(times['standard'])} "
              f"interleaved rounds (at most {repeats}, time budget {budget:g} s, order rotating) of three blocks of "
              f"K = {replay} parameter updates each: {replay} train_step calls; one free_at_step(replay={replay}, "
              f"paper_at) minibatch; {replay} train_step calls with PGD ({replay - 1} l2 attack steps of 0.1 + 1 "
              "update each); the loss has the detached equivariant target. Ratios: median over rounds of block time "
              "/ standard block time of the same round, with a 95% bootstrap interval over rounds (theory.timing). "
              "Free AT makes K updates per minibatch, so per data epoch it costs K x free_per_update_ratio standard "
              "epochs.")

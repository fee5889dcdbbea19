"""TODO"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from atdiff.processes import VPDiscrete
from theory.claims import Verdict, claim
from theory.claims.common import (
    new_generator,
    single_thread,
)


def _interleaved_times(fns: dict[str, Callable[[], None]], repeats: int, budget: float = math.inf,
                       min_repeats: int = 5) -> dict[str, list[float]]:
    """Wall time of each function over interleaved rounds (after one warm-up call each): ``repeats`` rounds, or
    fewer (but at least ``min_repeats``) once ``budget`` seconds have passed."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    begin = time.perf_counter()
    for i in range(repeats):
        if i >= min_repeats and time.perf_counter() - begin > budget:
            break
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return times


def _repeat(fn: Callable[[], Any], n: int) -> Callable[[], None]:
    """A function calling ``fn`` ``n`` times."""

    def block() -> None:
        for _ in range(n):
            fn()

    return block


def paired_median_ratio(times: list[float], reference: list[float]) -> float:
    """Median over rounds of ``times[i] / reference[i]`` (a slow stretch of a shared machine hits both)."""
    return statistics.median(a / b for a, b in zip(times, reference, strict=True))


@claim("C11")
@single_thread
def claim_c11(*, quick: bool, seed: int, out: Path | None) -> Verdict:
    """C11: free AT costs about one standard step per parameter update and K per minibatch (data epoch); PGD-(K-1)
    costs about K per update. Toy MLP on 2-D points, one process, interleaved rounds, medians of paired ratios."""
    from atdiff.losses import DenoisingLoss
    from atdiff.networks.mlp import MLP
    from atdiff.perturb import paper_at
    from atdiff.train import free_at_step, train_step

    gen = new_generator(seed)
    replay = 3
    hidden, batch, repeats, budget = (64, 256, 25, 0.4) if quick else (128, 1024, 40, 5.0)
    torch.manual_seed(seed)
    model = MLP(2, hidden=hidden, depth=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss = DenoisingLoss(VPDiscrete("linear"))
    x0 = torch.randn(batch, 2, generator=gen)
    pert = paper_at(replay)
    # every block makes K parameter updates: K standard steps, one free-AT minibatch, K PGD-(K-1) steps
    fns = {
        "standard": _repeat(lambda: train_step(model, x0, loss, opt, generator=gen), replay),
        "free": lambda: free_at_step(model, x0, loss, opt, replay=replay, perturber=pert, generator=gen),
        "pgd": _repeat(lambda: train_step(model, x0, loss, opt, perturber=pert, generator=gen), replay),
    }
    times = _interleaved_times(fns, repeats, budget)
    per_update = paired_median_ratio(times["free"], times["standard"])
    pgd = paired_median_ratio(times["pgd"], times["standard"])
    quantities = {
        "free_per_update_ratio": per_update,
        "free_per_minibatch_ratio": replay * per_update,
        "pgd_per_update_ratio": pgd,
        "ratio_of_minimum_times": {"free_per_update": min(times["free"]) / min(times["standard"]),
                                   "pgd_per_update": min(times["pgd"]) / min(times["standard"])},
        "median_ms_per_update": {k: 1000 * statistics.median(v) / replay for k, v in times.items()},
        "spread_ms_per_update": {k: [1000 * min(v) / replay, 1000 * max(v) / replay] for k, v in times.items()},
        "K": replay,
        "rounds": len(times["standard"]),
        "torch_threads": torch.get_num_threads(),
    }
    return Verdict(
        id="C11", kind="measurement", relation="free per-update ratio <= 1.2",
        statement="Free AT costs about 1x standard training per parameter update and K x per data epoch",
        quantities=quantities, holds=per_update <= 1.2, margin=1.2 - per_update,
        notes=f"MLP(2, hidden {hidden}, depth 3), batch {batch}, Adam, one torch thread, {len(times['standard'])} "
              f"interleaved rounds (at most {repeats}, time budget {budget:g} s) of three blocks of K = {replay} "
              f"parameter updates each: {replay} train_step calls; one "
              f"free_at_step(replay={replay}, paper_at) minibatch; {replay} train_step calls with the same perturber "
              f"(PGD: {replay - 1} attack steps + 1 update each). Ratios: median over rounds of block time / standard "
              "block time of the same round (ratio of minimum times beside it). Free AT makes K updates per "
              "minibatch, so per data epoch it costs K x free_per_update_ratio standard epochs. The 2-core machine is "
              "shared: single timings vary by 2-5x under load; only ratios from one process mean anything.")

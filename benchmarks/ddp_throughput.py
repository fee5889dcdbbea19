"""One process against two gloo processes (DistributedDataParallel) on the same global batch.

The train step is :func:`atdiff.train.train_step` (``standard``) or :func:`atdiff.train.free_at_step` with
:func:`atdiff.perturb.paper_at` (``free-at``, ``K`` replays per minibatch, each one parameter update) on
:func:`atdiff.networks.unet.unet_small` (3 channels) under a cosine ``VPDiscrete`` process (T = 1000), Adam. Arms:

* ``1proc-1thread``  -- one process, the global batch ``B``, one torch thread;
* ``1proc-2threads`` -- the same with two torch threads (the same cores the two processes use);
* ``2proc-gloo``     -- two processes (``torch.multiprocessing`` spawn, gloo, one thread each), each with ``B / 2``
  rows of every global batch, the model wrapped in ``DistributedDataParallel`` (which averages the gradients).

Every arm trains its own copy of the same initial network on the same global batches, and draws its times and noise
as one record for the global batch (:func:`atdiff.distributed.global_draw`), so all arms take the same updates up to
float rounding. The two worker processes live for the whole run and wait for commands; the arms of both modes are
interleaved (the order rotates every repeat; a pass of one arm is ``steps`` minibatches) after an untimed warm-up
pass each. The 2-process time of a pass runs from a barrier to the later rank's end. Ratios are 2-process time over
1-process time, the median of the per-repeat paired ratios with a percentile-bootstrap interval
(:func:`theory.timing.median_ratio_ci`).

The all-reduce share: after each timed 2-process pass, the ranks time a standalone ``all_reduce`` of a buffer of
the gradient's size (median of 3); share = that time x updates per pass / pass time. DDP overlaps its bucketed
all-reduce with the backward pass, so this is an upper bound on the exposed communication per update.
"""

from __future__ import annotations

import os
import queue
import socket
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from atdiff.distributed import cleanup, global_draw, init_distributed
from atdiff.losses import DenoisingLoss
from atdiff.networks.unet import unet_small
from atdiff.perturb import PAPER_REPLAY, PAPER_TARGET_MODE, paper_at
from atdiff.precond import DiffusionModel
from atdiff.processes import VPDiscrete
from atdiff.train import free_at_step, train_step
from theory.timing import median_ratio_ci

__all__ = ["MODES", "ONE_PROCESS", "GlobalDrawLoss", "measure_gloo", "gloo_table"]

MODES = ("standard", "free-at")
ONE_PROCESS = {"1proc-1thread": 1, "1proc-2threads": 2}  # arm name -> torch threads
TWO_PROCESS = "2proc-gloo"
WORLD = 2


@dataclass(frozen=True)
class GlooConfig:
    """``size``: image side; ``batch``: the global batch (even); ``steps``: minibatches per timed pass."""

    size: int
    batch: int
    steps: int
    seed: int
    lr: float


class GlobalDrawLoss:
    """A loss whose ``draw`` returns this rank's slice of one record drawn for the global batch from its own
    generator (in the same state on every rank); everything else is the wrapped loss's."""

    def __init__(self, inner: Any, generator: torch.Generator, rank: int, world_size: int) -> None:
        self.inner, self.generator, self.rank, self.world_size = inner, generator, rank, world_size

    def draw(self, x0: Tensor, generator: torch.Generator | None = None):
        return global_draw(self.inner, x0, self.generator, self.rank, self.world_size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@dataclass
class Trainer:
    model: nn.Module  # the bare model (its parameters)
    net: nn.Module  # what the step calls: the model, or its DDP wrapper
    step: Callable[[nn.Module, Tensor, torch.optim.Optimizer, torch.Generator], object]
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    updates: int  # parameter updates per minibatch


def build_trainer(cfg: GlooConfig, mode: str, rank: int, world_size: int, device: torch.device) -> Trainer:
    """A fresh network (the same initial weights for every arm and rank), its optimizer and ``mode``'s step."""
    process = VPDiscrete("cosine", T=1000)
    torch.manual_seed(cfg.seed)
    model = DiffusionModel(unet_small(3, cfg.size), process).to(device).train()
    net = model if world_size == 1 else nn.parallel.DistributedDataParallel(model)
    draw_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    if mode == "standard":
        loss = GlobalDrawLoss(DenoisingLoss(process), draw_gen, rank, world_size)

        def step(m, x, o, g):
            return train_step(m, x, loss, o, generator=g)

        updates = 1
    else:
        at_loss = GlobalDrawLoss(DenoisingLoss(process, target_mode=PAPER_TARGET_MODE), draw_gen, rank, world_size)
        perturber = paper_at()

        def step(m, x, o, g):
            return free_at_step(m, x, at_loss, o, replay=PAPER_REPLAY, perturber=perturber, generator=g)

        updates = PAPER_REPLAY
    return Trainer(model, net, step, torch.optim.Adam(model.parameters(), lr=cfg.lr),
                   torch.Generator(device=device).manual_seed(cfg.seed + 2 + rank), updates)


def global_batches(cfg: GlooConfig) -> list[Tensor]:
    """The ``steps`` global minibatches ``(batch, 3, size, size)``, the same in every process."""
    gen = torch.Generator().manual_seed(cfg.seed)
    return [torch.randn(cfg.batch, 3, cfg.size, cfg.size, generator=gen) for _ in range(cfg.steps)]


def run_pass(trainer: Trainer, batches: list[Tensor]) -> float:
    """Wall time (s) of one pass of ``trainer`` over ``batches``."""
    start = time.perf_counter()
    for x in batches:
        trainer.step(trainer.net, x, trainer.optimizer, trainer.generator)
    return time.perf_counter() - start


def flat_parameters(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten().cpu() for p in model.parameters()])


def _allreduce_seconds(buffer: Tensor, calls: int = 3) -> float:
    """Median wall time of a standalone ``all_reduce`` of ``buffer`` (after a barrier)."""
    times = []
    for _ in range(calls):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(buffer)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _worker(rank: int, port: int, cfg: GlooConfig, commands: list[Any], results: Any) -> None:
    """One rank of the 2-process arm: build both trainers, then serve ``("run", mode)``, ``("params", mode)`` and
    ``("stop", None)`` from ``commands[rank]`` until stopped, answering on ``results``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    try:
        trainers = {mode: build_trainer(cfg, mode, info.rank, info.world_size, info.device) for mode in MODES}
        b = cfg.batch // info.world_size
        mine = [x[info.rank * b:(info.rank + 1) * b].contiguous() for x in global_batches(cfg)]
        buffer = torch.zeros(sum(p.numel() for p in trainers["standard"].model.parameters()))
        while True:
            command, mode = commands[rank].get()
            if command == "stop":
                break
            trainer = trainers[mode]
            if command == "run":
                dist.barrier()
                seconds = run_pass(trainer, mine)
                results.put((info.rank, info.world_size, seconds, _allreduce_seconds(buffer)))
            else:
                results.put((info.rank, info.world_size, flat_parameters(trainer.model)))
    finally:
        cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Workers:
    """The two spawned ranks, their command queues and the shared answer queue."""

    def __init__(self, cfg: GlooConfig) -> None:
        ctx = torch.multiprocessing.get_context("spawn")
        self.commands = [ctx.Queue() for _ in range(WORLD)]
        self.results = ctx.Queue()
        self.context = torch.multiprocessing.spawn(_worker, args=(_free_port(), cfg, self.commands, self.results),
                                                   nprocs=WORLD, join=False)

    def ask(self, command: str, mode: str | None) -> list[tuple]:
        """Send ``command`` to both ranks; their answers sorted by rank (a dead worker raises here)."""
        for q in self.commands:
            q.put((command, mode))
        answers = []
        while len(answers) < WORLD:
            try:
                answers.append(self.results.get(timeout=0.5))
            except queue.Empty:
                if self.context.join(timeout=0):  # raises if a worker failed
                    raise RuntimeError("gloo workers exited before answering") from None
        return sorted(answers, key=lambda a: a[0])

    def stop(self) -> None:
        for q in self.commands:
            q.put(("stop", None))
        self.context.join()


def _label(arm: str, mode: str) -> str:
    return f"{arm}/{mode}"


def measure_gloo(cfg: GlooConfig, repeats: int, *, level: float = 0.95, progress: bool = True,
                 one_process: Mapping[str, int] = ONE_PROCESS) -> tuple[dict, dict[str, dict[str, Tensor]]]:
    """Time the three arms of both modes, interleaved over ``repeats`` rounds (see the module docstring).

    Returns ``(summary, parameters)``: the JSON-able summary (per-update medians and samples, the ratios
    ``2proc-gloo / 1proc-1thread`` and ``2proc-gloo / 1proc-2threads`` per mode with their ``level`` intervals,
    the all-reduce share, the ranks that answered), and ``parameters[mode][name]``, the flat parameters ``(P,)``
    after all passes for every 1-process arm and for every rank (``"rank0"``, ``"rank1"``). ``one_process``: the
    1-process arms, name -> torch threads (a subset of :data:`ONE_PROCESS` makes a faster check).
    """
    if repeats < 1:
        raise ValueError(f"repeats: expected >= 1, got {repeats}")
    if not one_process or any(n < 1 for n in one_process.values()):
        raise ValueError(f"one_process: expected at least one arm, each with >= 1 thread, got {dict(one_process)}")
    if cfg.batch < WORLD or cfg.batch % WORLD:
        raise ValueError(f"batch: expected a positive multiple of {WORLD} (the global batch), got {cfg.batch}")
    if cfg.steps < 1 or cfg.size < 4 or cfg.size % 2:
        raise ValueError(f"steps: expected steps >= 1 and an even size >= 4, got {cfg.steps}, {cfg.size}")
    cpu = torch.device("cpu")
    threads = torch.get_num_threads()
    batches = global_batches(cfg)
    local = {(arm, mode): build_trainer(cfg, mode, 0, 1, cpu) for arm in one_process for mode in MODES}
    n_params = sum(p.numel() for p in local[next(iter(one_process)), "standard"].model.parameters())
    arms = [(arm, mode) for mode in MODES for arm in (*one_process, TWO_PROCESS)]
    times: dict[str, list[float]] = {_label(*a): [] for a in arms}
    comm: dict[str, list[float]] = {mode: [] for mode in MODES}
    seen: set[tuple[int, int]] = set()
    workers = _Workers(cfg)
    try:
        def timed(arm: str, mode: str) -> tuple[float, float | None]:
            if arm == TWO_PROCESS:
                answers = workers.ask("run", mode)
                seen.update((a[0], a[1]) for a in answers)
                return max(a[2] for a in answers), max(a[3] for a in answers)
            torch.set_num_threads(one_process[arm])
            return run_pass(local[arm, mode], batches), None

        for arm, mode in arms:  # warm-up, untimed
            timed(arm, mode)
        with tqdm(total=repeats * len(arms), desc="gloo 1 vs 2 processes", file=sys.stderr,
                  disable=not progress) as bar:
            for r in range(repeats):
                for arm, mode in arms[r % len(arms):] + arms[:r % len(arms)]:
                    bar.set_postfix_str(_label(arm, mode))
                    seconds, allreduce = timed(arm, mode)
                    times[_label(arm, mode)].append(seconds)
                    if allreduce is not None:
                        updates = cfg.steps * local[next(iter(one_process)), mode].updates
                        comm[mode].append(allreduce * updates / seconds)
                    bar.update(1)
        parameters = {mode: {arm: flat_parameters(local[arm, mode].model) for arm in one_process} for mode in MODES}
        for mode in MODES:
            for rank, _, flat in workers.ask("params", mode):
                parameters[mode][f"rank{rank}"] = flat
    finally:
        torch.set_num_threads(threads)
        workers.stop()
    summary: dict[str, Any] = {
        "network": f"unet_small(in_channels=3, image_size={cfg.size})", "parameters": n_params,
        "config": {**vars(cfg), "repeats": repeats, "world_size": WORLD}, "ranks": sorted(seen),
        "seconds_per_update": {}, "ratios": {}, "allreduce_share": {}}
    for mode in MODES:
        per_pass = cfg.steps * local[next(iter(one_process)), mode].updates
        summary["seconds_per_update"][mode] = {
            arm: {"median": statistics.median(times[_label(arm, mode)]) / per_pass,
                  "samples": [t / per_pass for t in times[_label(arm, mode)]]} for arm in (*one_process, TWO_PROCESS)}
        two = times[_label(TWO_PROCESS, mode)]
        summary["ratios"][mode] = {}
        for arm in one_process:
            one = times[_label(arm, mode)]
            med, low, high = median_ratio_ci(two, one, level=level)
            summary["ratios"][mode][f"{TWO_PROCESS} / {arm}"] = {
                "median": med, "ci_low": low, "ci_high": high, "level": level,
                "paired": [a / b for a, b in zip(two, one, strict=True)]}
        summary["allreduce_share"][mode] = {"median": statistics.median(comm[mode]), "samples": comm[mode]}
    return summary, parameters


def gloo_table(summary: dict) -> str:
    """The printed report of :func:`measure_gloo`."""
    c = summary["config"]
    lines = [f"gloo: {summary['network']} ({summary['parameters']:,} parameters), global batch {c['batch']} "
             f"({c['batch'] // c['world_size']} per rank in {TWO_PROCESS}), {c['steps']} minibatches per pass, "
             f"{c['repeats']} repeats, ranks {[r for r, _ in summary['ranks']]}",
             f"{'mode':<9} {'arm':<15} {'ms/update (median)':>19}"]
    for mode, arms in summary["seconds_per_update"].items():
        for arm, s in arms.items():
            lines.append(f"{mode:<9} {arm:<15} {1e3 * s['median']:>19.1f}")
    lines.append(f"{'mode':<9} {'ratio (2 processes / 1 process)':<33} {'median':>7}  CI")
    for mode, ratios in summary["ratios"].items():
        for key, r in ratios.items():
            lines.append(f"{mode:<9} {key:<33} {r['median']:>7.3f}  [{r['ci_low']:.3f}, {r['ci_high']:.3f}] "
                         f"({100 * r['level']:.0f}% bootstrap)")
    shares = ", ".join(f"{mode} {s['median']:.3f}" for mode, s in summary["allreduce_share"].items())
    lines.append(f"all-reduce share of a {TWO_PROCESS} update (standalone all-reduce of the gradient size, an upper "
                 f"bound: DDP overlaps it with backward): {shares}")
    return "\n".join(lines)

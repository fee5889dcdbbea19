"""Sampling in shards that gives the same images on any number of processes.

The sample indices ``0..num_samples-1`` are cut into global batches of a fixed ``batch_size``; batch ``b`` draws
all its randomness from its own generator seeded by ``(seed, b)``, and process ``rank`` of ``world_size`` takes
the batches ``b = rank, rank + world_size, ...``. So image ``i`` depends only on ``seed``, ``batch_size`` and
``i``: one process, two, or eight produce the same set, and :func:`merge_shards` restores the global order.
(``benchmarks.sample`` builds on this under ``torchrun``; rank 0 gathers and writes the ``.npz``.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from atdiff.validate import check_int

__all__ = ["Batch", "batch_plan", "batch_generator", "merge_shards"]


@dataclass(frozen=True)
class Batch:
    """Global batch ``index`` covering sample indices ``start .. stop-1``."""

    index: int
    start: int
    stop: int


def batch_plan(num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[Batch]:
    """The global batches that process ``rank`` of ``world_size`` samples (every ``world_size``-th one)."""
    num_samples = check_int(num_samples, "num_samples", minimum=1)
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    world_size = check_int(world_size, "world_size", minimum=1)
    rank = check_int(rank, "rank", minimum=0, maximum=world_size - 1)
    count = -(-num_samples // batch_size)
    return [Batch(b, b * batch_size, min((b + 1) * batch_size, num_samples)) for b in range(rank, count, world_size)]


def batch_generator(seed: int, batch_index: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded from ``(seed, batch_index)`` through NumPy's ``SeedSequence`` (independent
    streams for different batches, the same stream on every process and world size)."""
    state = np.random.SeedSequence([check_int(seed, "seed", minimum=0),
                                    check_int(batch_index, "batch_index", minimum=0)]).generate_state(2, np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 31 ^ int(state[1]))


def merge_shards(shards: Sequence[tuple[Sequence[Batch], np.ndarray]]) -> np.ndarray:
    """Concatenate per-process results ``(batches, arrays stacked in batch order)`` into global sample order."""
    pieces: dict[int, np.ndarray] = {}
    for batches, arrays in shards:
        sizes = [b.stop - b.start for b in batches]
        if sum(sizes) != len(arrays):
            raise ValueError(f"shards: a shard has {len(arrays)} rows but its batches cover {sum(sizes)}")
        if not batches:  # a process with no batch (more processes than batches)
            continue
        for b, part in zip(batches, np.split(arrays, np.cumsum(sizes)[:-1]), strict=True):
            if b.start in pieces:
                raise ValueError(f"shards: batch {b.index} appears twice")
            pieces[b.start] = part
    position = 0
    for start in sorted(pieces):
        if start != position:
            raise ValueError(f"shards: samples {position}..{start - 1} are missing")
        position += len(pieces[start])
    if not pieces:
        raise ValueError("shards: nothing to merge")
    return np.concatenate([pieces[s] for s in sorted(pieces)])

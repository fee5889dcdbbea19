"""A seeded, sharded, infinite minibatch stream over uint8 images, for single- and multi-process training.

Epoch ``e`` orders the ``N`` images by a permutation drawn from ``numpy.random.default_rng([seed, e])`` and
draws one horizontal-flip bit per position from the same generator; global batch ``k`` is positions
``k B .. (k+1) B - 1`` (the last ``N mod B`` positions of an epoch are dropped; the next epoch reshuffles). Rank
``r`` of ``W`` takes the ``r``-th contiguous slice of ``B / W`` positions, so the ranks' batches are disjoint,
their union is the one-process global batch (same images, same flips) and nothing depends on ``W`` but the
split. Images stay uint8 and become float32 in ``[-1, 1]`` one minibatch at a time.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from atdiff.data.readers import ImageShards, to_unit_range
from atdiff.validate import check_int

__all__ = ["ImageStream", "hflip"]


def hflip(images: np.ndarray, flip: np.ndarray) -> np.ndarray:
    """Mirror ``images[i]`` ``(B, C, H, W)`` left-right where ``flip[i]`` ``(B,)`` is True (a new array)."""
    out = np.array(images, copy=True)
    out[flip] = out[flip][..., ::-1]
    return out


class ImageStream:
    """Infinite iterator of ``(x, y)``: ``x`` float32 ``(B / world_size, C, H, W)`` in ``[-1, 1]``, ``y`` int64
    ``(B / world_size,)`` (or None without labels), this rank's share of each global batch of ``batch_size``.

    Args:
        images: uint8 ``(N, C, H, W)`` as a NumPy array (a memory map works), a CPU uint8 tensor, or
            :class:`~atdiff.data.ImageShards`; never copied as a whole.
        labels: ``(N,)`` integer class labels, or None.
        batch_size: the GLOBAL batch size ``B`` (fixed by the recipe whatever the number of processes);
            ``world_size`` must divide it and ``B <= N``.
        rank, world_size: this process's index and the number of processes.
        seed: the stream's seed; epoch ``e`` uses ``default_rng([seed, e])``.
        flip: mirror each image left-right with probability 1/2 (independently per position and epoch).

    ``state_dict()`` / ``load_state_dict()`` hold the position (epoch, batch within the epoch) and what
    defines the order (seed, N, B, flip); resuming yields exactly the batches an uninterrupted stream would,
    also under another ``world_size`` with the same global batch.
    """

    def __init__(self, images: Any, labels: Any, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, flip: bool = True) -> None:
        if isinstance(images, Tensor):
            if images.device.type != "cpu":
                raise ValueError("images: keep the uint8 data on the CPU (minibatches are moved by the caller)")
            images = images.numpy()
        if not isinstance(images, np.ndarray | ImageShards) or images.dtype != np.uint8 or len(images.shape) != 4:
            raise ValueError(f"images: expected uint8 (N, C, H, W), got {getattr(images, 'dtype', type(images))} "
                             f"{getattr(images, 'shape', '')}")
        self.images, self.n = images, len(images)
        self.world_size = check_int(world_size, "world_size", minimum=1)
        self.rank = check_int(rank, "rank", minimum=0, maximum=self.world_size - 1)
        self.batch_size = check_int(batch_size, "batch_size", minimum=1, maximum=self.n)
        if self.batch_size % self.world_size:
            raise ValueError(f"batch_size: {batch_size} is not divisible by world_size {world_size}")
        self.local_batch = self.batch_size // self.world_size
        self.seed = check_int(seed, "seed", minimum=0)
        if not isinstance(flip, bool):
            raise ValueError(f"flip: expected a bool, got {flip!r}")
        self.flip = flip
        if labels is not None:
            labels = torch.as_tensor(np.asarray(labels))
            if labels.shape != (self.n,) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
                raise ValueError(f"labels: expected {self.n} integer labels, got {labels.dtype} {tuple(labels.shape)}")
            labels = labels.to(torch.int64)
        self.labels = labels
        self.batches_per_epoch = self.n // self.batch_size
        self.epoch, self.step = 0, 0
        self._order: tuple[int, np.ndarray, np.ndarray] | None = None

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(permutation ``(N,)``, flip bits ``(N,)``) of ``epoch``, cached for the current epoch."""
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(self.n)
            flips = rng.random(self.n) < 0.5 if self.flip else np.zeros(self.n, dtype=bool)
            self._order = (epoch, perm, flips)
        return self._order[1], self._order[2]

    def global_indices(self, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(image indices ``(B,)``, flip bits ``(B,)``) of global batch ``step`` of ``epoch`` (all ranks)."""
        perm, flips = self._epoch_order(epoch)
        window = slice(step * self.batch_size, (step + 1) * self.batch_size)
        return perm[window], flips[window]

    def __iter__(self) -> ImageStream:
        return self

    def __next__(self) -> tuple[Tensor, Tensor | None]:
        idx, flips = self.global_indices(self.epoch, self.step)
        mine = slice(self.rank * self.local_batch, (self.rank + 1) * self.local_batch)
        idx, flips = idx[mine], flips[mine]
        self.step += 1
        if self.step == self.batches_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        raw = self.images.take(idx) if isinstance(self.images, ImageShards) else self.images[idx]
        x = to_unit_range(hflip(raw, flips) if flips.any() else raw)
        y = None if self.labels is None else self.labels[torch.from_numpy(idx)]
        return x, y

    def state_dict(self) -> dict[str, int | bool]:
        """The position and what defines the order (plain ints and bools: storable in a checkpoint)."""
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "n": self.n,
                "batch_size": self.batch_size, "flip": self.flip}

    def load_state_dict(self, state: dict[str, int | bool]) -> None:
        """Continue from ``state``; the data (N), global batch, seed and flip setting must be the saved ones."""
        for key in ("seed", "n", "batch_size", "flip"):
            if key not in state or state[key] != getattr(self, key):
                raise ValueError(f"state: the stream was saved with {key}={state.get(key)!r}, this one has "
                                 f"{getattr(self, key)!r}")
        epoch = check_int(state["epoch"], "state", minimum=0)
        step = check_int(state["step"], "state", minimum=0, maximum=self.batches_per_epoch - 1)
        self.epoch, self.step = epoch, step

"""Multi-process training helpers on ``torch.distributed``: start from ``torchrun``'s environment, print on rank 0,
all-gather tensors and objects, and draw one global training record that every rank slices (so that ``W`` processes
on a global batch ``B`` see the times and noise one process would).

Without a process group (plain ``python``), every helper acts as the single process of a world of one.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["DistInfo", "init_distributed", "is_distributed", "rank0_print", "all_gather_cat", "all_gather_objects",
           "gather_objects", "barrier", "broadcast_object", "global_draw", "cleanup"]


@dataclass(frozen=True)
class DistInfo:
    """This process: ``rank`` of ``world_size``, its ``local_rank`` on the node and its ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    """Whether a process group is initialised (with more than one process or not)."""
    return dist.is_available() and dist.is_initialized()


def init_distributed(device: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): backend ``nccl`` on CUDA (device ``cuda:LOCAL_RANK``),
    ``gloo`` on the CPU. Without ``WORLD_SIZE`` in the environment it returns a world of one and starts nothing.

    ``device``: ``"cpu"``, ``"cuda"`` or None (CUDA if available).
    """
    if device not in (None, "cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu', 'cuda' or None, got {device!r}")
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but CUDA is not available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if "WORLD_SIZE" in os.environ and not is_distributed():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": dev} if use_cuda else {}))
    if is_distributed():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world, local, dev)


def cleanup() -> None:
    """Leave the process group (if any)."""
    if is_distributed():
        dist.destroy_process_group()


def rank0_print(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only (flushed)."""
    if not is_distributed() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_cat(x: Tensor) -> Tensor:
    """Concatenate every rank's ``x`` ``(n_r, ...)`` along dim 0 in rank order (all ranks get the result);
    the ranks may hold different ``n_r``. Without a process group: ``x``."""
    if not is_distributed() or dist.get_world_size() == 1:
        return x
    x = x.contiguous()
    sizes = all_gather_objects(int(x.shape[0]))
    biggest = max(sizes)
    padded = x.new_zeros((biggest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj`` in rank order (all ranks get the list). Without a process group: ``[obj]``."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_objects(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's picklable ``obj`` in rank order on rank ``dst`` (None on the other ranks). Without a process
    group: ``[obj]``."""
    if not is_distributed():
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def global_draw(loss: Any, x_local: Tensor, generator: torch.Generator | None, rank: int, world_size: int):
    """This rank's slice of ONE training record drawn for the global batch.

    ``loss.draw`` (the protocol of :mod:`atdiff.losses`) is called for a batch of ``world_size * B`` (``x_local``
    ``(B, ...)``: only its shape, device and dtype are used) with a generator that holds the same state on every
    rank; rank ``r`` keeps rows ``r B .. (r + 1) B - 1`` of every per-sample field. Every rank's generator then
    advances alike, and the union of the ranks' records is the record one process draws for the global batch.
    """
    b = x_local.shape[0]
    shape = (world_size * b, *x_local.shape[1:])
    record = loss.draw(torch.empty(shape, device=x_local.device, dtype=x_local.dtype), generator)
    if world_size == 1:
        return record
    mine = slice(rank * b, (rank + 1) * b)
    return type(record)(*(None if f is None else f[mine] for f in record))

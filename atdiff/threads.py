"""Torch intra-op thread count, set for a block and restored after it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["one_thread"]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread inside the block, then restore the previous count (also on an exception).
    Small tensors (toy MLPs, 8 x 8 matrices, the digits classifier) run fastest on one thread: a second one only adds
    synchronisation, badly so on a busy 2-core host."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)

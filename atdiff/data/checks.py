"""Checks of what a data file holds: uint8 pixels in a known layout, integer labels in the class range."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["check_pixels", "check_labels"]


def check_pixels(data: Any, channels: int, size: int, arg: str, source: str) -> np.ndarray:
    """``data`` as uint8 images ``(N, C, H, W)`` from flat channel-major rows ``(N, C*H*W)``, NHWC or NCHW.

    A view whenever the layout allows (a memory map stays a memory map). Raises ``ValueError`` starting with
    ``arg`` and naming ``source`` for any dtype but uint8 (floats or wider integers would be scaled wrongly)
    or any other shape.
    """
    if not isinstance(data, np.ndarray):
        raise ValueError(f"{arg}: {source}: expected a NumPy array of pixels, got {type(data).__name__}")
    if data.dtype != np.uint8:
        raise ValueError(f"{arg}: {source}: pixels must be uint8 (0..255) as the format stores them, "
                         f"got dtype {data.dtype}")
    if data.ndim == 2 and data.shape[1] == channels * size * size:
        return data.reshape(-1, channels, size, size)
    if data.ndim == 4 and data.shape[1:] == (size, size, channels):
        return data.transpose(0, 3, 1, 2)
    if data.ndim == 4 and data.shape[1:] == (channels, size, size):
        return data
    raise ValueError(f"{arg}: {source}: expected rows of {channels * size * size} values or images of "
                     f"{size}x{size}x{channels}, got shape {data.shape}")


def check_labels(labels: Any, count: int, num_classes: int, arg: str, source: str, first: int = 0) -> np.ndarray:
    """``labels`` as int64 ``(count,)`` in ``0..num_classes-1`` (the file stores ``first..first+num_classes-1``).

    Raises ``ValueError`` starting with ``arg`` and naming ``source`` for a count other than ``count``, labels
    that are not one-dimensional, not integers (floats, booleans, strings) or outside the class range.
    """
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{arg}: {source}: labels must be one-dimensional, got shape {arr.shape}")
    if arr.dtype.kind not in "iu" or arr.dtype == np.bool_:
        if arr.size == 0 and arr.dtype == np.float64:  # np.asarray([]) is float64: an empty list is fine
            arr = arr.astype(np.int64)
        else:
            raise ValueError(f"{arg}: {source}: labels must be integers, got dtype {arr.dtype}")
    if arr.shape[0] != count:
        raise ValueError(f"{arg}: {source}: {arr.shape[0]} labels for {count} images")
    last = first + num_classes - 1
    if arr.size and (arr.min() < first or arr.max() > last):
        raise ValueError(f"{arg}: {source}: labels outside {first}..{last} (found {arr.min()}..{arr.max()})")
    return arr.astype(np.int64) - first

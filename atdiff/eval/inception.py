"""The standard FID Inception network, loaded from a local file only (nothing is ever downloaded).

Supported networks
------------------
* ``backend="torchscript"`` (default): the TorchScript port of the TensorFlow FID Inception graph that
  StyleGAN2-ADA and clean-fid use, ``inception-2015-12-05.pt``, loaded with ``torch.jit.load`` (no torchvision).
  Contract: ``net(images, return_features=True)`` with uint8 (or float in ``[0, 255]``) NCHW RGB images of any size
  (the network resizes to 299x299 itself) returns the 2048 pool features ``(N, 2048)``;
  ``net(images, no_output_bias=True)`` returns class probabilities ``(N, 1008)`` for the Inception Score (the
  original IS implementation's convention, which StyleGAN2-ADA follows). Any other TorchScript module whose
  ``forward(images)`` takes the same images and returns ``(N, d)`` features is accepted too (features only).
* ``backend="torch-fidelity"``: torch-fidelity's ``inception-v3-compat`` extractor with its weights file
  ``weights-inception-2015-12-05-6726825d.pth`` given as a local path; only when ``torch_fidelity`` imports.

The TorchScript file is at :data:`INCEPTION_URL`; fetch it once on a machine with internet access and pass its
path (``--inception PATH`` in ``benchmarks.evaluate``, or the environment variable ``ATDIFF_INCEPTION``).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from atdiff.validate import check_choice, check_int

__all__ = ["INCEPTION_URL", "TORCH_FIDELITY_URL", "INCEPTION_ENV", "resolve_inception_path", "load_inception",
           "check_pixel_images", "network_outputs"]

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
TORCH_FIDELITY_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                      "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_ENV = "ATDIFF_INCEPTION"
BACKENDS = ("torchscript", "torch-fidelity")


def resolve_inception_path(path: str | os.PathLike | None, backend: str = "torchscript") -> Path:
    """The local weights file: ``path`` or, when None, ``$ATDIFF_INCEPTION``; a clear error when it is absent."""
    check_choice(backend, BACKENDS, "backend")
    url = INCEPTION_URL if backend == "torchscript" else TORCH_FIDELITY_URL
    name = url.rsplit("/", 1)[1]
    path = path if path is not None else os.environ.get(INCEPTION_ENV)
    if path is None or not Path(path).is_file():
        where = "no path was given" if path is None else f"{path} does not exist"
        raise FileNotFoundError(
            f"path: the FID Inception weights file is needed and {where}. This library never downloads it: fetch "
            f"{name} once from {url} (e.g. with curl on a machine with internet access) and pass its path with "
            f"--inception PATH (python -m benchmarks.evaluate), path= (atdiff.eval.load_inception), or the "
            f"environment variable {INCEPTION_ENV}.")
    return Path(path)


def load_inception(path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                   backend: str = "torchscript") -> torch.nn.Module:
    """Load the FID Inception network from the local file ``path`` (or ``$ATDIFF_INCEPTION``), in eval mode."""
    path = resolve_inception_path(path, backend)
    if backend == "torch-fidelity":
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except Exception as err:  # torchvision, which torch-fidelity imports, may not load beside this torch
            raise ImportError(f"backend: 'torch-fidelity' needs the torch_fidelity package to import ({err}); "
                              "use backend 'torchscript' with the StyleGAN2-ADA TorchScript file instead") from err
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                          feature_extractor_weights_path=str(path))
        return net.to(device).eval()
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated in recent torch; this file exists only as one
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated", category=DeprecationWarning)
            net = torch.jit.load(str(path), map_location=device)
    except Exception as err:
        raise ValueError(f"path: {path} is not a loadable TorchScript file ({err}); expected {INCEPTION_URL}") from err
    return net.eval()


def check_pixel_images(images: Tensor, name: str = "images") -> Tensor:
    """Validate NCHW images in pixel units (uint8, or float in ``[0, 255]``) with 1 or 3 channels; grey images are
    repeated to RGB. Float images that look like ``[-1, 1]`` or ``[0, 1]`` are rejected."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"{name}: expected (N, C, H, W) images with C in (1, 3), got "
                         f"{tuple(getattr(images, 'shape', ())) or type(images).__name__}")
    if images.is_floating_point():
        lo, hi = float(images.min()), float(images.max())
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > 255:
            raise ValueError(f"{name}: float images must lie in [0, 255], got [{lo:.3g}, {hi:.3g}] "
                             "(convert model output in [-1, 1] with atdiff.eval.to_uint8)")
        if hi <= 1.0:
            raise ValueError(f"{name}: float images in [0, 1] look like unit range; the network expects [0, 255]")
    elif images.dtype != torch.uint8:
        raise ValueError(f"{name}: expected uint8 or float images, got {images.dtype}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def _accepts(net: torch.nn.Module, argument: str) -> bool:
    schema = getattr(getattr(net, "forward", None), "schema", None)
    return schema is not None and any(a.name == argument for a in schema.arguments)


@torch.no_grad()
def network_outputs(net: torch.nn.Module, images: Tensor, probs: bool = False, batch_size: int = 100,
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Pool features ``(N, d)`` (float64) and, if ``probs``, class probabilities ``(N, C)`` of pixel images
    ``images`` ``(N, C, H, W)`` (see :func:`check_pixel_images`), run in batches on the network's device."""
    images = check_pixel_images(images)
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    param = next(iter(net.parameters()), None)
    device = param.device if param is not None else images.device
    fidelity = type(net).__name__ == "FeatureExtractorInceptionV3"
    stylegan = _accepts(net, "return_features")
    if probs and not (fidelity or stylegan):
        raise ValueError("metrics: the Inception Score needs class probabilities, and this network only returns "
                         f"features (it lacks the return_features/no_output_bias arguments of {INCEPTION_URL})")
    feats, prob = [], []
    starts = range(0, images.shape[0], batch_size)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc="features", unit="batch")
    for start in starts:
        x = images[start:start + batch_size].to(device)
        if fidelity:
            f, logits = net(x.round().to(torch.uint8) if x.is_floating_point() else x)
            p = torch.softmax(logits.double(), 1) if probs else None
        elif stylegan:
            f = net(x, return_features=True)
            p = net(x, no_output_bias=True) if probs else None
        else:
            f, p = net(x), None
        if f.ndim != 2 or f.shape[0] != x.shape[0]:
            raise ValueError(f"net: expected (N, d) features, got shape {tuple(f.shape)}")
        feats.append(f.double().cpu())
        if p is not None:
            prob.append(p.double().cpu())
    return torch.cat(feats).numpy(), (torch.cat(prob).numpy() if probs else None)

"""Improved precision and recall (Kynkaanniemi et al. 2019).

Each real feature vector gets a ball whose radius is the distance to its ``k``-th nearest other real vector
(``k = 3`` by default); the union of the balls estimates the real manifold. Precision is the fraction of generated
vectors inside that manifold; recall is the same with the roles swapped (balls around the generated vectors,
fraction of real vectors inside). Distances are computed in row blocks of ``batch_size`` so memory stays
``O(batch_size * n)``; the inputs' dtype and device are used (float64 numpy inputs run in float64 on the CPU).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from atdiff.validate import check_int

__all__ = ["knn_radii", "coverage_fraction", "precision_recall"]


def _as_tensor(x: np.ndarray | Tensor) -> Tensor:
    return x if isinstance(x, Tensor) else torch.from_numpy(np.asarray(x, np.float64))


def _block_sq_dist(a: Tensor, b: Tensor) -> Tensor:
    """Squared Euclidean distances ``(len(a), len(b))`` via the Gram expansion, clamped at zero."""
    return ((a * a).sum(1, keepdim=True) - 2.0 * a @ b.T + (b * b).sum(1)[None]).clamp_min(0)


def knn_radii(features: np.ndarray | Tensor, k: int = 3, batch_size: int = 1024) -> Tensor:
    """Distance of each row of ``features`` ``(n, d)`` to its ``k``-th nearest other row; returns ``(n,)``."""
    f = _as_tensor(features)
    k = check_int(k, "k", minimum=1, maximum=f.shape[0] - 1)
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    out = []
    for start in range(0, f.shape[0], batch_size):
        d2 = _block_sq_dist(f[start:start + batch_size], f)
        rows = torch.arange(d2.shape[0], device=f.device)
        d2[rows, rows + start] = float("inf")  # exclude the point itself
        out.append(d2.kthvalue(k, dim=1).values.sqrt())
    return torch.cat(out)


def coverage_fraction(manifold: np.ndarray | Tensor, radii: Tensor, queries: np.ndarray | Tensor,
                      batch_size: int = 1024) -> float:
    """Fraction of ``queries`` ``(m, d)`` within distance ``radii[i]`` of some ``manifold[i]`` (``(n, d)``)."""
    man, q = _as_tensor(manifold), _as_tensor(queries)
    r2 = (radii.to(man.dtype) ** 2)[None]
    inside = 0
    for start in range(0, q.shape[0], batch_size):
        inside += int((_block_sq_dist(q[start:start + batch_size], man) <= r2).any(1).sum())
    return inside / q.shape[0]


def precision_recall(real: np.ndarray | Tensor, fake: np.ndarray | Tensor, k: int = 3,
                     batch_size: int = 1024) -> tuple[float, float]:
    """(precision, recall) of ``fake`` ``(m, d)`` against ``real`` ``(n, d)`` with ``k``-NN manifolds."""
    real, fake = _as_tensor(real), _as_tensor(fake)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"real, fake: expected (n, d) features of equal d, got {tuple(real.shape)}, "
                         f"{tuple(fake.shape)}")
    fake = fake.to(real)
    precision = coverage_fraction(real, knn_radii(real, k, batch_size), fake, batch_size)
    recall = coverage_fraction(fake, knn_radii(fake, k, batch_size), real, batch_size)
    return precision, recall

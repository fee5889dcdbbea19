"""Sample-quality statistics.

For toy mixtures W2 of a few thousand samples alone cannot rank methods (its sampling floor is as large as most
differences between them), so report beside it the off-mode fraction,
the total variation between mode occupancies and the true weights, and the cross-entropy under the true density.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["mahalanobis_sq", "mode_statistics"]


def mahalanobis_sq(x: Tensor, means: Tensor, covs: Tensor) -> Tensor:
    """Squared Mahalanobis distance of every sample to every component.

    Shapes: ``x`` ``(n, d)``, ``means`` ``(K, d)``, ``covs`` ``(K, d, d)``. Returns ``(n, K)``.
    """
    if x.ndim != 2 or means.ndim != 2 or covs.ndim != 3 or x.shape[1] != means.shape[1]:
        raise ValueError(f"x, means, covs: expected (n, d), (K, d), (K, d, d); got {tuple(x.shape)}, "
                         f"{tuple(means.shape)}, {tuple(covs.shape)}")
    chol = torch.linalg.cholesky(covs.to(x.dtype))                      # (K, d, d)
    diff = (x[None] - means.to(x.dtype)[:, None]).transpose(1, 2)        # (K, d, n)
    z = torch.linalg.solve_triangular(chol, diff, upper=False)           # (K, d, n)
    return (z**2).sum(1).T


def mode_statistics(x: Tensor, weights: Tensor, means: Tensor, covs: Tensor, n_std: float = 3.0
                    ) -> dict[str, float]:
    """Off-mode fraction and mode-occupancy total variation of samples from a model of a Gaussian mixture.

    A sample is *off-mode* when its Mahalanobis distance to every component exceeds ``n_std`` (the
    ``n_std``-sigma ellipsoid of each mode); the others are assigned to the nearest component (Mahalanobis),
    and ``mode_tv = 0.5 * sum_k |occupancy_k - weight_k|`` over the on-mode samples.
    Shapes: ``x`` ``(n, d)``, ``weights`` ``(K,)``, ``means`` ``(K, d)``, ``covs`` ``(K, d, d)``.
    """
    if not n_std > 0:
        raise ValueError(f"n_std: expected > 0, got {n_std}")
    d2 = mahalanobis_sq(x.double(), means.double(), covs.double())
    nearest = d2.min(1)
    on = nearest.values <= n_std**2
    counts = torch.bincount(nearest.indices[on], minlength=means.shape[0]).double()
    occupancy = counts / counts.sum().clamp_min(1)
    return {
        "off_mode_fraction": float(1 - on.double().mean()),
        "mode_tv": float(0.5 * (occupancy - weights.double().to(occupancy.device)).abs().sum()),
    }

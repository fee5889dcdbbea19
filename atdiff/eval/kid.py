"""Kernel Inception Distance (Binkowski et al. 2018): the unbiased estimate of the squared maximum mean
discrepancy with the cubic polynomial kernel ``k(x, y) = (x . y / d + 1)^3``, averaged over random subsets.

Conventions follow StyleGAN2-ADA / torch-fidelity: ``num_subsets`` subsets of ``min(n_x, n_y, max_subset_size)``
rows drawn without replacement (independently per subset) from each set; the reported numbers are the mean and the
standard deviation of the per-subset estimates. Each subset estimate is unbiased for the population MMD^2, so their
mean is too (it can be negative when the distributions are close). When both sets have at most ``max_subset_size``
rows every subset is the whole set and the std is 0: it measures the spread over subsets, not the sampling error;
pass a smaller ``max_subset_size`` (e.g. half the smaller set) to see a spread on small sets.
"""

from __future__ import annotations

import numpy as np

from atdiff.validate import check_int

__all__ = ["polynomial_kernel", "mmd2_unbiased", "kernel_inception_distance"]


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``(x y^T / d + 1)^3`` for ``x`` ``(n, d)``, ``y`` ``(m, d)``; returns ``(n, m)`` float64."""
    k = np.asarray(x, np.float64) @ np.asarray(y, np.float64).T
    k /= x.shape[1]
    k += 1.0
    return k * k * k


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 U-statistic between ``x`` ``(m, d)`` and ``y`` ``(m', d)`` with the cubic kernel:
    within-set kernel means without the diagonal, cross mean over all pairs."""
    m, mp = x.shape[0], y.shape[0]
    if m < 2 or mp < 2:
        raise ValueError(f"x, y: need at least 2 rows each, got {m} and {mp}")
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (mp * (mp - 1))
    return float(within_x + within_y - 2.0 * kxy.mean())


def kernel_inception_distance(x: np.ndarray, y: np.ndarray, num_subsets: int = 100, max_subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID between feature sets ``x`` ``(n_x, d)`` and ``y`` ``(n_y, d)``: (mean, std) of :func:`mmd2_unbiased`
    over ``num_subsets`` random subsets of ``min(n_x, n_y, max_subset_size)`` rows each (drawn with ``seed``)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x, y: expected (n, d) feature arrays of equal d, got {x.shape} and {y.shape}")
    num_subsets = check_int(num_subsets, "num_subsets", minimum=1)
    max_subset_size = check_int(max_subset_size, "max_subset_size", minimum=2)
    m = min(x.shape[0], y.shape[0], max_subset_size)
    rng = np.random.default_rng(seed)
    values = np.array([mmd2_unbiased(x[rng.choice(x.shape[0], m, replace=False)],
                                     y[rng.choice(y.shape[0], m, replace=False)]) for _ in range(num_subsets)])
    return float(values.mean()), float(values.std())

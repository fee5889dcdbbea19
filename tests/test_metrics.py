import math

import torch
from scipy.stats import chi2

from atdiff.metrics import mahalanobis_sq, mode_statistics


def test_mahalanobis_matches_explicit_inverse():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    means = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    a = torch.randn(2, 3, 3, generator=gen, dtype=torch.float64)
    covs = a @ a.transpose(1, 2) + 0.5 * torch.eye(3, dtype=torch.float64)
    got = mahalanobis_sq(x, means, covs)
    for k in range(2):
        r = x - means[k]
        want = ((r @ torch.linalg.inv(covs[k])) * r).sum(1)
        torch.testing.assert_close(got[:, k], want)


def test_mode_statistics_of_true_samples_and_of_a_blurred_model():
    gen = torch.Generator().manual_seed(1)
    weights = torch.tensor([0.7, 0.3], dtype=torch.float64)
    means = torch.tensor([[-4.0, 0.0], [4.0, 0.0]], dtype=torch.float64)
    covs = 0.25 * torch.eye(2, dtype=torch.float64).expand(2, 2, 2)
    n = 40_000
    comp = (torch.rand(n, generator=gen) < 0.3).long()
    x = means[comp] + 0.5 * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    stats = mode_statistics(x, weights, means, covs)
    p_off = chi2.sf(9.0, df=2)  # one mode's 3-sigma ellipsoid in 2-D; the other mode is far away
    assert abs(stats["off_mode_fraction"] - p_off) < 5 * math.sqrt(p_off / n)
    assert stats["mode_tv"] < 0.01
    # a model that blurs every mode 2x and balances the weights is seen by both statistics
    comp = (torch.rand(n, generator=gen) < 0.5).long()
    blurred = means[comp] + 1.0 * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    bad = mode_statistics(blurred, weights, means, covs)
    assert abs(bad["off_mode_fraction"] - chi2.sf(9.0 / 4, df=2)) < 0.01
    assert abs(bad["mode_tv"] - 0.2) < 0.02

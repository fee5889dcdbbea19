"""Frechet distance: equals the closed-form W2^2 between the fitted Gaussians (POT, scipy), handles singular
covariances, converges at the stated rates, and its statistics round-trip through .npz."""

import numpy as np
import ot
import pytest
import scipy.linalg

from atdiff.eval.frechet import GaussianStats, fit_gaussian, frechet_distance, sqrtm_psd


def _random_spd(rng, d, scale=1.0):
    a = rng.standard_normal((d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


def test_equals_bures_wasserstein_of_fitted_gaussians():
    rng = np.random.default_rng(0)
    d = 16
    x = rng.standard_normal((500, d)) @ np.linalg.cholesky(_random_spd(rng, d)).T + 1.0
    y = rng.standard_normal((700, d)) @ np.linalg.cholesky(_random_spd(rng, d, 2.0)).T
    a, b = fit_gaussian(x), fit_gaussian(y)
    ours = frechet_distance(a, b)
    w2 = float(ot.gaussian.bures_wasserstein_distance(a.mu, b.mu, a.sigma, b.sigma)) ** 2
    # the textbook form with scipy's general (Schur) square root of the non-symmetric product
    cross = scipy.linalg.sqrtm(a.sigma @ b.sigma).real
    textbook = float(np.sum((a.mu - b.mu) ** 2) + np.trace(a.sigma + b.sigma - 2 * cross))
    assert ours == pytest.approx(w2, rel=1e-9)
    assert ours == pytest.approx(textbook, rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-10)


def test_singular_covariances_fewer_samples_than_dimensions():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((10, 40)), rng.standard_normal((12, 40)) * 1.5   # rank 9 and 11 covariances
    a, b = fit_gaussian(x), fit_gaussian(y)
    assert np.linalg.matrix_rank(a.sigma) == 9
    # independent form from the data factors S = L L^T, L = centred rows / sqrt(n - 1):
    # tr (S_1 S_2)^{1/2} is the nuclear norm of L_1^T L_2 (POT's sqrtm returns NaN on these singular matrices)
    l1 = (x - x.mean(0)).T / np.sqrt(len(x) - 1)
    l2 = (y - y.mean(0)).T / np.sqrt(len(y) - 1)
    nuclear = np.linalg.svd(l1.T @ l2, compute_uv=False).sum()
    closed = float(np.sum((a.mu - b.mu) ** 2) + np.trace(a.sigma) + np.trace(b.sigma) - 2 * nuclear)
    assert frechet_distance(a, b) == pytest.approx(closed, rel=1e-9)
    root = sqrtm_psd(a.sigma)
    np.testing.assert_allclose(root @ root, a.sigma, atol=1e-10)


def test_convergence_rates_for_known_gaussians():
    """Distinct Gaussians: the error's spread ~ n^{-1/2} and its mean (bias) is below that; equal Gaussians: the
    estimate itself ~ 1/n (the rates in the docstring of frechet_distance)."""
    rng = np.random.default_rng(2)
    d = 4
    mu_q, cov_q = np.array([0.5, -0.3, 0.2, 0.0]), np.diag([1.5, 0.7, 1.0, 1.2])
    truth = frechet_distance(GaussianStats(np.zeros(d), np.eye(d)), GaussianStats(mu_q, cov_q))
    assert truth == pytest.approx(float(ot.gaussian.bures_wasserstein_distance(
        np.zeros(d), mu_q, np.eye(d), cov_q)) ** 2, rel=1e-10)
    ns, reps = np.array([500, 2000, 8000]), 120
    spread, bias, same = [], [], []
    chol_q = np.linalg.cholesky(cov_q)
    for n in ns:
        err, eq = [], []
        for _ in range(reps):
            p = fit_gaussian(rng.standard_normal((n, d)))
            q = fit_gaussian(rng.standard_normal((n, d)) @ chol_q.T + mu_q)
            err.append(frechet_distance(p, q) - truth)
            eq.append(frechet_distance(p, fit_gaussian(rng.standard_normal((n, d)))))
        spread.append(np.std(err))
        bias.append(np.mean(err))
        same.append(np.mean(eq))
    slope_distinct = np.polyfit(np.log(ns), np.log(spread), 1)[0]
    slope_equal = np.polyfit(np.log(ns), np.log(same), 1)[0]
    print(f"spread {spread} slope {slope_distinct:.3f}; bias {bias}; equal-case mean {same} slope {slope_equal:.3f}")
    assert -0.62 < slope_distinct < -0.38
    assert -1.15 < slope_equal < -0.85
    assert all(abs(b) < 4 * s / np.sqrt(reps) + 2 * e for b, s, e in zip(bias, spread, same, strict=True))
    assert spread[-1] < 0.05 * truth


def test_stats_npz_round_trip_and_adm_keys(tmp_path):
    rng = np.random.default_rng(3)
    s = fit_gaussian(rng.standard_normal((50, 5)))
    s.save(tmp_path / "s.npz")
    back = GaussianStats.load(tmp_path / "s.npz")
    np.testing.assert_array_equal(back.mu, s.mu)
    np.testing.assert_array_equal(back.sigma, s.sigma)
    assert back.n == 50
    # an ADM reference batch: float32 mu/sigma beside arr_0 images and no n
    np.savez(tmp_path / "adm.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=s.mu.astype(np.float32),
             sigma=s.sigma.astype(np.float32))
    adm = GaussianStats.load(tmp_path / "adm.npz")
    assert adm.mu.dtype == np.float64 and adm.n == 0
    np.testing.assert_allclose(adm.sigma, s.sigma, rtol=1e-6)
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"^path: .*no 'mu' and 'sigma'"):
        GaussianStats.load(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match=r"^sigma: "):
        GaussianStats(np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match=r"^features: "):
        fit_gaussian(np.zeros((1, 3)))

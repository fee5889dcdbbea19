"""KID is unbiased for the population MMD^2 (closed form from Gaussian moments), IS matches its closed forms,
improved precision/recall matches a brute-force computation and the manifold picture."""

import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from atdiff.eval.inception_score import inception_score, softmax
from atdiff.eval.kid import kernel_inception_distance, mmd2_unbiased, polynomial_kernel
from atdiff.eval.precision_recall import knn_radii, precision_recall


def _moments(m, s):
    """First three moment tensors of N(m, s): E x, E x x^T, E x (x) x (x) x."""
    m2 = s + np.outer(m, m)
    m3 = (np.einsum("i,j,k->ijk", m, m, m) + np.einsum("ij,k->ijk", s, m) + np.einsum("ik,j->ijk", s, m)
          + np.einsum("jk,i->ijk", s, m))
    return m, m2, m3


def population_mmd2(m1, s1, m2, s2):
    """MMD^2 of two Gaussians for k(x, y) = (x.y/d + 1)^3 = sum_j C(3, j) (x.y)^j / d^j: the kernel's feature map
    stacks the moment tensors, so MMD^2 = sum_j C(3, j) / d^j |M_j(P) - M_j(Q)|^2 (no sampling involved)."""
    d = len(m1)
    return sum(math.comb(3, j) / d**j * np.sum((a - b) ** 2)
               for j, (a, b) in enumerate(zip(_moments(m1, s1), _moments(m2, s2), strict=True), start=1))


def test_kid_is_unbiased_for_the_population_mmd2():
    rng = np.random.default_rng(0)
    d = 3
    m1, s1 = np.zeros(d), np.eye(d)
    m2, s2 = np.array([0.3, 0.0, -0.2]), np.diag([1.4, 0.8, 1.0])
    truth = population_mmd2(m1, s1, m2, s2)
    c2 = np.linalg.cholesky(s2)
    m, reps = 10, 6000
    unbiased, biased = [], []
    for _ in range(reps):
        x = rng.standard_normal((m, d))
        y = rng.standard_normal((m, d)) @ c2.T + m2
        unbiased.append(mmd2_unbiased(x, y))
        biased.append(polynomial_kernel(x, x).mean() + polynomial_kernel(y, y).mean()
                      - 2 * polynomial_kernel(x, y).mean())
    se = np.std(unbiased) / np.sqrt(reps)
    print(f"population {truth:.4f}; unbiased {np.mean(unbiased):.4f} +- {se:.4f}; biased {np.mean(biased):.4f}")
    assert abs(np.mean(unbiased) - truth) < 4 * se
    assert abs(np.mean(biased) - truth) > 10 * se  # the V-statistic's O(1/m) bias is visible at this precision
    # the subset estimator on two large pools: an incomplete U-statistic, unbiased as well
    x = rng.standard_normal((20000, d))
    y = rng.standard_normal((20000, d)) @ c2.T + m2
    mean, std = kernel_inception_distance(x, y, num_subsets=400, max_subset_size=50, seed=1)
    assert abs(mean - truth) < 4 * std / np.sqrt(400) + 0.01 * truth
    assert std > 0


def test_kid_of_equal_sets_is_near_zero_and_checks_input():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((400, 8)), rng.standard_normal((400, 8))
    mean, std = kernel_inception_distance(x, y, num_subsets=50, max_subset_size=100)
    assert abs(mean) < 3 * std / np.sqrt(50) + 1e-3
    with pytest.raises(ValueError, match=r"^x, y: "):
        kernel_inception_distance(x, y[:, :4])
    with pytest.raises(ValueError, match=r"^num_subsets: "):
        kernel_inception_distance(x, y, num_subsets=0)


def test_inception_score_closed_forms():
    c, n = 7, 70
    one_hot = np.eye(c)[np.arange(n) % c]
    assert inception_score(one_hot, splits=1)[0] == pytest.approx(c, rel=1e-12)   # confident and diverse: C
    mean, std = inception_score(one_hot, splits=10)
    assert mean == pytest.approx(c) and std == pytest.approx(0.0, abs=1e-12)
    same = np.tile(softmax(np.random.default_rng(0).standard_normal((1, c))), (n, 1))
    assert inception_score(same, splits=1)[0] == pytest.approx(1.0, rel=1e-12)     # no information: 1
    # two equiprobable confident-ish rows p = (a, 1 - a) and (1 - a, a): IS = exp(log 2 - H(a))
    a = 0.8
    rows = np.array([[a, 1 - a], [1 - a, a]] * 5)
    h = -(a * np.log(a) + (1 - a) * np.log(1 - a))
    assert inception_score(rows, splits=1)[0] == pytest.approx(np.exp(np.log(2) - h), rel=1e-12)
    with pytest.raises(ValueError, match=r"^probs: "):
        inception_score(np.full((4, 3), 0.5))


def _brute_force_pr(real, fake, k):
    def radii(a):
        d = cdist(a, a)
        np.fill_diagonal(d, np.inf)
        return np.sort(d, axis=1)[:, k - 1]

    precision = np.mean((cdist(fake, real) <= radii(real)[None]).any(1))
    recall = np.mean((cdist(real, fake) <= radii(fake)[None]).any(1))
    return precision, recall


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_brute_force_in_any_block_size(k):
    rng = np.random.default_rng(k)
    real = rng.standard_normal((300, 6))
    fake = rng.standard_normal((250, 6)) * 0.8 + 0.6
    expected = _brute_force_pr(real, fake, k)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    for batch in (7, 64, 1000):
        assert precision_recall(real, fake, k, batch_size=batch) == pytest.approx(expected, abs=1e-12)
    d = cdist(real, real)
    np.fill_diagonal(d, np.inf)
    np.testing.assert_allclose(knn_radii(real, k, 13).numpy(), np.sort(d, 1)[:, k - 1], rtol=1e-10)


def test_precision_recall_sees_a_dropped_mode():
    """Real: two far-apart clusters of equal weight; fake: only one of them -> precision as high as for a matching
    sample (k-NN balls miss some tail points: ~0.93 at k = 3 here), recall ~ 1/2."""
    rng = np.random.default_rng(5)
    centres = np.array([[0.0] * 4, [20.0] * 4])
    real = rng.standard_normal((1000, 4)) + centres[rng.integers(0, 2, 1000)]
    fake = rng.standard_normal((1000, 4)) + centres[0]
    precision, recall = precision_recall(real, fake)
    assert precision > 0.88
    assert 0.4 < recall < 0.55
    p_far, r_far = precision_recall(real, fake + 100.0)
    assert p_far == 0.0 and r_far == 0.0

"""The Fréchet distance against a direct scipy computation and Gaussian closed forms."""

import numpy as np
import pytest
import scipy.linalg
from metrics import frechet_distance, frechet_distance_from_stats, gaussian_stats


def direct(a, b):
    """The textbook formula with scipy's general (non-symmetric) matrix square root."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(ca @ cb).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * covmean))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_a_direct_scipy_computation(seed):
    rng = np.random.default_rng(seed)
    d = 6
    a = rng.normal(size=(400, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)
    b = rng.normal(size=(300, d)) @ rng.normal(size=(d, d))
    assert frechet_distance(a, b) == pytest.approx(direct(a, b), rel=1e-6, abs=1e-8)


def test_closed_form_for_diagonal_gaussians():
    # FD(N(m1, diag(s1^2)), N(m2, diag(s2^2))) = |m1 - m2|^2 + sum (s1 - s2)^2
    m1, m2 = np.array([0.0, 1.0, -2.0]), np.array([3.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([2.0, 2.0, 1.5])
    fd = frechet_distance_from_stats(m1, np.diag(s1 ** 2), m2, np.diag(s2 ** 2))
    assert fd == pytest.approx(((m1 - m2) ** 2).sum() + ((s1 - s2) ** 2).sum(), rel=1e-12)


def test_closed_form_for_rotated_covariances():
    # commuting covariances R diag(l) R^T: Tr sqrt(S1 S2) = sum sqrt(l1 * l2)
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    l1, l2 = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    c1, c2 = q @ np.diag(l1) @ q.T, q @ np.diag(l2) @ q.T
    expect = (l1 + l2 - 2 * np.sqrt(l1 * l2)).sum()
    assert frechet_distance_from_stats(np.zeros(5), c1, np.zeros(5), c2) == pytest.approx(expect)


def test_sampled_gaussians_approach_the_closed_form_and_identity_is_zero():
    rng = np.random.default_rng(4)
    a = rng.normal(0.0, 1.0, size=(20000, 3))
    b = rng.normal(0.5, 2.0, size=(20000, 3))
    assert frechet_distance(a, b) == pytest.approx(3 * 0.25 + 3 * 1.0, rel=0.05)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(a, a + 1.0) == pytest.approx(3.0, rel=1e-6)  # a pure shift


def test_symmetric_nonnegative_and_rank_deficient_ok():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(50, 8))
    b = np.repeat(rng.normal(size=(50, 1)), 8, axis=1)  # rank-1 covariance
    fd_ab, fd_ba = frechet_distance(a, b), frechet_distance(b, a)
    assert fd_ab >= 0 and fd_ab == pytest.approx(fd_ba, rel=1e-6)
    assert np.isfinite(fd_ab)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="N >= 2"):
        gaussian_stats(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="widths differ"):
        frechet_distance(np.zeros((4, 3)) + np.arange(4)[:, None],
                         np.ones((4, 2)) * np.arange(4)[:, None])

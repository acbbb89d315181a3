"""FID maths against independent computations, preprocessing, and FID of image sets with a random Inception."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from batch.metrics.fid import (
    INCEPTION_SIZE,
    bootstrap_fid,
    bootstrap_mean,
    fid_from_features,
    frechet_distance,
    prepare_reference,
    statistics,
    to_inception_input,
)


def scipy_frechet(mu1, s1, mu2, s2) -> float:
    """The textbook formula with scipy's general matrix square root (what pytorch-fid does)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def random_spd(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / (rank or d) + 1e-3 * np.eye(d)


def test_closed_form_diagonal_gaussians():
    # For diagonal covariances, d^2 = |mu1-mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 4, 16), rng.uniform(0.1, 4, 16)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    expected = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-6)
    assert scipy_frechet(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-6)


def test_closed_form_commuting_and_scalar():
    # Same eigenvectors: sqrt(S1 S2) = Q sqrt(L1 L2) Q^T.
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    l1, l2 = rng.uniform(0.5, 3, 8), rng.uniform(0.5, 3, 8)
    s1, s2 = q @ np.diag(l1) @ q.T, q @ np.diag(l2) @ q.T
    expected = float(l1.sum() + l2.sum() - 2 * np.sqrt(l1 * l2).sum())
    assert frechet_distance(np.zeros(8), s1, np.zeros(8), s2) == pytest.approx(expected, rel=1e-6)
    # 1-d: (m1-m2)^2 + (s1-s2)^2 for standard deviations s
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0, rel=1e-12)


@pytest.mark.parametrize("d,rank", [(5, None), (64, None), (64, 10), (256, 40)])
def test_random_covariances_match_scipy_sqrtm(d, rank):
    rng = np.random.default_rng(d + (rank or 0))
    s1, s2 = random_spd(rng, d, rank), random_spd(rng, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d) * 0.1
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(scipy_frechet(mu1, s1, mu2, s2), rel=1e-6)


def test_identical_gaussians_distance_zero_and_shape_errors():
    rng = np.random.default_rng(3)
    s = random_spd(rng, 32)
    mu = rng.standard_normal(32)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(mu, s, mu[:5], s)


def test_statistics_are_mean_and_unbiased_cov():
    rng = np.random.default_rng(4)
    f = rng.standard_normal((50, 6)).astype(np.float32)
    mu, sigma = statistics(f)
    assert mu.dtype == np.float64 and np.allclose(mu, f.astype(np.float64).mean(0))
    centred = f.astype(np.float64) - mu
    assert np.allclose(sigma, centred.T @ centred / 49)
    with pytest.raises(ValueError):
        statistics(f[:1])


def test_to_inception_input_matches_reference_resize():
    import torch
    import torch.nn.functional as F

    imgs = np.random.default_rng(5).integers(0, 256, (2, 64, 48, 3), dtype=np.uint8)
    x = to_inception_input(imgs)
    assert x.shape == (2, 3, INCEPTION_SIZE, INCEPTION_SIZE) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    ref = F.interpolate(torch.tensor(imgs).permute(0, 3, 1, 2).float() / 255, size=(299, 299), mode="bilinear",
                        align_corners=False) * 2 - 1
    assert torch.allclose(x, ref)
    with pytest.raises(ValueError, match="uint8"):
        to_inception_input(imgs.astype(np.float32))


def test_prepare_reference_centre_crops_then_resizes():
    img = np.zeros((40, 100, 3), np.uint8)
    img[:, 30:70] = 255  # the centre 40x40 square is white, the sides black
    out = prepare_reference(img, size=20)
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    assert out.min() == 255  # nothing of the black sides survived the centre crop


@pytest.mark.parametrize("n", [5, 30, 200])  # N <= D (the N x N form) and N > D (the D x D form)
def test_fid_from_features_equals_statistics_then_distance(n):
    rng = np.random.default_rng(n)
    ref = rng.standard_normal((300, 32)) @ rng.standard_normal((32, 32)) * 0.3
    mu_r, s_r = statistics(ref)
    f = rng.standard_normal((n, 32)) + 0.2
    expected = scipy_frechet(*statistics(f), mu_r, s_r)
    assert fid_from_features(f, mu_r, s_r) == pytest.approx(expected, rel=1e-6)
    assert fid_from_features(f, mu_r, s_r) == pytest.approx(frechet_distance(*statistics(f), mu_r, s_r), rel=1e-6)


def test_bootstrap_intervals():
    rng = np.random.default_rng(6)
    v = rng.normal(30, 2, 400)
    lo, hi = bootstrap_mean(v, 500, seed=0)
    assert lo < v.mean() < hi and hi - lo < 1.0
    assert bootstrap_mean(v, 500, seed=0) == (lo, hi)  # seeded
    assert all(np.isnan(bootstrap_mean(v, 0, seed=0)))
    feats = rng.standard_normal((40, 8))
    mu, sigma = statistics(rng.standard_normal((200, 8)) + 0.5)
    flo, fhi = bootstrap_fid(feats, mu, sigma, 20, seed=0)
    assert 0 < flo <= fhi


def test_fid_of_image_sets_with_random_inception():
    """FID(set, itself) ~ 0; FID between different image sets > 0 (Kaiming-initialised random Inception)."""
    import torch

    from batch.metrics.inception import random_inception

    net = random_inception(0)
    rng = np.random.default_rng(7)
    noise = rng.integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    smooth = np.repeat(np.repeat(rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8), 16, 1), 16, 2)
    with torch.no_grad():
        fa = net(to_inception_input(noise)).numpy()
        fb = net(to_inception_input(smooth)).numpy()
    assert fa.shape == (6, 2048) and fa.std() > 1e-3  # features did not collapse
    mu_a, s_a = statistics(fa)
    same = fid_from_features(fa, mu_a, s_a)  # exact N x N form (N <= 2048); equal to frechet_distance above
    diff = fid_from_features(fb, mu_a, s_a)
    assert same < 1e-6 * max(1.0, diff)
    assert diff > 1.0

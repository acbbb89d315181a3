"""FID maths against independent computations, preprocessing, and FID of image sets with a random Inception."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from batch.metrics.fid import (
    INCEPTION_SIZE,
    bootstrap_mean,
    clean_resize,
    fid_from_features,
    frechet_distance,
    jackknife_fid,
    jackknife_leave_out_values,
    kid,
    polynomial_mmd2,
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


def test_bootstrap_mean_interval():
    rng = np.random.default_rng(6)
    v = rng.normal(30, 2, 400)
    lo, hi = bootstrap_mean(v, 500, seed=0)
    assert lo < v.mean() < hi and hi - lo < 1.0
    assert bootstrap_mean(v, 500, seed=0) == (lo, hi)  # seeded
    assert all(np.isnan(bootstrap_mean(v, 0, seed=0)))


@pytest.mark.parametrize("n,d", [(30, 64), (300, 16), (65, 64)])  # N x N form, D x D form, N - 1 = D boundary
def test_jackknife_uses_the_fids_of_the_leave_out_sets(n, d):
    """The block-sum shortcut of jackknife_fid equals fid_from_features of each leave-out set, recomputed."""
    rng = np.random.default_rng(n)
    mu, sigma = statistics(rng.standard_normal((500, d)))
    f = rng.standard_normal((n, d)) * 1.2 + 0.3
    lo, hi, se = jackknife_fid(f, mu, sigma, blocks=10, seed=3)
    values = jackknife_leave_out_values(f, mu, sigma, 10, seed=3)
    assert se == pytest.approx(np.sqrt(0.9 * ((values - values.mean()) ** 2).sum()), rel=1e-5)
    point = fid_from_features(f, mu, sigma)
    q = 2.2621571627409915  # scipy.stats.t.ppf(0.975, 9)
    assert (lo, hi) == pytest.approx((point - q * se, point + q * se), rel=1e-9)
    assert jackknife_fid(f[:8], mu, sigma, blocks=10, seed=3)[2] == pytest.approx(  # 8 images: 4 groups
        np.sqrt(0.75 * np.var(jackknife_leave_out_values(f[:8], mu, sigma, 4, seed=3)) * 4), rel=1e-5)
    assert all(np.isnan(jackknife_fid(f[:3], mu, sigma, blocks=10)))  # fewer than 2 groups of 2
    assert all(np.isnan(jackknife_fid(f, mu, sigma, blocks=0)))


# Coverage of the FID interval (issue 17). Estimand: E[FID_N], the expected FID of N generated images against
# the fixed reference moments, estimated by MC_DRAWS independent FIDs at N (Monte Carlo error sd/sqrt(400), a
# twentieth of the sampling sd). 100 trials; target: at least 90 intervals (nominal 95%) contain it.
COVERAGE_DIM, COVERAGE_TRIALS, MC_DRAWS = 8, 100, 400


def _coverage_setup():
    rng = np.random.default_rng(42)
    d = COVERAGE_DIM
    a, b = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    s_gen, s_ref = a @ a.T / d + 0.2 * np.eye(d), b @ b.T / d + 0.2 * np.eye(d)
    return rng, rng.standard_normal(d) * 0.3, np.linalg.cholesky(s_gen), np.zeros(d), s_ref


@pytest.mark.parametrize("n", [200, 1000, pytest.param(10_000, marks=pytest.mark.slow)])
def test_jackknife_interval_covers_expected_fid_at_n(n):
    rng, mu_g, chol, mu_r, s_r = _coverage_setup()

    def draw():
        return mu_g + rng.standard_normal((n, COVERAGE_DIM)) @ chol.T

    draws = np.array([fid_from_features(draw(), mu_r, s_r) for _ in range(MC_DRAWS)])
    expected = draws.mean()
    hits, widths = 0, []
    for trial in range(COVERAGE_TRIALS):
        lo, hi, _ = jackknife_fid(draw(), mu_r, s_r, blocks=20, seed=trial)
        hits += lo <= expected <= hi
        widths.append(hi - lo)
    assert hits >= 90, f"{hits} of {COVERAGE_TRIALS} intervals contain E[FID_{n}] = {expected:.4f}"
    # not trivially wide: the mean width is within 1.6x of the ideal 2 * 1.96 * sd of FID_N
    assert np.mean(widths) < 1.6 * 2 * 1.96 * draws.std()


def test_fid_bias_at_small_n_is_why_the_estimand_names_n():
    """At 64-d, E[FID_200] sits above the population distance (FID_inf) by several sampling sds, so an
    interval for FID at N says nothing about FID at infinite N (the README's wording)."""
    rng = np.random.default_rng(5)
    d = 64
    a = rng.standard_normal((d, d))
    chol = np.linalg.cholesky(a @ a.T / d + 0.2 * np.eye(d))
    s_r = np.diag(rng.uniform(0.5, 2, d))
    pop = frechet_distance(np.zeros(d), chol @ chol.T, np.zeros(d), s_r)
    draws = np.array([fid_from_features(rng.standard_normal((200, d)) @ chol.T, np.zeros(d), s_r)
                      for _ in range(30)])
    assert draws.mean() - pop > 3 * draws.std()


def _mmd2_torch_fidelity(x, y):
    """Independent reference: torch-fidelity 0.4.0 ``torch_fidelity/metric_kid.py`` (``polynomial_kernel``
    with degree 3, gamma 1/D, coef0 1; ``mmd2(..., mmd_est="unbiased")``), transcribed line by line."""
    def kernel(a, b):
        return (np.matmul(a, b.T) * (1.0 / a.shape[1]) + 1) ** 3

    k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
    m = k_xx.shape[0]
    kt_xx_sum = (k_xx.sum(axis=1) - np.diagonal(k_xx)).sum()
    kt_yy_sum = (k_yy.sum(axis=1) - np.diagonal(k_yy)).sum()
    return (kt_xx_sum + kt_yy_sum) / (m * (m - 1)) - 2 * k_xy.sum(axis=0).sum() / (m * m)


def _kid_torch_fidelity(f1, f2, subsets, subset_size, seed):
    """torch-fidelity 0.4.0 ``kid_features_to_metric``: RandomState(seed), f1 subset then f2 subset; mean, std."""
    rng = np.random.RandomState(seed)
    vals = [_mmd2_torch_fidelity(f1[rng.choice(len(f1), subset_size, replace=False)],
                                 f2[rng.choice(len(f2), subset_size, replace=False)]) for _ in range(subsets)]
    return float(np.mean(vals)), float(np.std(vals))


def test_kid_matches_torch_fidelity_formula():
    rng = np.random.default_rng(11)
    f = np.abs(rng.standard_normal((300, 64))) + 0.1  # pool features are non-negative (post-ReLU)
    r = np.abs(rng.standard_normal((400, 64))) * 1.5 + 0.3
    assert polynomial_mmd2(f[:50], r[:50]) == pytest.approx(_mmd2_torch_fidelity(f[:50], r[:50]), rel=1e-9)
    mean, std, m = kid(f, r, subsets=20, subset_size=100, seed=2020)
    ref_mean, ref_std = _kid_torch_fidelity(f, r, 20, 100, 2020)
    assert m == 100 and mean == pytest.approx(ref_mean, rel=1e-6) and std == pytest.approx(ref_std, rel=1e-6)
    assert mean > 3 * std / np.sqrt(20)  # different distributions: clearly positive
    # fewer images than the subset size: m drops to the smaller set (clean-fid's rule)
    mean, std, m = kid(f[:60], r, subsets=5, subset_size=1000, seed=1)
    assert m == 60 and mean == pytest.approx(_kid_torch_fidelity(f[:60], r, 5, 60, 1)[0], rel=1e-6)
    assert all(np.isnan(kid(f, r, subsets=0)[:2]))


def test_kid_is_unbiased_for_identical_distributions():
    """Unbiased MMD^2: its mean over many independent same-distribution pairs is 0 within its standard error."""
    rng = np.random.default_rng(12)
    vals = [polynomial_mmd2(np.abs(rng.standard_normal((40, 16))), np.abs(rng.standard_normal((40, 16))))
            for _ in range(300)]
    assert abs(np.mean(vals)) < 3 * np.std(vals) / np.sqrt(len(vals))
    assert min(vals) < 0  # an unbiased estimate of 0 goes negative (a biased V-statistic would not)


def test_clean_resize_is_pil_bicubic_per_channel_and_differs_from_legacy():
    from PIL import Image

    rng = np.random.default_rng(13)
    img = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    x = clean_resize(img, 32)
    assert x.shape == (32, 32, 3) and x.dtype == np.float32
    green = np.asarray(Image.fromarray(img[:, :, 1].astype(np.float32)).resize((32, 32), Image.Resampling.BICUBIC))
    np.testing.assert_allclose(x[:, :, 1], np.clip(green, 0, 255))
    flat = np.full((512, 512, 3), 200, np.uint8)  # a constant image is constant through either path
    for mode in ("legacy_pytorch", "clean"):
        t = to_inception_input(flat[None], resize=mode)
        assert float(t.min()) == pytest.approx(200 / 255 * 2 - 1, abs=1e-5) == pytest.approx(float(t.max()), abs=1e-5)
    big = rng.integers(0, 256, (1, 512, 512, 3), dtype=np.uint8)  # downscaling noise: antialiasing matters
    diff = (to_inception_input(big, resize="clean") - to_inception_input(big)).abs().mean()
    assert float(diff) > 0.05
    with pytest.raises(ValueError, match="resize"):
        to_inception_input(big, resize="bilinear")


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

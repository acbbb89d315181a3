"""Fréchet Inception Distance as three pure steps: images -> features -> statistics -> distance.

FID (Heusel et al. 2017, "GANs trained by a two time-scale update rule...", eq. 6) is the Fréchet (2-Wasserstein)
distance between two Gaussians fitted to Inception pool features::

    d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))

Preprocessing (every step changes FID, so each is fixed and documented here and in the README):

1. decode to RGB ``uint8`` (PNG from the generator; JPEG from COCO decoded by PIL, its default IDCT);
2. reference images only (:func:`prepare_reference`): centre crop to the largest square, then resize to the
   generated size (512x512) with PIL's bicubic filter (antialiased), then round to ``uint8`` again -- so
   references and samples both enter step 3 as square uint8 images of the same size;
3. :func:`to_inception_input`: ``uint8 / 255`` to float32 in [0, 1], bilinear resize to 299x299 with
   ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False, antialias=False)`` (exactly
   pytorch-fid's ``resize_input``; clean-fid calls this path ``legacy_pytorch``), then ``2x - 1`` to [-1, 1]
   (pytorch-fid's ``normalize_input``). ``fid.resize: clean`` replaces the bilinear resize by clean-fid's
   antialiased PIL bicubic (:func:`clean_resize`); the mode is part of the reference-statistics cache key;
4. the FID InceptionV3 (:mod:`batch.metrics.inception`) up to the final average pool: 2048 float32 features;
5. :func:`statistics` in float64: mean and unbiased covariance (``np.cov``, N-1), as pytorch-fid;
6. :func:`frechet_distance` in float64.

Around the point value: :func:`jackknife_fid` (interval of the expected FID at this N and reference set),
:func:`kid` (Kernel Inception Distance on the same features, unbiased at any N), :func:`bootstrap_mean`
(the CLIP score's interval).
"""

from __future__ import annotations

import numpy as np

INCEPTION_SIZE = 299
REFERENCE_SIZE = 512


RESIZE_MODES = ("legacy_pytorch", "clean")  # clean-fid's names for the two resize paths into the network
RESIZE_DETAIL = {
    "legacy_pytorch": "torch bilinear, align_corners=False, no antialias (pytorch-fid resize_input)",
    "clean": "PIL bicubic (antialiased) on float32 per channel, clipped to [0, 255] (clean-fid 'clean')",
}


def preprocessing_tag(reference_size: int = REFERENCE_SIZE, resize: str = "legacy_pytorch") -> str:
    """Names preprocessing steps 2-3 (reference crop/resize to ``reference_size``, then the ``resize`` path to
    299) in cache keys."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    return f"crop-center-bicubic{reference_size}-u8_{resize}{INCEPTION_SIZE}_pm1"


PREPROCESSING = preprocessing_tag()


def prepare_reference(image, size: int = REFERENCE_SIZE) -> np.ndarray:
    """Step 2 for a reference image (PIL image or HxWx3 uint8): centre square crop, bicubic resize, uint8."""
    from PIL import Image

    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    img = img.convert("RGB")
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != size:
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def clean_resize(image: np.ndarray, size: int = INCEPTION_SIZE) -> np.ndarray:
    """clean-fid's ``clean`` resize of one (H, W, 3) uint8 image (``cleanfid.resize.make_resizer("PIL", False,
    "bicubic", (size, size))``): each channel as a float32 PIL image, bicubic (antialiased) resize, clip to
    [0, 255]; float32 (H', W', 3), not re-quantised."""
    from PIL import Image

    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(image[:, :, c], np.float32))
                        .resize((size, size), Image.Resampling.BICUBIC)).clip(0, 255) for c in range(3)]
    return np.stack(chans, axis=2).astype(np.float32)


def to_inception_input(images: np.ndarray, device: str = "cpu", resize: str = "legacy_pytorch"):
    """Step 3: (N, H, W, 3) uint8 -> (N, 3, 299, 299) float32 tensor in [-1, 1] on ``device``.

    ``resize="legacy_pytorch"`` (default, pytorch-fid): the uint8 pixels move to ``device`` first, then a
    bilinear resize without antialiasing there. ``resize="clean"``: :func:`clean_resize` on the CPU (PIL)."""
    import torch
    import torch.nn.functional as F

    arr = np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) uint8 images, got {arr.dtype} {arr.shape}")
    if resize == "clean":
        x = torch.from_numpy(np.stack([clean_resize(a) for a in arr])).to(device).permute(0, 3, 1, 2) / 255.0
        return 2.0 * x - 1.0
    if resize != "legacy_pytorch":
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    x = torch.from_numpy(np.array(arr, copy=True)).to(device).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False,
                          antialias=False)
    return 2.0 * x - 1.0


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Step 5: mean and unbiased covariance (float64) of (N, D) features; N >= 2."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) features, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (eigenvalues clipped at 0)."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, sqrt_sigma1: np.ndarray | None = None) -> float:
    """tr((S1 S2)^(1/2)) for symmetric PSD S1, S2.

    S1 S2 is similar to the symmetric PSD matrix A = S1^(1/2) S2 S1^(1/2) (conjugate by S1^(1/2)), so both
    have the same non-negative eigenvalues and tr((S1 S2)^(1/2)) = sum(sqrt(eig(A))). This avoids the
    non-symmetric ``scipy.linalg.sqrtm`` (and its complex round-off) that pytorch-fid uses.
    """
    r = _sqrt_psd(sigma1) if sqrt_sigma1 is None else sqrt_sigma1
    a = r @ sigma2 @ r
    w = np.linalg.eigvalsh((a + a.T) / 2)
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (step 6; float64; FID when the moments are
    Inception pool-feature statistics): ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2))
    return max(value, 0.0)


def fid_from_features(features: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray,
                      sqrt_ref: np.ndarray | None = None) -> float:
    """FID of generated features (N, D) against reference moments; equal to
    ``frechet_distance(*statistics(features), mu_ref, sigma_ref)`` but cheap when N <= D.

    With N - 1 < D the sample covariance is S = B^T B, B = (F - mu) / sqrt(N - 1), and the non-zero eigenvalues
    of S_ref S = (S_ref B^T) B equal those of B S_ref B^T (eig(XY) = eig(YX) away from 0), a symmetric PSD
    N x N matrix: tr((S_ref S)^(1/2)) = sum(sqrt(eig(B S_ref B^T))), no D x D eigen-solve. Otherwise the D x D
    form of :func:`trace_sqrt_product` is used, with ``sqrt_ref`` (S_ref^(1/2)) computed once by the caller.
    """
    f = np.asarray(features, np.float64)
    n, d = f.shape
    if n < 2:
        raise ValueError(f"need at least 2 feature rows, got {n}")
    mu = f.mean(axis=0)
    diff = mu - np.asarray(mu_ref, np.float64)
    if n - 1 < d:
        b = (f - mu) / np.sqrt(n - 1)
        m = b @ sigma_ref @ b.T
        tr_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
        tr_s = float((b * b).sum())
    else:
        sigma = np.cov(f, rowvar=False)
        tr_sqrt = trace_sqrt_product(sigma_ref, sigma, sqrt_ref)
        tr_s = float(np.trace(sigma))
    return max(0.0, float(diff @ diff + tr_s + np.trace(sigma_ref) - 2.0 * tr_sqrt))


def jackknife_fid(features: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray, blocks: int = 20,
                  level: float = 0.95, seed: int = 0,
                  sqrt_ref: np.ndarray | None = None) -> tuple[float, float, float]:
    """Delete-a-block jackknife interval of FID over the generated images (reference statistics held fixed).

    Estimand: the expected FID of N images from the model against *this* reference set, E[FID_N] (FID is
    biased upwards by roughly c/N, so this is not the model's FID at infinite N, and it is comparable only
    with FIDs at the same N and reference). The N images are split at random (``default_rng(seed)``) into
    ``blocks`` groups of near-equal size; FID_(k) is the FID without group k, and (Efron & Tibshirani 1993,
    "An Introduction to the Bootstrap", ch. 11; delete-d form: Shao & Tu 1995, sec. 2.3)::

        se^2 = (K - 1) / K * sum_k (FID_(k) - mean_k FID_(k))^2,   interval = FID_N -/+ t_{K-1} se

    (t: Student quantile at (1 + level) / 2 with K - 1 degrees of freedom; the lower end is clipped at 0).
    Unlike resampling with replacement (which duplicates images, shrinks the covariance and shifts every
    resampled FID far above FID_N), leave-out FIDs measure only the spread; coverage of E[FID_N] is
    tested on Gaussian features (``tests/test_fid.py``) and benchmarked at 2048-d (``bench/fid_coverage.py``).

    Cost: one N x N (N - 1 < D) or D x D (otherwise, with ``sqrt_ref`` = S_ref^(1/2)) eigen-solve per block;
    the covariances of the leave-out sets come from block sums, not from the rows again.
    K = min(blocks, N // 2) (so small demo sets still get a, wide, interval; coverage is measured at K = 20).
    Returns (lo, hi, se); (nan, nan, nan) when K < 2 (``blocks`` < 2 or N < 4).
    """
    from scipy.stats import t as student_t

    f = np.asarray(features, np.float64)
    n, d = f.shape
    k = min(int(blocks), n // 2)  # at least 2 images per group
    if k < 2:
        return float("nan"), float("nan"), float("nan")
    sigma_ref = np.asarray(sigma_ref, np.float64)
    mean = f.mean(axis=0)
    x = f - mean
    diff = mean - np.asarray(mu_ref, np.float64)
    label = np.empty(n, np.int64)
    label[np.random.default_rng(seed).permutation(n)] = np.arange(n) % k
    keep_n = (n - np.bincount(label, minlength=k)).astype(np.float64)
    block_sum = np.zeros((k, d))
    np.add.at(block_sum, label, x)
    sq = np.einsum("ij,ij->i", x, x)
    dk = -block_sum / keep_n[:, None]  # mean of the kept rows minus the overall mean
    mean_term = ((diff + dk) ** 2).sum(axis=1)
    tr_s = (sq.sum() - np.bincount(label, weights=sq, minlength=k) - keep_n * (dk ** 2).sum(axis=1)) / (keep_n - 1)
    tr_sqrt = np.empty(k)
    if n - 1 < d:  # N x N form of fid_from_features: eig(H G_kk H) / (n_k - 1), G = X S_ref X^T
        g = x @ sigma_ref @ x.T
        for b in range(k):
            idx = np.flatnonzero(label != b)
            gk = g[np.ix_(idx, idx)]
            gc = gk - gk.mean(axis=0)[None, :] - gk.mean(axis=1)[:, None] + gk.mean()
            w = np.linalg.eigvalsh((gc + gc.T) / 2) / (keep_n[b] - 1)
            tr_sqrt[b] = np.sqrt(np.clip(w, 0, None)).sum()
    else:  # D x D form: R S_k R with R = S_ref^(1/2), from Y = X R and block Gram matrices
        r = _sqrt_psd(sigma_ref) if sqrt_ref is None else np.asarray(sqrt_ref, np.float64)
        y = x @ r
        total = y.T @ y
        for b in range(k):
            yb = y[label == b]
            e = dk[b] @ r
            c = (total - yb.T @ yb - keep_n[b] * np.outer(e, e)) / (keep_n[b] - 1)
            tr_sqrt[b] = np.sqrt(np.clip(np.linalg.eigvalsh((c + c.T) / 2), 0, None)).sum()
    leave_out = mean_term + tr_s + np.trace(sigma_ref) - 2.0 * tr_sqrt
    se = float(np.sqrt((k - 1) / k * ((leave_out - leave_out.mean()) ** 2).sum()))
    point = fid_from_features(f, mu_ref, sigma_ref, sqrt_ref)
    q = float(student_t.ppf((1 + level) / 2, k - 1))
    return max(0.0, point - q * se), point + q * se, se


def jackknife_leave_out_values(features: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray, blocks: int,
                               seed: int = 0) -> np.ndarray:
    """FID_(k) of :func:`jackknife_fid` computed directly (``fid_from_features`` of each leave-out set), for
    tests and benchmarks: the same random groups."""
    f = np.asarray(features, np.float64)
    label = np.empty(len(f), np.int64)
    label[np.random.default_rng(seed).permutation(len(f))] = np.arange(len(f)) % blocks
    return np.array([fid_from_features(f[label != b], mu_ref, sigma_ref) for b in range(blocks)])


def polynomial_mmd2(x: np.ndarray, y: np.ndarray, degree: int = 3, coef0: float = 1.0,
                    gamma: float | None = None) -> float:
    """Unbiased MMD^2 (Gretton et al. 2012, eq. 3) of two equal-size samples with the polynomial kernel
    ``k(a, b) = (gamma a.b + coef0)^degree``, gamma = 1/D by default (Binkowski et al. 2018, "Demystifying MMD
    GANs": KID). Diagonals of K_xx and K_yy are left out; K_xy is averaged in full (torch-fidelity's
    ``mmd2(..., mmd_est="unbiased")``, clean-fid's ``kernel_distance``)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m = len(x)
    if len(y) != m or m < 2:
        raise ValueError(f"need two samples of the same size >= 2, got {len(x)} and {len(y)}")
    g = 1.0 / x.shape[1] if gamma is None else gamma
    kxx = (x @ x.T * g + coef0) ** degree
    kyy = (y @ y.T * g + coef0) ** degree
    kxy = (x @ y.T * g + coef0) ** degree
    return float((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.sum() / (m * m))


def kid(features: np.ndarray, ref_features: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float, int]:
    """Kernel Inception Distance (Binkowski et al. 2018): mean and standard deviation of
    :func:`polynomial_mmd2` over ``subsets`` pairs of random subsets (without replacement) of
    m = min(subset_size, N, N_ref) generated and reference features, as torch-fidelity's
    ``kid_features_to_metric`` (defaults 100 subsets of 1000; its subsets are drawn the same way:
    ``numpy.random.RandomState(seed).choice`` generated, then reference) and clean-fid's ``kernel_distance``
    (which also lowers m to the smaller set). KID is unbiased at any N (unlike FID), so values at different
    N are comparable; the std is the spread of one subset's estimate (torch-fidelity's ``kid_std``), an upper
    bound on the standard error of the mean over overlapping subsets. Returns (mean, std, m); nans when
    ``subsets`` is 0 or m < 2."""
    f, r = np.asarray(features, np.float64), np.asarray(ref_features, np.float64)
    m = min(int(subset_size), len(f), len(r))
    if subsets <= 0 or m < 2:
        return float("nan"), float("nan"), m
    rng = np.random.RandomState(seed)
    vals = np.empty(subsets)
    for i in range(subsets):
        a = f[rng.choice(len(f), m, replace=False)]
        b = r[rng.choice(len(r), m, replace=False)]
        vals[i] = polynomial_mmd2(a, b)
    return float(vals.mean()), float(vals.std()), m


def bootstrap_mean(values: np.ndarray, n_boot: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of a mean (used for the CLIP score: the mean of N per-image scores; its
    coverage of the population mean is tested in ``tests/test_clip.py``): ``n_boot`` resamples of the values
    with replacement (``default_rng(seed)``), the (1-level)/2 and (1+level)/2 quantiles of their means."""
    v = np.asarray(values, np.float64)
    if n_boot <= 0 or v.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, (n_boot, v.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)

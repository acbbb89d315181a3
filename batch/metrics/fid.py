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
   pytorch-fid's ``resize_input``), then ``2x - 1`` to [-1, 1] (pytorch-fid's ``normalize_input``);
4. the FID InceptionV3 (:mod:`batch.metrics.inception`) up to the final average pool: 2048 float32 features;
5. :func:`statistics` in float64: mean and unbiased covariance (``np.cov``, N-1), as pytorch-fid;
6. :func:`frechet_distance` in float64.
"""

from __future__ import annotations

import numpy as np

INCEPTION_SIZE = 299
REFERENCE_SIZE = 512


def preprocessing_tag(reference_size: int = REFERENCE_SIZE) -> str:
    """Names preprocessing steps 2-3 (reference crop/resize to ``reference_size``, then 299) in cache keys."""
    return f"crop-center-bicubic{reference_size}-u8_bilinear{INCEPTION_SIZE}-noaa_pm1"


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


def to_inception_input(images: np.ndarray, device: str = "cpu"):
    """Step 3: (N, H, W, 3) uint8 -> (N, 3, 299, 299) float32 tensor in [-1, 1] on ``device`` (the uint8
    pixels move first, so the resize runs on the GPU when there is one)."""
    import torch
    import torch.nn.functional as F

    arr = np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) uint8 images, got {arr.dtype} {arr.shape}")
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


def bootstrap_fid(features: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray, n_boot: int, seed: int,
                  level: float = 0.95, sqrt_ref: np.ndarray | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval of FID over the generated images (reference statistics held fixed).

    Each resample draws N generated images with replacement (``numpy.random.default_rng(seed)``) and recomputes
    :func:`fid_from_features`; the interval is the (1-level)/2 and (1+level)/2 quantiles. Resampling duplicates
    images, so resampled FIDs sit slightly above the point estimate (noticeably so for small N): read the
    interval as the sampling spread, not as a bias-corrected bound. Returns (nan, nan) when ``n_boot`` is 0.
    """
    if n_boot <= 0:
        return float("nan"), float("nan")
    f = np.asarray(features, np.float64)
    sigma_ref = np.asarray(sigma_ref, np.float64)
    if sqrt_ref is None and len(f) - 1 >= f.shape[1]:
        sqrt_ref = _sqrt_psd(sigma_ref)
    rng = np.random.default_rng(seed)
    values = [fid_from_features(f[rng.integers(0, len(f), len(f))], mu_ref, sigma_ref, sqrt_ref)
              for _ in range(n_boot)]
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_mean(values: np.ndarray, n_boot: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of a mean (used for the CLIP score)."""
    v = np.asarray(values, np.float64)
    if n_boot <= 0 or v.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, (n_boot, v.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)

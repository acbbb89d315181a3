"""Coverage of the FID jackknife interval on synthetic Gaussian features at the Inception dimension (2048).

The estimand is what the README says the interval estimates: E[FID_N], the expected FID of N generated images
against one fixed reference set, here the mean of ``--mc-draws`` independent FIDs at N. Generated features:
N(mu_g, diag(lam)) with a decaying spectrum ``lam_k = 0.5 / (1 + k / 64)``; reference statistics: mean and
covariance of ``--ref-n`` draws of N(0, a rotated spectrum), held fixed (as the cache holds them). Each trial
draws N generated features, computes :func:`batch.metrics.fid.jackknife_fid` and records whether the interval
contains the estimand; also how often it contains the population (closed-form) Fréchet distance, FID_inf.

    .venv/bin/python bench/fid_coverage.py --sizes 200 1000 --trials 100 --mc-draws 200

Prints one ``RESULT {json}`` line per N (coverage counts, mean width, timings).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from common import emit  # also puts the repository on sys.path

from batch.metrics.fid import frechet_distance, fid_from_features, jackknife_fid, statistics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--sizes", type=int, nargs="+", default=[200, 1000, 10000])
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--mc-draws", type=int, default=200, help="independent FIDs at N that define E[FID_N]")
    ap.add_argument("--blocks", type=int, default=20)
    ap.add_argument("--ref-n", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    d = args.dim
    rng = np.random.default_rng(args.seed)
    lam = 0.5 / (1 + np.arange(d) / 64)
    mu_g = rng.standard_normal(d) * 0.05
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    lam_ref = 0.5 / (1 + np.arange(d) / 48)
    ref = (rng.standard_normal((args.ref_n, d)) * np.sqrt(lam_ref)) @ q.T
    mu_r, s_r = statistics(ref)
    del ref
    sqrt_g = np.sqrt(lam)
    fid_inf = frechet_distance(mu_g, np.diag(lam), mu_r, s_r)

    from batch.metrics.fid import _sqrt_psd

    sqrt_ref = _sqrt_psd(s_r)

    def draw(n: int) -> np.ndarray:
        return mu_g + rng.standard_normal((n, d)) * sqrt_g

    for n in args.sizes:
        t0 = time.perf_counter()
        mc = np.array([fid_from_features(draw(n), mu_r, s_r, sqrt_ref) for _ in range(args.mc_draws)])
        estimand, sd = float(mc.mean()), float(mc.std(ddof=1))
        t_mc = time.perf_counter() - t0
        t0 = time.perf_counter()
        hits = hits_inf = 0
        widths, points = [], []
        for i in range(args.trials):
            f = draw(n)
            lo, hi, _ = jackknife_fid(f, mu_r, s_r, blocks=args.blocks, seed=i, sqrt_ref=sqrt_ref)
            hits += lo <= estimand <= hi
            hits_inf += lo <= fid_inf <= hi
            widths.append(hi - lo)
            points.append(fid_from_features(f, mu_r, s_r, sqrt_ref))
        emit({"bench": "fid_coverage", "dim": d, "n": n, "trials": args.trials, "blocks": args.blocks,
              "mc_draws": args.mc_draws, "ref_n": args.ref_n, "expected_fid_n": estimand,
              "expected_fid_n_mc_se": sd / np.sqrt(args.mc_draws), "sd_fid_n": sd, "fid_inf": fid_inf,
              "covered": int(hits), "covered_fid_inf": int(hits_inf), "mean_width": float(np.mean(widths)),
              "mean_point": float(np.mean(points)),
              "mc_s": round(t_mc, 1), "trials_s": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    main()

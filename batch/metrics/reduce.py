"""The evaluation's reduction: per (model, guidance scale) FID against the reference statistics with its
jackknife interval, KID against the reference features, mean CLIP score with its bootstrap interval, and n
(pure: a scores table in, a results table out)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batch.metrics.reference import ReferenceStats, feature_matrix


RESULTS_SCHEMA = pa.schema([("model", pa.string()), ("model_id", pa.string()), ("guidance_scale", pa.float64()),
                            ("n", pa.int64()), ("fid", pa.float64()), ("fid_lo", pa.float64()),
                            ("fid_hi", pa.float64()), ("fid_se", pa.float64()), ("kid", pa.float64()),
                            ("kid_std", pa.float64()), ("kid_subset_size", pa.int64()),
                            ("clip_score", pa.float64()), ("clip_lo", pa.float64()), ("clip_hi", pa.float64())])


def reduce_results(scores: pa.Table, ref: ReferenceStats, spec: Any) -> pa.Table:
    """Per (model, scale): n; FID vs the reference statistics and its 95% jackknife interval
    (:func:`batch.metrics.fid.jackknife_fid`, ``fid.jackknife_blocks`` groups); KID vs the reference features
    (:func:`batch.metrics.fid.kid`; null when the cached statistics hold no features or ``kid.subsets`` is 0);
    mean CLIP score and its 95% percentile-bootstrap interval.

    ``spec`` is the evaluation spec (``batch.eval.spec.EvalSpec``: models, guidance scales, seed, fid, kid,
    clip). Each point's random draws are seeded with ``seed + 1000 * model index + scale index``."""
    from batch.metrics.fid import _sqrt_psd, bootstrap_mean, fid_from_features, jackknife_fid, kid

    dim = len(ref.mu)
    sqrt_ref = None  # S_ref^(1/2), only needed for groups with more images than feature dimensions
    rows = []
    ok = scores.filter(pc.is_null(scores.column("feature_error")))
    kid_settings = getattr(spec, "kid", None)
    for mi, m in enumerate(spec.models):
        for gi, g in enumerate(spec.guidance_scales):
            seed = spec.seed + 1000 * mi + gi
            sel = ok.filter(pc.and_(pc.equal(ok.column("eval_model"), m.name),
                                    pc.equal(ok.column("guidance_scale"), float(g))))
            n = sel.num_rows
            row: dict[str, Any] = {k: None for k in RESULTS_SCHEMA.names}
            row.update(model=m.name, model_id=m.model, guidance_scale=float(g), n=n)
            if n >= 2:
                feats = feature_matrix(sel.column("inception"))
                if n > dim and sqrt_ref is None:
                    sqrt_ref = _sqrt_psd(ref.sigma)
                row["fid"] = fid_from_features(feats, ref.mu, ref.sigma, sqrt_ref)
                row["fid_lo"], row["fid_hi"], row["fid_se"] = jackknife_fid(
                    feats, ref.mu, ref.sigma, blocks=spec.fid.jackknife_blocks, seed=seed, sqrt_ref=sqrt_ref)
                if ref.features is not None and kid_settings is not None and kid_settings.subsets > 0:
                    row["kid"], row["kid_std"], row["kid_subset_size"] = kid(
                        feats, ref.features, kid_settings.subsets, kid_settings.subset_size, seed=seed)
            if n >= 1:
                clip = np.asarray(sel.column("clip_score").to_pylist(), np.float64)
                row["clip_score"] = float(clip.mean())
                row["clip_lo"], row["clip_hi"] = bootstrap_mean(clip, spec.clip.bootstrap, seed=seed)
            rows.append({k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()})
    return pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA)

"""The evaluation's reduction: per (model, guidance scale) FID against the reference statistics, mean CLIP
score, bootstrap intervals and n (pure: a scores table in, a results table out)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batch.metrics.reference import ReferenceStats, feature_matrix


RESULTS_SCHEMA = pa.schema([("model", pa.string()), ("model_id", pa.string()), ("guidance_scale", pa.float64()),
                            ("n", pa.int64()), ("fid", pa.float64()), ("fid_lo", pa.float64()),
                            ("fid_hi", pa.float64()), ("clip_score", pa.float64()), ("clip_lo", pa.float64()),
                            ("clip_hi", pa.float64())])


def reduce_results(scores: pa.Table, ref: ReferenceStats, spec: Any) -> pa.Table:
    """Per (model, scale): n, FID vs the reference statistics, mean CLIP score, 95% bootstrap intervals.

    ``spec`` is the evaluation spec (``batch.eval.spec.EvalSpec``: models, guidance scales, seed, bootstrap
    counts)."""
    from batch.metrics.fid import _sqrt_psd, bootstrap_fid, bootstrap_mean, fid_from_features

    dim = len(ref.mu)
    sqrt_ref = None  # S_ref^(1/2), only needed for groups with more images than feature dimensions
    rows = []
    ok = scores.filter(pc.is_null(scores.column("feature_error")))
    for mi, m in enumerate(spec.models):
        for gi, g in enumerate(spec.guidance_scales):
            sel = ok.filter(pc.and_(pc.equal(ok.column("eval_model"), m.name),
                                            pc.equal(ok.column("guidance_scale"), float(g))))
            n = sel.num_rows
            row = {"model": m.name, "model_id": m.model, "guidance_scale": float(g), "n": n,
                   "fid": None, "fid_lo": None, "fid_hi": None, "clip_score": None, "clip_lo": None, "clip_hi": None}
            if n >= 2:
                feats = feature_matrix(sel.column("inception"))
                if n > dim and sqrt_ref is None:
                    sqrt_ref = _sqrt_psd(ref.sigma)
                row["fid"] = fid_from_features(feats, ref.mu, ref.sigma, sqrt_ref)
                row["fid_lo"], row["fid_hi"] = bootstrap_fid(feats, ref.mu, ref.sigma, spec.fid.bootstrap,
                                                             seed=spec.seed + 1000 * mi + gi, sqrt_ref=sqrt_ref)
            if n >= 1:
                clip = np.asarray(sel.column("clip_score").to_pylist(), np.float64)
                row["clip_score"] = float(clip.mean())
                row["clip_lo"], row["clip_hi"] = bootstrap_mean(clip, spec.clip.bootstrap,
                                                                seed=spec.seed + 1000 * mi + gi)
            rows.append(row)
    return pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA)

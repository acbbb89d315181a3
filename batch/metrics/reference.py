"""FID reference statistics: the features of a folder of reference images, reduced to (mu, sigma) and cached.

features -> statistics -> metric, each a pure step (:mod:`batch.metrics.fid`); this module runs the first
step over many images (:func:`score_images`, the feature stage on Ray) and caches the second under a key
naming the Inception weights (sha256), the preprocessing (including the resize path into the network) and the
image set (:func:`stats_key`). The cache holds the reference features too (float32), which KID needs.
"""

from __future__ import annotations

import hashlib
import io
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batch.metrics.settings import StatsSpec
from batch.run.record import now
from batch.spec.base import SpecError
from batch.spec.config import parse_spec

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class ScoringError(RuntimeError):
    """Nothing can be scored (no images); the evaluation reports it as failed."""


@dataclass
class ReferenceStats:
    """Reference moments (and the features, for KID) of one image folder, and where they are cached."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    key: str
    uri: str
    cached: bool  # True when read from the cache rather than computed
    features: np.ndarray | None = None  # (n, 2048) float32; None in caches written before KID
    weights_sha256: str = ""
    images: str = ""  # the folder the statistics describe
    num_files: int = 0  # image files found there (n: those readable)


def list_images(uri: str, storage_options: dict[str, Any] | None = None) -> list[tuple[str, int]]:
    """(URI, size) of every image file under a folder/prefix, sorted by URI."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if not fs.isdir(root):
        raise SpecError(f"reference images: {uri} is not a folder")
    found = fs.find(root, detail=True)
    out = sorted((fs.unstrip_protocol(p), int(info.get("size") or 0)) for p, info in found.items()
                 if p.lower().endswith(IMAGE_SUFFIXES))
    if len(out) < 2:
        raise SpecError(f"reference images: {uri} holds {len(out)} image files; FID needs at least 2")
    return out


def stats_key(weights_sha256: str, reference_size: int, images: list[tuple[str, int]],
              resize: str = "legacy_pytorch") -> str:
    """Cache key: the Inception weights (sha256), the preprocessing (reference crop/resize and the resize path
    into the network), and the image set (names and sizes)."""
    from batch.metrics.fid import preprocessing_tag

    names = "\n".join(f"{u.rsplit('/', 1)[-1]}\t{s}" for u, s in images)
    images_hash = hashlib.sha256(names.encode()).hexdigest()[:12]
    return (f"inception-{weights_sha256[:12]}_{preprocessing_tag(reference_size, resize)}_"
            f"{len(images)}img-{images_hash}")


def extractor_kwargs(spec: StatsSpec, reference: bool, clip: str | None = None,
                     clip_revision: str | None = None) -> dict[str, Any]:
    """The :class:`batch.metrics.extract.FeatureExtractor` arguments of the reference images
    (``reference=True``: crop/resize to ``fid.reference_size`` first) or of generated images (with CLIP): one
    place, so both sides go through the same weights and the same resize path (``fid.resize``)."""
    kw: dict[str, Any] = dict(inception=spec.fid.weights, clip=clip, storage_options=spec.storage_options,
                              reference=reference, resize=spec.fid.resize, batch_size=spec.features.batch_size)
    if reference:
        kw["reference_size"] = spec.fid.reference_size
    else:
        kw["clip_revision"] = clip_revision
    return kw


def reference_statistics(images_uri: str, spec: StatsSpec, cache: str | None = None) -> ReferenceStats:
    """Reference (mu, sigma) of a folder of images: from the cache when present, else computed through the
    feature stage and stored (``<cache>/<key>.npz`` plus ``<key>.json`` describing it). A cache hit starts
    no Ray and loads no network."""
    from batch.metrics.fid import statistics
    from batch.metrics.inception import cache_dir, file_sha256, resolve_weights
    from batch.store.io import open_output

    cache = cache or spec.fid.stats_cache or str(cache_dir() / "fid-stats")
    images = list_images(images_uri, spec.storage_options)
    weights = resolve_weights(spec.fid.weights)
    sha = file_sha256(weights)
    key = stats_key(sha, spec.fid.reference_size, images, spec.fid.resize)
    store = open_output(cache, spec.storage_options)
    about = dict(weights_sha256=sha, images=images_uri, num_files=len(images))
    if store.exists(f"{key}.npz"):
        with np.load(io.BytesIO(store.get(f"{key}.npz"))) as z:
            feats = z["features"] if "features" in z.files else None
            return ReferenceStats(z["mu"], z["sigma"], int(z["n"]), key, store.uri(f"{key}.npz"), cached=True,
                                  features=feats, **about)
    table = pa.table({"uri": [u for u, _ in images]})
    kwargs = extractor_kwargs(spec, reference=True)
    feats = score_images(table, kwargs, spec, desc="reference features")
    good = feats.filter(pc.is_null(feats.column("feature_error")))
    errors = [e for e in feats.column("feature_error").to_pylist() if e is not None]
    if good.num_rows < 2:
        raise SpecError(f"reference images: only {good.num_rows} readable images under {images_uri}; "
                        f"first errors: {errors[:3]}")
    feats_ref = feature_matrix(good.column("inception"))
    mu, sigma = statistics(feats_ref)
    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma, n=good.num_rows, features=feats_ref)
    store.put(f"{key}.npz", buf.getvalue())
    store.put_json(f"{key}.json", {"images": images_uri, "num_images": len(images), "num_used": good.num_rows,
                                   "unreadable": errors[:100], "weights": spec.fid.weights,
                                   "weights_file": str(weights), "weights_sha256": sha,
                                   "reference_size": spec.fid.reference_size, "resize": spec.fid.resize,
                                   "created_at": now()})
    return ReferenceStats(mu, sigma, good.num_rows, key, store.uri(f"{key}.npz"), cached=False, features=feats_ref,
                          **about)


def score_images(table: pa.Table, kwargs: dict, spec: StatsSpec, desc: str) -> pa.Table:
    """Run the feature stage (:class:`batch.metrics.extract.FeatureExtractor` as a Ray actor pool) over
    ``table``; results in input order. Uses the running Ray if there is one, else starts (and afterwards
    stops) one as the job does (:func:`batch.run.pipeline.ray_session`)."""
    from tqdm.auto import tqdm

    from batch.run import pipeline

    if table.num_rows == 0:
        raise ScoringError(f"no images to score ({desc}): the input table is empty")
    f = spec.features
    compute = parse_spec({"ray_address": spec.ray_address, "device": f.device, "actors": f.actors,
                          "gpus_per_actor": f.gpus_per_actor, "cpus_per_actor": f.cpus_per_actor, "writer_cpus": 0.25})
    with pipeline.ray_session(compute) as res:
        table = table.append_column("_order", pa.array(range(table.num_rows), pa.int64()))
        out = []
        with tqdm(total=table.num_rows, unit="img", desc=desc, disable=not spec.progress, file=sys.stderr) as bar:
            for b in pipeline.run_features(table, kwargs, res, f.rows_per_block):
                out.append(b)
                bar.update(b.num_rows)
    result = pa.concat_tables(out)
    return result.take(pc.sort_indices(result, [("_order", "ascending")])).drop_columns(["_order"])


def feature_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """(N, 2048) float32 matrix of a non-null ``inception`` column, without Python-object round trips."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.null_count:
        raise ValueError("feature column has nulls; filter failed rows first")
    if len(arr) == 0:
        return np.zeros((0, 0), np.float32)
    lengths = pc.list_value_length(arr)
    width = int(pc.min(lengths).as_py())
    if int(pc.max(lengths).as_py()) != width:
        raise ValueError("feature rows differ in length")
    return arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(arr), width)

"""Guidance-scale Pareto evaluation: FID and CLIP score of each model at each guidance scale on COCO prompts.

    sdbatch eval CONFIG --coco-captions captions_val2017.json --coco-images val2017/ --output OUT [--limit N]

1. read the COCO ``captions_*.json`` and draw a seeded sample of N captions (:func:`sample_prompts`);
   each gets one explicit seed, used at every scale and by every model (paired comparison);
2. reference statistics of the COCO images: computed once through the feature stage and cached under a key
   naming the Inception weights (sha256), the preprocessing and the image set (:func:`reference_statistics`);
3. per model: one manifest (one row per prompt x scale, ``guidance_scale`` per row) and one ordinary
   :func:`batch.run.job.run_job` into ``OUT/generations/<model-slug>/`` -- the same Ray job as ``sdbatch run``;
   images stay there, so metrics can be recomputed; a model whose run already finished is not regenerated;
4. every generated image through the feature stage (:func:`batch.run.pipeline.run_features`: Inception pool
   features + CLIP score per image, on GPU actors on a cluster); per-image scores are stored;
5. the driver reduces: per (model, scale) FID against the reference statistics, mean CLIP score, 95%
   percentile-bootstrap intervals, n; then ``results.parquet``, ``results.json``, ``results.md``,
   ``pareto.png`` and the run record ``eval.json`` (which holds the Markdown table too).

Output layout under OUT::

    prompts.parquet                    the sampled prompts (annotation id, image id, caption, seed)
    manifests/<slug>.parquet           the generation manifest of each model
    generations/<slug>/                each model's ordinary sdbatch run (images, metadata, run.json, _SUCCESS)
    scores/<slug>.parquet              per image: id, guidance_scale, clip_score, inception features, errors
    results.parquet / .json / .md      per (model, scale): fid, fid_lo, fid_hi, clip_score, clip_lo, clip_hi, n
    pareto.png                         FID vs CLIP score, one curve per model, points labelled by scale
    eval.json                          run record: spec, reference stats key, timings, the Markdown table
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from batch.spec.base import MAX_SEED, SchedulerName, SpecError, _Strict
from batch.spec.config import JobSpec, parse_spec
from batch.run.record import now as _now
from batch.metrics.clip import DEFAULT_CLIP
from batch.metrics.inception import FID_WEIGHTS_URL
from batch.plan.seeds import derive_row_seed

DEFAULT_SCALES = (1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
EVAL_RECORD = "eval.json"
# Fields an evaluation sets itself; ``generation`` may not override them.
_EVAL_OWNED = {"task", "model", "revision", "variant", "manifest", "output", "defaults", "run_id", "seed",
               "storage_options", "ray_address", "progress"}


class EvalError(RuntimeError):
    """The evaluation cannot score: a model's generation failed more rows than its ``max_failed_fraction``
    allows, or there are no images to score. The CLI prints it; ``eval.json`` says ``failed``."""


class EvalModel(_Strict):
    """One model of the sweep."""

    name: str = Field(min_length=1, max_length=64)  # label in plots/tables; slug for output keys
    model: str  # "tiny", a local diffusers folder, or a hub id
    revision: str | None = None
    variant: str | None = None
    scheduler: SchedulerName = "plms"  # model cards: PLMS for v1, DDIM for v2

    @field_validator("name")
    @classmethod
    def _slug_safe(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError("must be letters, digits, '.', '_' or '-' (it names an output folder)")
        return v


class FidSettings(_Strict):
    weights: str = FID_WEIGHTS_URL  # path or http(s) URL of pt_inception-2015-12-05-6726825d.pth
    reference_size: int = Field(512, ge=8)  # reference images: centre crop, bicubic to this side
    stats_cache: str | None = None  # where reference statistics are cached; null: ~/.cache/sdbatch/fid-stats
    bootstrap: int = Field(50, ge=0)  # resamples for the FID interval (each costs two 2048x2048 eigen-solves)


class ClipSettings(_Strict):
    model: str = DEFAULT_CLIP
    revision: str | None = None
    bootstrap: int = Field(1000, ge=0)  # resamples for the CLIP-score interval


class FeatureSettings(_Strict):
    """Compute for the feature stage (same meaning as the job spec's fields)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    actors: int | Literal["auto"] = "auto"
    gpus_per_actor: float | None = Field(None, ge=0)
    cpus_per_actor: float | None = Field(None, gt=0)
    batch_size: int = Field(32, ge=1)  # images per network call
    rows_per_block: int = Field(256, ge=1)  # images per Ray block


class StatsSpec(_Strict):
    """What ``sdbatch fid-stats`` needs: the FID settings, the feature stage's compute, storage."""

    fid: FidSettings = Field(default_factory=FidSettings)
    features: FeatureSettings = Field(default_factory=FeatureSettings)
    storage_options: dict[str, Any] = Field(default_factory=dict)
    ray_address: str | None = None
    progress: bool = True


class EvalSpec(StatsSpec):
    """A Pareto evaluation (``configs/eval-pareto-*.yaml``); unknown keys are errors. Its FID, feature,
    storage and Ray settings are :class:`StatsSpec`'s."""

    models: list[EvalModel] = Field(min_length=1)
    guidance_scales: list[float] = Field(default_factory=lambda: list(DEFAULT_SCALES), min_length=1)
    num_prompts: int = Field(10_000, ge=2)
    seed: int = Field(0, ge=0, lt=MAX_SEED)  # prompt sample and per-prompt image seeds
    num_inference_steps: int = Field(50, ge=1, le=1000)
    height: int = Field(512, ge=8, multiple_of=8)
    width: int = Field(512, ge=8, multiple_of=8)
    negative_prompt: str | None = None
    clip: ClipSettings = Field(default_factory=ClipSettings)
    generation: dict[str, Any] = Field(default_factory=dict)  # job-spec fields: dtype, device, batch_size, ...

    @field_validator("guidance_scales")
    @classmethod
    def _scales(cls, v: list[float]) -> list[float]:
        if any(not math.isfinite(g) or g <= 0 for g in v):
            raise ValueError("every scale must be a finite number > 0")
        if len(set(v)) != len(v):
            raise ValueError("scales must be distinct")
        return v

    @model_validator(mode="after")
    def _check(self) -> "EvalSpec":
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"models: names must be distinct, got {names}")
        owned = sorted(set(self.generation) & _EVAL_OWNED)
        if owned:
            raise ValueError(f"generation: {owned} are set by the evaluation itself")
        job_spec(self, self.models[0], "manifest", "output")  # validates generation.* against JobSpec
        return self


def job_spec(spec: EvalSpec, m: EvalModel, manifest: str, output: str) -> JobSpec:
    """The ordinary job spec that generates model ``m``'s images (errors name ``generation.<field>``)."""
    data = {**spec.generation, "task": "txt2img", "model": m.model, "revision": m.revision, "variant": m.variant,
            "manifest": manifest, "output": output, "seed": spec.seed, "storage_options": spec.storage_options,
            "ray_address": spec.ray_address, "progress": spec.progress,
            "defaults": {"height": spec.height, "width": spec.width, "num_inference_steps": spec.num_inference_steps,
                         "scheduler": m.scheduler, "negative_prompt": spec.negative_prompt}}
    try:
        return parse_spec(data, "generation")
    except SpecError as err:
        raise ValueError(str(err).replace("\n  ", "\n  generation.")) from None


def load_eval_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> EvalSpec:
    """Load and validate an evaluation YAML; :class:`SpecError` names every bad field."""
    from batch.spec.config import apply_overrides

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise SpecError(f"evaluation spec not found: {path}") from None
    except yaml.YAMLError as err:
        raise SpecError(f"evaluation spec {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise SpecError(f"invalid evaluation spec ({path}): expected a mapping at the top level")
    try:
        return EvalSpec.model_validate(apply_overrides(data, overrides or {}))
    except ValidationError as err:
        lines = [f"invalid evaluation spec ({path}):"]
        for e in err.errors():
            field = ".".join(str(p) for p in e["loc"]) or "<root>"
            lines.append(f"  {field}: {e['msg']}")
        raise SpecError("\n".join(lines)) from None


# ---------------------------------------------------------------------------------------------- 1. prompts


def read_coco_captions(uri: str, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """The caption annotations of a COCO ``captions_*.json`` (``{"images": [...], "annotations": [{"id",
    "image_id", "caption"}, ...]}``) as a table (annotation_id, image_id, file_name, caption), sorted by
    annotation id; captions are whitespace-normalised (COCO has stray newlines and trailing spaces)."""
    import fsspec

    try:
        with fsspec.open(uri, "rb", **(storage_options or {})) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise SpecError(f"COCO captions file not found: {uri}") from None
    except json.JSONDecodeError as err:
        raise SpecError(f"COCO captions file {uri} is not JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise SpecError(f"{uri} is not a COCO captions file: no 'annotations' list")
    files = {im.get("id"): im.get("file_name") for im in data.get("images") or [] if isinstance(im, dict)}
    rows = []
    for k, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or not isinstance(a.get("caption"), str) or a.get("id") is None:
            raise SpecError(f"{uri}: annotations[{k}] needs an 'id' and a 'caption' string")
        caption = " ".join(a["caption"].split())
        if caption:
            rows.append({"annotation_id": int(a["id"]), "image_id": int(a.get("image_id", -1)),
                         "file_name": files.get(a.get("image_id")), "caption": caption})
    rows.sort(key=lambda r: r["annotation_id"])
    if len({r["annotation_id"] for r in rows}) != len(rows):
        raise SpecError(f"{uri}: annotation ids are not unique")
    return pa.Table.from_pylist(rows, schema=pa.schema([("annotation_id", pa.int64()), ("image_id", pa.int64()),
                                                        ("file_name", pa.string()), ("caption", pa.string())]))


def sample_prompts(captions: pa.Table, n: int, seed: int) -> pa.Table:
    """A documented, reproducible sample of ``n`` captions, each with its own image seed.

    1. the caption annotations sorted by annotation id (:func:`read_coco_captions`);
    2. the first ``n`` of ``numpy.random.default_rng(seed).permutation(len)`` (PCG64): ``n`` distinct
       annotations (an image may contribute several of its captions, as in the model cards' "10,000 random
       COCO2017 validation prompts"), in the drawn order; so a smaller sample (``--limit``) is exactly the
       head of a larger one with the same seed, prompts and image seeds alike;
    3. each prompt's image seed is ``derive_row_seed(seed, "coco-<annotation_id>")`` (:mod:`batch.plan.seeds`),
       the same at every guidance scale and for every model: scales and models are compared paired.
    """
    if n > captions.num_rows:
        raise SpecError(f"num_prompts={n} but the captions file has only {captions.num_rows} captions")
    idx = np.random.default_rng(seed).permutation(captions.num_rows)[:n]
    out = captions.take(pa.array(idx))
    seeds = [derive_row_seed(seed, f"coco-{a}") for a in out.column("annotation_id").to_pylist()]
    return out.append_column("seed", pa.array(seeds, pa.int64()))


def build_manifest(prompts: pa.Table, scales: list[float], model_name: str) -> pa.Table:
    """One manifest row per (prompt, scale): ``id`` = ``coco-<annotation_id>-g<scale>``, the prompt's seed,
    ``guidance_scale``; the COCO ids and the model name ride along as carried columns."""
    rows = []
    for p in prompts.to_pylist():
        for g in scales:
            rows.append({"id": f"coco-{p['annotation_id']}-g{g:g}", "prompt": p["caption"], "seed": p["seed"],
                         "guidance_scale": float(g), "coco_annotation_id": p["annotation_id"],
                         "coco_image_id": p["image_id"], "eval_model": model_name})
    return pa.Table.from_pylist(rows, schema=pa.schema([
        ("id", pa.string()), ("prompt", pa.string()), ("seed", pa.int64()), ("guidance_scale", pa.float64()),
        ("coco_annotation_id", pa.int64()), ("coco_image_id", pa.int64()), ("eval_model", pa.string())]))


# ------------------------------------------------------------------------------------ 2. reference statistics


@dataclass
class ReferenceStats:
    mu: np.ndarray
    sigma: np.ndarray
    n: int
    key: str
    uri: str
    cached: bool  # True when read from the cache rather than computed


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


def stats_key(weights_sha256: str, reference_size: int, images: list[tuple[str, int]]) -> str:
    """Cache key: the Inception weights (sha256), the preprocessing, and the image set (names and sizes)."""
    from batch.metrics.fid import preprocessing_tag

    names = "\n".join(f"{u.rsplit('/', 1)[-1]}\t{s}" for u, s in images)
    images_hash = hashlib.sha256(names.encode()).hexdigest()[:12]
    return f"inception-{weights_sha256[:12]}_{preprocessing_tag(reference_size)}_{len(images)}img-{images_hash}"


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
    key = stats_key(file_sha256(weights), spec.fid.reference_size, images)
    store = open_output(cache, spec.storage_options)
    if store.exists(f"{key}.npz"):
        with np.load(io.BytesIO(store.get(f"{key}.npz"))) as z:
            return ReferenceStats(z["mu"], z["sigma"], int(z["n"]), key, store.uri(f"{key}.npz"), cached=True)
    table = pa.table({"uri": [u for u, _ in images]})
    kwargs = dict(inception=spec.fid.weights, clip=None, storage_options=spec.storage_options, reference=True,
                  reference_size=spec.fid.reference_size, batch_size=spec.features.batch_size)
    feats = _run_features(table, kwargs, spec, desc="reference features")
    good = feats.filter(pc.is_null(feats.column("feature_error")))
    errors = [e for e in feats.column("feature_error").to_pylist() if e is not None]
    if good.num_rows < 2:
        raise SpecError(f"reference images: only {good.num_rows} readable images under {images_uri}; "
                        f"first errors: {errors[:3]}")
    mu, sigma = statistics(feature_matrix(good.column("inception")))
    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma, n=good.num_rows)
    store.put(f"{key}.npz", buf.getvalue())
    store.put_json(f"{key}.json", {"images": images_uri, "num_images": len(images), "num_used": good.num_rows,
                                   "unreadable": errors[:100], "weights": spec.fid.weights,
                                   "weights_file": str(weights), "reference_size": spec.fid.reference_size,
                                   "created_at": _now()})
    return ReferenceStats(mu, sigma, good.num_rows, key, store.uri(f"{key}.npz"), cached=False)


def _run_features(table: pa.Table, kwargs: dict, spec: StatsSpec, desc: str) -> pa.Table:
    """Run the feature stage over ``table``; results in input order. Uses the running Ray if there is one,
    else starts (and afterwards stops) one as the job does."""
    from tqdm.auto import tqdm

    from batch.run import pipeline

    if table.num_rows == 0:
        raise EvalError(f"no images to score ({desc}): the input table is empty")
    f = spec.features
    compute = parse_spec({"ray_address": spec.ray_address, "device": f.device, "actors": f.actors,
                          "gpus_per_actor": f.gpus_per_actor, "cpus_per_actor": f.cpus_per_actor, "writer_cpus": 0.25})
    started = pipeline.init_ray(compute)
    try:
        res = pipeline.resolve_resources(compute, pipeline.cluster_resources(), local=pipeline.is_local(compute))
        table = table.append_column("_order", pa.array(range(table.num_rows), pa.int64()))
        out = []
        with tqdm(total=table.num_rows, unit="img", desc=desc, disable=not spec.progress, file=sys.stderr) as bar:
            for b in pipeline.run_features(table, kwargs, res, f.rows_per_block):
                out.append(b)
                bar.update(b.num_rows)
    finally:
        if started:
            pipeline.shutdown()
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


def _ray_spec(spec: StatsSpec) -> JobSpec:
    return parse_spec({"ray_address": spec.ray_address})


# ---------------------------------------------------------------------------------------- 5. reduction


def reduce_results(scores: pa.Table, ref: ReferenceStats, spec: EvalSpec) -> pa.Table:
    """Per (model, scale): n, FID vs the reference statistics, mean CLIP score, 95% bootstrap intervals."""
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


RESULTS_SCHEMA = pa.schema([("model", pa.string()), ("model_id", pa.string()), ("guidance_scale", pa.float64()),
                            ("n", pa.int64()), ("fid", pa.float64()), ("fid_lo", pa.float64()),
                            ("fid_hi", pa.float64()), ("clip_score", pa.float64()), ("clip_lo", pa.float64()),
                            ("clip_hi", pa.float64())])


def _fmt(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def markdown_table(results: pa.Table) -> str:
    """The results as a Markdown table (FID and CLIP score with their 95% intervals)."""
    lines = ["| model | guidance | n | FID | FID 95% CI | CLIP score | CLIP 95% CI |",
             "|---|---:|---:|---:|---|---:|---|"]
    for r in results.to_pylist():
        lines.append(f"| {r['model']} | {r['guidance_scale']:g} | {r['n']} | {_fmt(r['fid'])} | "
                     f"[{_fmt(r['fid_lo'])}, {_fmt(r['fid_hi'])}] | {_fmt(r['clip_score'], 3)} | "
                     f"[{_fmt(r['clip_lo'], 3)}, {_fmt(r['clip_hi'], 3)}] |")
    return "\n".join(lines) + "\n"


def _half(hi: float | None, lo: float | None) -> float:
    """A non-negative error-bar half-width; 0 where an interval end is missing (no bootstrap)."""
    if hi is None or lo is None or math.isnan(hi) or math.isnan(lo):
        return 0.0
    return max(0.0, hi - lo)


def pareto_plot(results: pa.Table, title: str = "") -> bytes:
    """PNG bytes: FID (y) against CLIP score (x), one curve per model, each point labelled by its scale,
    95% bootstrap intervals as error bars (the layout of the SD model cards' evaluation plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    rows = [r for r in results.to_pylist() if r["fid"] is not None and r["clip_score"] is not None]
    for name in dict.fromkeys(r["model"] for r in rows):
        pts = sorted((r for r in rows if r["model"] == name), key=lambda r: r["guidance_scale"])
        x = np.array([r["clip_score"] for r in pts])
        y = np.array([r["fid"] for r in pts])
        xerr = np.array([[_half(r["clip_score"], r["clip_lo"]), _half(r["clip_hi"], r["clip_score"])] for r in pts]).T
        yerr = np.array([[_half(r["fid"], r["fid_lo"]), _half(r["fid_hi"], r["fid"])] for r in pts]).T
        line = ax.errorbar(x, y, xerr=xerr, yerr=yerr, marker="o", capsize=2, label=name)
        for r in pts:
            ax.annotate(f"{r['guidance_scale']:g}", (r["clip_score"], r["fid"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8, color=line[0].get_color())
    ax.set_xlabel("CLIP score (100 x cosine)")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title(title or "FID vs CLIP score by guidance scale")
    ax.grid(alpha=0.3)
    if rows:
        ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- the run


@dataclass
class EvalResult:
    output: str
    results: pa.Table
    table_md: str
    reference: ReferenceStats
    seconds: float


def run_eval(spec: EvalSpec, coco_captions: str, coco_images: str, output: str, limit: int | None = None,
             stats_cache: str | None = None) -> EvalResult:
    """Run the whole evaluation (module docstring, steps 1-5) and return its results."""
    from batch.store.commit import RunExistsError
    from batch.run.record import package_versions, redact
    from batch.store.io import open_output

    t0 = time.perf_counter()
    out = open_output(output, spec.storage_options)
    if out.exists(EVAL_RECORD) and out.get_json(EVAL_RECORD).get("status") == "finished":
        raise RunExistsError(f"output {output} already holds a finished evaluation; choose a new output prefix")
    n = min(limit, spec.num_prompts) if limit else spec.num_prompts
    record: dict[str, Any] = {"status": "running", "spec": redact(spec.model_dump(mode="json")),
                              "coco_captions": coco_captions, "coco_images": coco_images, "num_prompts": n,
                              "limit": limit, "versions": package_versions(), "started_at": _now(), "timings": {}}
    out.put_json(EVAL_RECORD, record)

    try:
        return _run_eval(spec, coco_captions, coco_images, output, out, n, record, stats_cache, t0)
    except BaseException as err:  # the run record says the evaluation died (or failed), and why
        status = "failed" if isinstance(err, EvalError) else "crashed"
        out.put_json(EVAL_RECORD, {**record, "status": status, "error": f"{type(err).__name__}: {err}",
                                   f"{status}_at": _now()})
        raise


def _run_eval(spec: EvalSpec, coco_captions: str, coco_images: str, output: str, out, n: int, record: dict,
              stats_cache: str | None, t0: float) -> EvalResult:
    from batch.run import pipeline
    from batch.store.commit import RunExistsError
    from batch.run.job import run_job
    from batch.store.commit import read_metadata

    # 1. prompts
    prompts = sample_prompts(read_coco_captions(coco_captions, spec.storage_options), n, spec.seed)
    out.put_parquet("prompts.parquet", prompts)

    started = pipeline.init_ray(_ray_spec(spec))
    try:
        # 2. reference statistics (cached)
        t = time.perf_counter()
        ref = reference_statistics(coco_images, spec, stats_cache)
        record["reference"] = {"key": ref.key, "uri": ref.uri, "n": ref.n, "cached": ref.cached}
        record["timings"]["reference_s"] = time.perf_counter() - t

        # 3. generation: one ordinary run per model
        t = time.perf_counter()
        metas = []
        for m in spec.models:
            man_key, gen_key = f"manifests/{m.name}.parquet", f"generations/{m.name}"
            gen_uri = out.uri(gen_key)
            manifest = build_manifest(prompts, spec.guidance_scales, m.name)
            if out.exists(man_key):
                # an earlier (finished or interrupted) generation is continued only for exactly this manifest
                cols = ["id", "prompt", "seed", "guidance_scale"]
                earlier = pq.read_table(io.BytesIO(out.get(man_key))).select(cols)
                if not earlier.equals(manifest.select(cols)):
                    raise RunExistsError(f"{gen_uri} holds a generation for a different prompt sample or "
                                         "scales; choose a new output prefix")
            else:
                out.put_parquet(man_key, manifest)
            job = job_spec(spec, m, out.uri(man_key), gen_uri)
            summary = run_job(job)  # resumes an interrupted generation; a finished one has nothing left to do
            if summary.images_this_attempt == 0:
                record.setdefault("reused_generations", []).append(m.name)
            record.setdefault("generations", {})[m.name] = {"output": gen_uri, "run_id": summary.run_id,
                                                            "images_ok": summary.images_ok,
                                                            "images_generated_now": summary.images_this_attempt,
                                                            "rows_failed": summary.rows_failed,
                                                            "images_per_second": summary.images_per_second}
            if summary.exit_code != 0:  # more failed rows than generation.max_failed_fraction allows
                raise EvalError(f"generation of model {m.name!r} failed: {summary.rows_failed} of {summary.rows} "
                                f"rows failed, above generation.max_failed_fraction={job.max_failed_fraction}; "
                                f"failure reasons: {dict(summary.failure_reasons)}; see {gen_uri} "
                                "(sdbatch status / retry-failed)")
            meta = read_metadata(gen_uri, spec.storage_options)
            metas.append(meta.filter(pc.equal(meta.column("status"), "ok"))
                         .select(["id", "prompt", "guidance_scale", "seed", "uri", "member", "eval_model",
                                  "coco_annotation_id"]))
        record["timings"]["generation_s"] = time.perf_counter() - t

        # 4. features of every generated image (Ray actors), per-image scores stored
        t = time.perf_counter()
        images = pa.concat_tables(metas)
        if images.num_rows == 0:
            raise EvalError("no images to score: every model's generation finished with 0 ok images "
                            f"({ {m: g['rows_failed'] for m, g in record['generations'].items()} } rows failed; "
                            "generation.max_failed_fraction allowed it)")
        kwargs = dict(inception=spec.fid.weights, clip=spec.clip.model, clip_revision=spec.clip.revision,
                      storage_options=spec.storage_options, reference=False, batch_size=spec.features.batch_size)
        scores = _run_features(images, kwargs, spec, desc="features")
        for m in spec.models:
            out.put_parquet(f"scores/{m.name}.parquet",
                            scores.filter(pc.equal(scores.column("eval_model"), m.name)))
        record["timings"]["features_s"] = time.perf_counter() - t
    finally:
        if started:
            pipeline.shutdown()

    # 5. reduce, tabulate, plot
    t = time.perf_counter()
    results = reduce_results(scores, ref, spec)
    table_md = markdown_table(results)
    out.put_parquet("results.parquet", results)
    out.put_json("results.json", {"reference": record["reference"], "num_prompts": n,
                                  "results": results.to_pylist()})
    out.put("results.md", table_md.encode())
    out.put("pareto.png", pareto_plot(results, f"FID vs CLIP score, {n} COCO prompts"))
    record["timings"]["reduce_s"] = time.perf_counter() - t
    feature_failures = scores.num_rows - int(pc.sum(pc.is_null(scores.column("feature_error"))).as_py() or 0)
    record.update(status="finished", finished_at=_now(), results=results.to_pylist(), table_markdown=table_md,
                  images_scored=scores.num_rows - feature_failures, feature_failures=feature_failures)
    out.put_json(EVAL_RECORD, record)
    return EvalResult(output, results, table_md, ref, time.perf_counter() - t0)

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

import io
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batch.eval.coco import build_manifest, read_coco_captions, sample_prompts
from batch.eval.report import markdown_table, pareto_plot
from batch.eval.spec import EvalSpec, job_spec
from batch.metrics.reduce import reduce_results
from batch.metrics.reference import ReferenceStats, ScoringError, reference_statistics, score_images
from batch.metrics.settings import StatsSpec
from batch.run.record import now as _now
from batch.spec.config import JobSpec, parse_spec

EVAL_RECORD = "eval.json"


class EvalError(ScoringError):
    """The evaluation cannot score: a model's generation failed more rows than its ``max_failed_fraction``
    allows, or there are no images to score. The CLI prints it; ``eval.json`` says ``failed``."""


@dataclass
class EvalResult:
    output: str
    results: pa.Table
    table_md: str
    reference: ReferenceStats
    seconds: float


def _ray_spec(spec: StatsSpec) -> JobSpec:
    return parse_spec({"ray_address": spec.ray_address})


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
        status = "failed" if isinstance(err, ScoringError) else "crashed"
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

    with pipeline.ray_attached(_ray_spec(spec)):  # one Ray for the reference, the generations and the features
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
        scores = score_images(images, kwargs, spec, desc="features")
        for m in spec.models:
            out.put_parquet(f"scores/{m.name}.parquet",
                            scores.filter(pc.equal(scores.column("eval_model"), m.name)))
        record["timings"]["features_s"] = time.perf_counter() - t

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

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
5. the driver reduces (:func:`batch.metrics.reduce.reduce_results`): per (model, scale) FID against the
   reference statistics with its 95% jackknife interval, KID against the reference features, mean CLIP score
   with its 95% percentile-bootstrap interval, n; then ``results.parquet``, ``results.json``, ``results.md``,
   ``pareto.png`` and the run record ``eval.json`` (which holds the Markdown table too). Every one of them
   carries the comparability record (:func:`comparability`): what the numbers are comparable with.

While it runs, a background thread rewrites ``eval.json`` every :data:`HEARTBEAT_SECONDS` with a fresh
``heartbeat`` (unix time), host and pid, so a reader (``sdbatch status OUT``, :func:`eval_state`) tells a
running evaluation from one whose driver was killed (``abandoned``).

Output layout under OUT::

    prompts.parquet                    the sampled prompts (annotation id, image id, caption, seed)
    manifests/<slug>.parquet           the generation manifest of each model
    generations/<slug>/                each model's ordinary sdbatch run (images, metadata, run.json, _SUCCESS)
    scores/<slug>.parquet              per image: id, guidance_scale, clip_score, inception features, errors
    results.parquet / .json / .md      per (model, scale): n, fid, fid_lo, fid_hi, fid_se, kid, kid_std,
                                       kid_subset_size, clip_score, clip_lo, clip_hi (+ comparability in .json/.md)
    pareto.png                         FID vs CLIP score (and KID vs CLIP score), one curve per model
    eval.json                          run record: spec, reference stats key, timings, heartbeat, comparability,
                                       the Markdown table
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batch.eval.coco import build_manifest, read_coco_captions, sample_prompts
from batch.eval.report import comparability_caption, comparability_markdown, markdown_table, pareto_plot
from batch.eval.spec import EvalSpec, job_spec
from batch.metrics.reduce import reduce_results
from batch.metrics.reference import (ReferenceStats, ScoringError, extractor_kwargs, reference_statistics,
                                     score_images)
from batch.metrics.settings import StatsSpec
from batch.run.record import now as _now
from batch.spec.config import JobSpec, parse_spec

EVAL_RECORD = "eval.json"
HEARTBEAT_SECONDS = 30.0
ABANDONED_AFTER = 120.0  # a running record whose heartbeat is older than this: its driver is gone (as a lease)


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


class RecordWriter:
    """Writes ``eval.json`` (the dict ``record``) on request and, from a daemon thread, every
    ``HEARTBEAT_SECONDS`` with a new ``heartbeat``; one lock orders the writes."""

    def __init__(self, out, record: dict, interval: float = HEARTBEAT_SECONDS):
        self.out, self.record, self.interval = out, record, interval
        self._lock = threading.Lock()
        self._stop = threading.Event()
        record.update(host=socket.gethostname(), pid=os.getpid(), heartbeat_seconds=interval)
        self.write()
        self._thread = threading.Thread(target=self._loop, name="sdbatch-eval-heartbeat", daemon=True)
        self._thread.start()

    def write(self, **updates: Any) -> None:
        with self._lock:
            self.record.update(updates, heartbeat=time.time())
            self.out.put_json(EVAL_RECORD, dict(self.record))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):  # a missed beat is not fatal; the next one retries
                self.write()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def eval_state(record: dict, now: float | None = None) -> str:
    """``finished``/``failed``/``crashed`` as recorded; for ``running``: ``running`` while the heartbeat is
    fresh, ``abandoned`` when it is older than :data:`ABANDONED_AFTER` or its driver's pid is gone on this
    host (a killed driver writes nothing)."""
    from batch.store.commit import _pid_alive

    status = record.get("status", "unknown")
    if status != "running":
        return status
    age = (time.time() if now is None else now) - float(record.get("heartbeat") or 0)
    dead_here = record.get("host") == socket.gethostname() and not _pid_alive(int(record.get("pid", -1)))
    return "abandoned" if age > ABANDONED_AFTER or dead_here else "running"


def comparability(spec: EvalSpec, ref: ReferenceStats, coco_images: str, num_prompts: int) -> dict[str, Any]:
    """What the numbers are comparable with: N, reference set and its preprocessing, resize path, weights,
    interval methods, CLIP model/aggregation/truncation, and the generation settings of each model."""
    from batch.metrics.fid import RESIZE_DETAIL

    size = spec.fid.reference_size
    return {
        "n_generated_per_point": num_prompts,
        "reference": {"name": coco_images, "files": ref.num_files, "n": ref.n, "key": ref.key,
                      "preprocessing": f"centre crop to the largest square, PIL bicubic (antialiased) to "
                                       f"{size}x{size}, uint8"},
        "resize": spec.fid.resize, "resize_detail": RESIZE_DETAIL[spec.fid.resize],
        "inception_weights": spec.fid.weights, "inception_weights_sha256": ref.weights_sha256,
        "fid_interval": f"95% delete-a-block jackknife (min({spec.fid.jackknife_blocks}, N // 2) groups, Student t) of "
                        "E[FID_N]: the expected FID at this N against this reference set (not FID at infinite N)",
        "kid": {"estimator": "unbiased MMD^2, kernel (x.y/d + 1)^3", "subsets": spec.kid.subsets,
                "subset_size": f"min({spec.kid.subset_size}, N, reference n)",
                "std": "standard deviation over subsets (torch-fidelity's kid_std)"},
        "clip": {"model": spec.clip.model, "revision": spec.clip.revision or "unpinned",
                 "aggregation": "mean over images of 100 * max(cos, 0) (per-image clamp, Hessel et al. 2021; "
                                "torchmetrics clamps the mean instead)",
                 "truncation": "77 tokens, end-of-text token kept (OpenAI clip.tokenize truncate=True; "
                               "torchmetrics drops it)",
                 "interval": f"95% percentile bootstrap of the mean ({spec.clip.bootstrap} resamples)"},
        "generation": {"steps": spec.num_inference_steps, "height": spec.height, "width": spec.width,
                       "negative_prompt": spec.negative_prompt, "seed": spec.seed,
                       "models": {m.name: {"model": m.model, "revision": m.revision, "scheduler": m.scheduler,
                                           "dtype": job_spec(spec, m, "manifest", "output").dtype}  # "auto"
                                                                          # until the images say which
                                  for m in spec.models}},
    }


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
    writer = RecordWriter(out, record)
    try:
        return _run_eval(spec, coco_captions, coco_images, output, out, n, writer, stats_cache, t0)
    except BaseException as err:  # the run record says the evaluation died (or failed), and why
        status = "failed" if isinstance(err, ScoringError) else "crashed"
        writer.stop()
        writer.write(status=status, error=f"{type(err).__name__}: {err}", **{f"{status}_at": _now()})
        raise
    finally:
        writer.stop()


def _run_eval(spec: EvalSpec, coco_captions: str, coco_images: str, output: str, out, n: int,
              writer: RecordWriter, stats_cache: str | None, t0: float) -> EvalResult:
    from batch.run import pipeline
    from batch.store.commit import RunExistsError
    from batch.run.job import run_job
    from batch.store.commit import read_metadata

    record = writer.record
    # 1. prompts
    prompts = sample_prompts(read_coco_captions(coco_captions, spec.storage_options), n, spec.seed)
    out.put_parquet("prompts.parquet", prompts)

    with pipeline.ray_attached(_ray_spec(spec)):  # one Ray for the reference, the generations and the features
        # 2. reference statistics (cached)
        t = time.perf_counter()
        ref = reference_statistics(coco_images, spec, stats_cache)
        record["reference"] = {"key": ref.key, "uri": ref.uri, "n": ref.n, "cached": ref.cached}
        record["timings"]["reference_s"] = time.perf_counter() - t
        comp = comparability(spec, ref, coco_images, n)
        writer.write(comparability=comp)

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
            used = sorted({v for v in meta.column("dtype").to_pylist() if v}) if "dtype" in meta.column_names else []
            if used:  # the dtype the images were made with (the spec may say "auto")
                comp["generation"]["models"][m.name]["dtype"] = "/".join(used)
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
        kwargs = extractor_kwargs(spec, reference=False, clip=spec.clip.model, clip_revision=spec.clip.revision)
        scores = score_images(images, kwargs, spec, desc="features")
        for m in spec.models:
            out.put_parquet(f"scores/{m.name}.parquet",
                            scores.filter(pc.equal(scores.column("eval_model"), m.name)))
        record["timings"]["features_s"] = time.perf_counter() - t

    # 5. reduce, tabulate, plot
    t = time.perf_counter()
    results = reduce_results(scores, ref, spec)
    table_md = markdown_table(results) + "\n" + comparability_markdown(comp)
    out.put_parquet("results.parquet", results)
    out.put_json("results.json", {"reference": record["reference"], "num_prompts": n, "comparability": comp,
                                  "results": results.to_pylist()})
    out.put("results.md", table_md.encode())
    out.put("pareto.png", pareto_plot(results, f"FID vs CLIP score, {n} COCO prompts",
                                      caption=comparability_caption(comp)))
    record["timings"]["reduce_s"] = time.perf_counter() - t
    feature_failures = scores.num_rows - int(pc.sum(pc.is_null(scores.column("feature_error"))).as_py() or 0)
    writer.stop()
    writer.write(status="finished", finished_at=_now(), results=results.to_pylist(), table_markdown=table_md,
                 images_scored=scores.num_rows - feature_failures, feature_failures=feature_failures)
    return EvalResult(output, results, table_md, ref, time.perf_counter() - t0)

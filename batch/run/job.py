"""A batch job from spec to completion marker, exactly once across crashes and restarts.

:func:`run_job` runs five named steps:

1. :func:`open_run`: open the output prefix and read the manifest; a prefix that already holds a run must
   hold the same run (same identity fields and manifest contents), and this attempt then resumes it;
   (then the lease is taken: one driver per run, ``batch.store.commit.Lease``);
2. :func:`plan_work`: validate and plan the manifest, read what earlier attempts committed and keep only
   the missing work (``retry_failed``: only the failed images);
3. :func:`record_attempt`: record the attempt in ``run.json``, open the committer and the run log, commit
   the failed rows' metadata;
4. :func:`stream_and_commit`: stream generated items from the Ray pipeline, committing a metadata part
   every ``commit_every`` rows or ``commit_seconds`` (an image counts as done only once a part holding
   its row is written);
5. :func:`finish`: counts over the whole run into the run record; ``_SUCCESS`` last, and only when every
   planned image and row has a committed record (else the run is ``incomplete``, exit code 3).

The protocol itself (parts, lease, latest-wins reading) is :mod:`batch.store.commit`; the numbers in the
summary are :mod:`batch.run.stats`; the run record's identity and redaction are :mod:`batch.run.record`.
"""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa

from batch.models.weights import locate
from batch.plan.dedup import dedup_work
from batch.plan.manifest import Plan, plan, read_manifest
from batch.plan.seeds import effective_run_seed
from batch.run import pipeline
from batch.run.record import check_same_run, manifest_digest, new_run_id, now, package_versions, redact, redact_arg
from batch.run.stats import EXIT_ENVIRONMENT, EXIT_ROWS_FAILED, Summary, call_ends, sampler_calls, steady_rate, tally, warmup_seconds
from batch.spec.config import JobSpec
from batch.spec.base import SpecError
from batch.store.commit import (
    RUN_RECORD,
    SLIM_COLUMNS,
    SUCCESS_MARKER,
    Lease,
    MetadataCommitter,
    Mode,
    RunExistsError,
    latest_rows,
    metadata_parts,
    new_attempt_id,
    read_parts,
    select_work,
)
from batch.store.formats import OutputFormat, apply_driver_writes, format_warnings
from batch.store.io import Output, open_output
from batch.store.runlog import RunLog
from batch.store.schema import RESERVED_COLUMNS


@dataclass
class OpenRun:
    """Step 1's result: the output prefix, the manifest, and the run record if the prefix holds one."""

    spec: JobSpec  # with the run's ``run_id`` filled in
    mode: Mode
    out: Output
    attempt: str
    manifest: pa.Table
    digest: str
    record: dict[str, Any] | None


@dataclass
class Work:
    """Step 2's result: the whole plan, what is already committed, and what this attempt must do."""

    plan: Plan
    carried: pa.Schema
    committed: pa.Table
    items: pa.Table
    failed: pa.Table
    skipped: pa.Table | None = None  # dedup_against: metadata rows of images reused from earlier runs
    dedup: dict[str, Any] = field(default_factory=dict)  # dedup_against: what the index cost (run.json)


@dataclass
class Attempt:
    """Step 3's result: this attempt's entry in the run record, its committer and its log."""

    record: dict[str, Any]
    entry: dict[str, Any]
    committer: MetadataCommitter
    log: RunLog


@dataclass
class Streamed:
    """Step 4's result: timings and the sampler calls seen (for throughput and warm-up)."""

    seconds: float = 0.0
    first_result_seconds: float = 0.0
    calls: dict[tuple, tuple[int, float]] = field(default_factory=dict)


def run_job(spec: JobSpec, mode: Mode = "run", force: bool = False) -> Summary:
    """Run (or resume, or retry the failed images of) one job; return the summary over the whole run.

    The steps are the module docstring's. Safe to call again on the same output after any crash.
    """
    if not spec.manifest or not spec.output:
        raise SpecError("a run needs both manifest and output (spec fields or --manifest/--output)")
    t_start = time.perf_counter()
    check_cluster_paths(spec, on_cluster=not pipeline.is_local(spec))
    run = open_run(spec, mode)  # 1
    lease = Lease(run.out, run.attempt, force)
    try:
        work = plan_work(run)  # 2
        # no Ray at all when nothing is left to do
        with pipeline.ray_session(run.spec, needed=work.items.num_rows > 0) as res:
            attempt = record_attempt(run, work, res)  # 3
            streamed = stream_and_commit(run, work, attempt, res)  # 4
    finally:
        lease.release()
    return finish(run, work, attempt, streamed, t_start)  # 5


def check_cluster_paths(spec: JobSpec, on_cluster: bool) -> None:
    """On a cluster (``ray job submit``, ``ray_address``), refuse a manifest or output that the other nodes
    cannot see: a relative or local path (it would land in Ray's per-job working-dir copy on one node, which
    Ray deletes later) unless under the spec's ``shared_paths``, and ``memory://`` (this process only)."""
    if not on_cluster:
        return
    from batch.plan.locations import LOCAL_PROTOCOLS

    for name in ("manifest", "output"):
        uri = getattr(spec, name)
        protocol, path = fsspec.core.split_protocol(uri)
        if protocol == "memory":
            raise SpecError(f"{name} {uri!r}: memory:// exists only in this process; on a cluster use an object "
                            "store URI (s3://..., gs://...)")
        if protocol is not None and protocol not in LOCAL_PROTOCOLS:
            continue
        real = os.path.abspath(path)
        if os.path.isabs(path) and any(real == p.rstrip("/") or real.startswith(p.rstrip("/") + "/")
                                       for p in map(os.path.abspath, spec.shared_paths)):
            continue
        raise SpecError(
            f"{name} {uri!r} is a {'relative' if not os.path.isabs(path) else 'local'} path, but the job runs on a "
            "cluster: other nodes cannot see it, and under `ray job submit` it lands in a per-job working "
            "directory that Ray deletes. Use an object store URI (s3://bucket/..., gs://...), or an absolute "
            "path on a mount every node shares, declared with --shared-path PATH (spec: shared_paths)")


def open_run(spec: JobSpec, mode: Mode) -> OpenRun:
    """Step 1: the output prefix, the manifest and its digest; a new run, or an attempt of the same run."""
    out = open_output(spec.output, spec.storage_options, retries=spec.storage_retries)
    locate(spec.model, spec.revision, spec.allow_pickle, spec.variant, resolve_hub=False)  # local preflight
    table = read_manifest(spec.manifest, spec.storage_options)
    digest = manifest_digest(table)
    record: dict[str, Any] | None = out.get_json(RUN_RECORD) if out.exists(RUN_RECORD) else None
    if record is None and metadata_parts(out):
        raise RunExistsError(f"output {spec.output} holds metadata but no {RUN_RECORD}; choose a new output prefix")
    if record is not None:
        check_same_run(record, spec, digest, spec.output)
        spec = spec.model_copy(update={"run_id": record["run_id"]})
    elif mode == "retry_failed":
        raise SpecError(f"output {spec.output} holds no run to retry")
    spec = spec.model_copy(update={"run_id": spec.run_id or new_run_id()})
    return OpenRun(spec=spec, mode=mode, out=out, attempt=new_attempt_id(), manifest=table, digest=digest,
                   record=record)


def plan_work(run: OpenRun) -> Work:
    """Step 2: the plan of the whole manifest minus what earlier attempts committed."""
    job_plan = plan(run.manifest, run.spec, RESERVED_COLUMNS)
    carried = pa.schema([run.manifest.schema.field(c) for c in job_plan.carried])
    committed = latest_rows(read_parts(run.out))
    items, failed = select_work(job_plan, committed, run.mode)
    # --- dedup across runs (issue 15, 4b): one separate call, to port into the chunked plan as it is ---
    items, skipped, dedup = dedup_work(run.spec, items)
    return Work(plan=job_plan, carried=carried, committed=committed, items=items, failed=failed, skipped=skipped,
                dedup=dedup)


def record_attempt(run: OpenRun, work: Work, res: pipeline.Resources | None) -> Attempt:
    """Step 3: this attempt's entry in ``run.json`` (a new record for a new run), the committer, the log
    (``logs/<run_id>.jsonl``), and the failed rows' metadata handed to the committer."""
    spec = run.spec
    entry = {"attempt": run.attempt, "mode": run.mode, "started_at": now(), "host": socket.gethostname(),
             "pid": os.getpid(), "argv": [redact_arg(a) for a in sys.argv], "resources": res and res.__dict__,
             "versions": package_versions(), "platform": platform.platform(),
             "images_to_do": work.items.num_rows, "images_committed_before": work.committed.num_rows}
    record = run.record
    if record is None:
        record = {"run_id": spec.run_id, "spec": redact(spec.model_dump(mode="json")),
                  "manifest_sha256": run.digest, "rows": work.plan.num_rows,
                  "images_planned": work.plan.items.num_rows, "created_at": now(), "attempts": []}
        # issue 15, 4c: the day and the run seed the rows without a seed derived theirs from
        record.update(date=spec.date, run_seed=effective_run_seed(spec))
    if work.dedup:  # issue 15, 4b
        entry["dedup"] = work.dedup
    record.update(status="running", attempt=run.attempt)
    record["attempts"].append(entry)
    run.out.put_json(RUN_RECORD, record)
    committer = MetadataCommitter(run.out, work.carried, spec.run_id, run.attempt, spec.commit_every,
                                  spec.commit_seconds)
    log = RunLog(run.out, spec.run_id)
    log.event("start", attempt=run.attempt, mode=run.mode, rows=work.plan.num_rows,
              images_planned=work.plan.items.num_rows, images_to_do=work.items.num_rows,
              images_committed_before=work.committed.num_rows, output_format=spec.output_format,
              image_format=spec.image_format, safety_policy=spec.safety_policy, resources=res and res.__dict__)
    for warning in format_warnings(OutputFormat.from_spec(spec)) + cpu_size_warnings(work.items, res):
        log.warning(warning)
    failed = work.failed
    for r in failed.select(["id", "manifest_row", "error"]).to_pylist():
        log.failure(**r, image_index=None)
    if failed.num_rows:
        committer.add(failed.append_column("status", pa.array(["failed"] * failed.num_rows)))
    if work.skipped is not None and work.skipped.num_rows:  # issue 15, 4b: reused images, recorded as done
        log.event("dedup", **work.dedup)
        committer.add(work.skipped)
    return Attempt(record=record, entry=entry, committer=committer, log=log)


CPU_HINT_PIXELS = 512 * 512  # above this per image, sampling on CPU takes minutes (measured: BENCHMARKS.md)


def cpu_size_warnings(items: pa.Table, res: pipeline.Resources | None) -> list[str]:
    """A hint when a CPU run holds large images: a 2048x2048 row is allowed (``limits.max_side``) but samples
    for many minutes on CPU, which otherwise looks like a hang."""
    if res is None or res.device != "cpu" or items.num_rows == 0 or "height" not in items.column_names:
        return []
    sizes = [(h or 0) * (w or 0) for h, w in zip(items.column("height").to_pylist(), items.column("width").to_pylist())]
    big = [s for s in sizes if s > CPU_HINT_PIXELS]
    if not big:
        return []
    side = int(max(big) ** 0.5)
    return [f"{len(big)} image(s) larger than 512x512 (up to about {side}x{side}) will be sampled on CPU: each can take "
            "many minutes (time grows with pixels and steps); use a GPU (--device cuda) or smaller sizes"]


def stream_and_commit(run: OpenRun, work: Work, attempt: Attempt, res: pipeline.Resources | None) -> Streamed:
    """Step 4: generate and write every item through the Ray pipeline; commit metadata as blocks finish.

    If the job itself dies here (not a row), the run record says so before the error propagates.
    """
    out, committer, log = run.out, attempt.committer, attempt.log
    streamed = Streamed()
    t_gen = time.perf_counter()
    with _progress(work.items.num_rows, run.spec.progress) as bar, \
            _record_failure(out, attempt.record, attempt.entry, log):
        batches = pipeline.run_items(work.items, run.spec, res, upload=not out.is_process_local) if res else iter(())
        done = 0
        for batch in batches:
            if "_puts" in batch.column_names:  # process-local filesystem: the driver writes (batch.store.formats)
                batch = apply_driver_writes(out, batch)
            committed_part = committer.add(batch)
            done += batch.num_rows
            _log_block(log, batch, done, committer.parts if committed_part else None)
            bar.update(batch.num_rows)
            streamed.calls.update(sampler_calls(batch))
            if not streamed.first_result_seconds:
                streamed.first_result_seconds = time.perf_counter() - t_gen
        if committer.flush():
            log.event("commit", parts=committer.parts, images_done=done)
    streamed.seconds = time.perf_counter() - t_gen
    return streamed


def finish(run: OpenRun, work: Work, attempt: Attempt, streamed: Streamed, t_start: float) -> Summary:
    """Step 5: counts over the whole run (earlier attempts included), the finished run record, the log's
    last event, then the ``_SUCCESS`` marker, written last."""
    spec, committer, entry, record = run.spec, attempt.committer, attempt.entry, attempt.record
    final = latest_rows(pa.concat_tables([work.committed.select(SLIM_COLUMNS)] + committer.committed))
    counts = tally(final, work.plan.num_rows, work.plan.items.num_rows)
    summary = Summary(run_id=spec.run_id, output=spec.output, attempt=run.attempt, **counts,
                      images_this_attempt=work.items.num_rows,
                      images_skipped=work.plan.items.num_rows - work.items.num_rows
                      - (work.skipped.num_rows if work.skipped is not None else 0),  # dedup: images_reused
                      seconds=time.perf_counter() - t_start, generate_seconds=streamed.seconds,
                      first_result_seconds=streamed.first_result_seconds,
                      steady_images_per_second=steady_rate(call_ends(streamed.calls)),
                      warmup_seconds=warmup_seconds(streamed.calls))
    frac = summary.rows_failed / summary.rows if summary.rows else 0.0
    # the marker only when it is true: every planned image and every row has a committed record
    summary.complete = counts["images_pending"] == 0 and counts["rows_ok"] + counts["rows_failed"] == counts["rows"]
    summary.exit_code = (0 if frac <= spec.max_failed_fraction else EXIT_ROWS_FAILED) if summary.complete \
        else EXIT_ENVIRONMENT
    status = "finished" if summary.complete else "incomplete"
    entry.update(status=status, finished_at=now(), metadata_parts=committer.parts,
                 images_per_second=summary.images_per_second, generate_seconds=streamed.seconds)
    record.update(status=status, finished_at=entry["finished_at"],
                  summary={k: v for k, v in summary.__dict__.items() if k != "output"})
    run.out.put_json(RUN_RECORD, record)
    attempt.log.event("finish", force=True, **{k: v for k, v in summary.__dict__.items() if k != "output"},
                      metadata_parts=committer.parts)
    if summary.complete:
        run.out.put_json(SUCCESS_MARKER, {"run_id": spec.run_id, "attempt": run.attempt,
                                          "finished_at": record["finished_at"], **counts})
    return summary


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc="generating", disable=not enabled, file=sys.stderr)


@contextlib.contextmanager
def _record_failure(out: Output, record: dict, entry: dict, log: RunLog | None = None):
    """If the job itself dies (not a row), say so in the run record before the error propagates."""
    try:
        yield
    except BaseException as err:
        if log is not None:
            with contextlib.suppress(Exception):
                log.event("crashed", force=True, error=f"{type(err).__name__}: {err}")
        entry.update(status="crashed", error=f"{type(err).__name__}: {err}", crashed_at=now())
        with contextlib.suppress(Exception):
            out.put_json(RUN_RECORD, {**record, "status": "crashed"})
        raise


def _log_block(log: RunLog, batch: pa.Table, done: int, committed_parts: int | None) -> None:
    """Structured log events for one finished block: its failures, the block, a commit if one happened."""
    rows = batch.select(["id", "manifest_row", "image_index", "status", "error"]).to_pylist()
    for r in rows:
        if r["status"] != "ok":
            log.failure(id=r["id"], manifest_row=r["manifest_row"], image_index=r["image_index"], error=r["error"])
    ok = sum(r["status"] == "ok" for r in rows)
    log.event("block", images=len(rows), ok=ok, failed=len(rows) - ok, images_done=done)
    if committed_parts is not None:
        log.event("commit", parts=committed_parts, images_done=done)

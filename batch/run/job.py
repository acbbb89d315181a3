"""A batch job from spec to completion marker, exactly once across crashes and restarts.

:func:`run_job` runs five named steps:

1. :func:`open_run`: open the output prefix and scan the manifest once, a chunk at a time (its digest, row
   count, columns and duplicate ids: :func:`batch.plan.manifest.scan_manifest`); a prefix that already holds a
   run must hold the same run (same identity fields and manifest contents), and this attempt then resumes it
   (then the lease is taken: one driver per run, ``batch.store.commit.Lease``);
2. :func:`plan_work`: read what earlier attempts committed, key columns only
   (:class:`batch.store.done.DoneIndex`);
3. :func:`record_attempt`: record the attempt in ``run.json``, open the committer and the run log;
4. :func:`stream_and_commit`: plan the manifest chunk by chunk (:func:`batch.plan.manifest.iter_plan`), keep
   only the missing work (``retry_failed``: also the failed images), commit failed rows, and run the items
   through the Ray pipeline in waves of ``wave_rows`` manifest rows, committing a metadata part every
   ``commit_every`` rows or ``commit_seconds`` (an image counts as done only once a part holding its row is
   written). The driver holds one wave at a time, never the whole manifest;
5. :func:`finish`: counts over the whole run into the run record, the dataset card (``README.md``,
   :mod:`batch.store.card`); ``_SUCCESS`` last, and only when every
   planned image and row has a committed record (else the run is ``incomplete``, exit code 3).

The protocol itself (parts, lease, latest-wins reading) is :mod:`batch.store.commit`; the numbers in the
summary are :mod:`batch.run.stats`; the run record's identity and redaction are :mod:`batch.run.record`.
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batch.models.weights import SAFETY_MODEL, SAFETY_NONE, locate, locate_safety_checker
from batch.plan.manifest import PLAN_CHUNK_ROWS, ManifestScan, failure_reason, iter_plan, scan_manifest
from batch.plan.sources import open_manifest
from batch.plan.dedup import Deduplicator
from batch.plan.seeds import effective_run_seed
from batch.run import pipeline
from batch.run.record import check_same_run, new_run_id, now, package_versions, redact, redact_arg
from batch.run.stats import EXIT_ENVIRONMENT, EXIT_ROWS_FAILED, Summary, call_ends, sampler_calls, steady_rate, warmup_seconds
from batch.spec.config import JobSpec
from batch.spec.base import SpecError
from batch.store.commit import (
    RUN_RECORD,
    SUCCESS_MARKER,
    Lease,
    MetadataCommitter,
    Mode,
    RunExistsError,
    metadata_parts,
    new_attempt_id,
)
from batch.store.done import DoneIndex
from batch.store.card import generation_identity, write_dataset_card
from batch.store.formats import OutputFormat, apply_driver_writes, format_warnings
from batch.store.io import Output, open_output
from batch.store.runlog import RunLog
from batch.store.schema import RESERVED_COLUMNS


def wave_chunks(spec: JobSpec) -> int:
    """Plan chunks per wave: ``spec.wave_rows`` rounded up to whole chunks (default 16 x 65,536 rows)."""
    return max(1, -(-spec.wave_rows // PLAN_CHUNK_ROWS))


@dataclass
class OpenRun:
    """Step 1's result: the output prefix, the manifest (opened, scanned once) and the run record if any."""

    spec: JobSpec  # with the run's ``run_id`` filled in
    mode: Mode
    out: Output
    attempt: str
    source: Any  # batch.plan.sources.ManifestSource
    scan: ManifestScan
    record: dict[str, Any] | None


@dataclass
class Work:
    """Step 2's result: what earlier attempts committed (key columns only)."""

    done: DoneIndex


@dataclass
class Attempt:
    """Step 3's result: this attempt's entry in the run record, its committer and its log."""

    record: dict[str, Any]
    entry: dict[str, Any]
    committer: MetadataCommitter
    log: RunLog


@dataclass
class Streamed:
    """Step 4's result: timings, the sampler calls seen (for throughput and warm-up), and the plan's totals."""

    seconds: float = 0.0
    first_result_seconds: float = 0.0
    calls: dict[tuple, tuple[int, float]] = field(default_factory=dict)
    images_planned: int = 0
    images_to_do: int = 0
    images_reused: int = 0  # dedup_against: skipped, an earlier run holds the image


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
        attempt = record_attempt(run, work)  # 3
        streamed = stream_and_commit(run, work, attempt)  # 4 (Ray starts with the first wave that has work)
    finally:
        lease.release()
        with contextlib.suppress(OSError):
            os.unlink(run.scan.row_hashes)
    return finish(run, work, attempt, streamed, t_start)  # 5


def check_cluster_paths(spec: JobSpec, on_cluster: bool) -> None:
    """On a cluster (``ray job submit``, ``ray_address``), refuse a manifest or output that the other nodes
    cannot see: a relative or local path (it would land in Ray's per-job working-dir copy on one node, which
    Ray deletes later) unless under the spec's ``shared_paths``, and ``memory://`` (this process only)."""
    if not on_cluster:
        return
    from batch.plan.locations import LOCAL_PROTOCOLS

    manifests = [spec.manifest] if isinstance(spec.manifest, str) else spec.manifest
    for name, uri in [("manifest", m) for m in manifests] + [("output", spec.output)]:
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
    """Step 1: the output prefix, the manifest scanned once (digest, rows, duplicate ids, row hashes); a new
    run, or an attempt of the same run. ``extend``: the run's manifest may have gained rows at its end; every
    row the run already had must be unchanged (compared by row hash), else the rows are named and refused."""
    out = open_output(spec.output, spec.storage_options, retries=spec.storage_retries)
    locate(spec.model, spec.revision, spec.allow_pickle, spec.variant, resolve_hub=False)  # local preflight
    if spec.safety_checker not in (SAFETY_MODEL, SAFETY_NONE):  # a bad checker folder fails here, not in actors
        locate_safety_checker(spec.safety_checker, spec.safety_checker_revision, spec.allow_pickle, resolve_hub=False)
    record: dict[str, Any] | None = out.get_json(RUN_RECORD) if out.exists(RUN_RECORD) else None
    if record is None and metadata_parts(out):
        raise RunExistsError(f"output {spec.output} holds metadata but no {RUN_RECORD}; choose a new output prefix")
    if record is None and mode == "retry_failed":
        raise SpecError(f"output {spec.output} holds no run to retry")
    source = open_manifest(spec.manifest, spec.storage_options)
    extending = mode == "extend" and record is not None
    if extending and not record.get("row_hashes"):
        raise RunExistsError(f"output {spec.output}: run {record.get('run_id')} stored no manifest row hashes (it was "
                             "made by an older sdbatch), so appended rows cannot be told from changed ones; use a "
                             "new output prefix")
    old_rows = int(record.get("rows") or 0) if extending else 0
    scan = scan_manifest(source, spec, RESERVED_COLUMNS, compare_rows=old_rows,
                         stored_hashes=lambda chunk: read_row_hashes(out, chunk))
    if record is not None:
        if extending:
            _check_extension(record, scan, spec.output)
            check_same_run(record, spec, record.get("manifest_sha256"), spec.output)  # identity fields only
        else:
            check_same_run(record, spec, scan.digest, spec.output)
        spec = spec.model_copy(update={"run_id": record["run_id"]})
    spec = spec.model_copy(update={"run_id": spec.run_id or new_run_id()})
    return OpenRun(spec=spec, mode=mode, out=out, attempt=new_attempt_id(), source=source, scan=scan, record=record)


ROW_HASHES = "manifest/rowhash-{:06d}.parquet"  # one object per plan chunk: uint64 hash of each manifest row


def read_row_hashes(out: Output, chunk: int) -> np.ndarray:
    """The row hashes a run stored for plan chunk ``chunk`` (empty when none)."""
    key = ROW_HASHES.format(chunk)
    if not out.exists(key):
        return np.zeros(0, np.uint64)
    return pq.read_table(io.BytesIO(out.get(key))).column("h").to_numpy().astype(np.uint64)


def store_row_hashes(out: Output, scan: ManifestScan, from_row: int) -> None:
    """Store the scan's row hashes (``manifest/rowhash-*``) of every plan chunk holding a row at or after
    ``from_row`` (a new run: all; an extended one: from its last old chunk on)."""
    hashes = np.memmap(scan.row_hashes, dtype=np.uint64, mode="r") if scan.rows else np.zeros(0, np.uint64)
    for start in range((from_row // PLAN_CHUNK_ROWS) * PLAN_CHUNK_ROWS, scan.rows, PLAN_CHUNK_ROWS):
        part = pa.table({"h": pa.array(np.asarray(hashes[start:start + PLAN_CHUNK_ROWS]), pa.uint64())})
        out.put_parquet(ROW_HASHES.format(start // PLAN_CHUNK_ROWS), part)


def _check_extension(record: dict[str, Any], scan: ManifestScan, output: str) -> None:
    """An extended manifest keeps the run's columns and every row it had, unchanged; it only adds rows."""
    old_rows = int(record.get("rows") or 0)
    if record.get("manifest_columns") and record["manifest_columns"] != scan.columns:
        raise RunExistsError(f"output {output}: --extend needs the run's manifest columns {record['manifest_columns']}, "
                             f"got {scan.columns}")
    if scan.rows < old_rows:
        raise RunExistsError(f"output {output}: --extend: the manifest has {scan.rows} rows, fewer than the "
                             f"{old_rows} of run {record.get('run_id')}; rows may only be appended")
    if scan.changed_count:
        named = ", ".join(f"row {r} (id {i!r})" for r, i in scan.changed)
        raise RunExistsError(f"output {output}: --extend: {scan.changed_count} row(s) the run already has differ from "
                             f"the manifest: {named}{' ...' if scan.changed_count > len(scan.changed) else ''}. "
                             "Rows may only be appended at the end; changed rows need a new output prefix")


def plan_work(run: OpenRun) -> Work:
    """Step 2: what earlier attempts committed, key columns only (bounded: :class:`DoneIndex`)."""
    return Work(done=DoneIndex.read(run.out))


def record_attempt(run: OpenRun, work: Work) -> Attempt:
    """Step 3: this attempt's entry in ``run.json`` (a new record for a new run), the committer and the log
    (``logs/<run_id>.jsonl``). The plan's totals (``images_planned``) are recorded when the attempt finishes:
    the plan streams, so they are known only then."""
    spec = run.spec
    entry = {"attempt": run.attempt, "mode": run.mode, "started_at": now(), "host": socket.gethostname(),
             "pid": os.getpid(), "argv": [redact_arg(a) for a in sys.argv], "resources": None,
             "versions": package_versions(), "platform": platform.platform(),
             "images_committed_before": work.done.records}
    record = run.record
    if record is None:
        record = {"run_id": spec.run_id, "spec": redact(spec.model_dump(mode="json")),
                  "manifest_sha256": run.scan.digest, "rows": run.scan.rows, "images_planned": None,
                  "manifest_columns": run.scan.columns, "plan_chunk_rows": PLAN_CHUNK_ROWS, "created_at": now(),
                  "attempts": []}
        # issue 15, 4c: the day and the run seed the rows without a seed derived theirs from
        record.update(date=spec.date, run_seed=effective_run_seed(spec))
    hashed = int(record.get("row_hashes") or 0)
    if hashed < run.scan.rows:  # a new run, or an extension's new rows (only after the lease is held)
        store_row_hashes(run.out, run.scan, hashed)
        record["row_hashes"] = run.scan.rows
    if run.scan.rows != record["rows"]:  # extended
        record.setdefault("extended", []).append({"attempt": run.attempt, "rows_before": record["rows"],
                                                  "rows": run.scan.rows, "manifest_sha256": run.scan.digest})
        record.update(rows=run.scan.rows, manifest_sha256=run.scan.digest, images_planned=None)
        if run.out.exists(SUCCESS_MARKER):  # the run was complete; with new rows it is not, until they are done
            run.out.delete(SUCCESS_MARKER)
    record.update(status="running", attempt=run.attempt)
    record["attempts"].append(entry)
    run.out.put_json(RUN_RECORD, record)
    committer = MetadataCommitter(run.out, run.scan.carried_schema, spec.run_id, run.attempt, spec.commit_every,
                                  spec.commit_seconds)
    log = RunLog(run.out, spec.run_id)
    log.event("start", attempt=run.attempt, mode=run.mode, rows=run.scan.rows,
              images_committed_before=work.done.records, output_format=spec.output_format,
              image_format=spec.image_format, safety_policy=spec.safety_policy)
    for warning in format_warnings(OutputFormat.from_spec(spec)):
        log.warning(warning)
    return Attempt(record=record, entry=entry, committer=committer, log=log)


def iter_waves(run: OpenRun, work: Work, dedup: Deduplicator) -> Iterator[tuple[int, pa.Table, pa.Table, pa.Table]]:
    """(images planned, items to do, failed rows to commit, skipped rows to commit) per wave of
    :func:`wave_chunks` plan chunks: the streaming plan (:func:`batch.plan.manifest.iter_plan`) minus what is
    committed (:meth:`DoneIndex.select`) minus what earlier runs hold (:class:`batch.plan.dedup.Deduplicator`)."""
    planned, items, failed, skipped = 0, [], [], []
    chunks = iter_plan(run.source.iter_batches(PLAN_CHUNK_ROWS), run.spec, run.scan.carried, run.scan.duplicates)
    for n, (_, chunk) in enumerate(chunks, 1):
        todo, bad = work.done.select(chunk.items, chunk.failed, run.mode)
        todo, reused = dedup.split(todo)
        planned += chunk.items.num_rows
        items.append(todo)
        failed.append(bad)
        if reused is not None and reused.num_rows:
            skipped.append(reused)
        if n % wave_chunks(run.spec) == 0:
            yield planned, pa.concat_tables(items), pa.concat_tables(failed), skipped
            planned, items, failed, skipped = 0, [], [], []
    if items:
        yield planned, pa.concat_tables(items), pa.concat_tables(failed), skipped


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


def stream_and_commit(run: OpenRun, work: Work, attempt: Attempt) -> Streamed:
    """Step 4: plan wave by wave; commit each wave's failed rows, then generate and write its items through the
    Ray pipeline (started with the first wave that has work), committing metadata as blocks finish.

    If the job itself dies here (not a row), the run record says so before the error propagates.
    """
    out, committer, log, spec = run.out, attempt.committer, attempt.log, run.spec
    streamed = Streamed()
    t_gen = time.perf_counter()
    done = 0
    with _progress(None, spec.progress) as bar, _record_failure(out, attempt.record, attempt.entry, log), \
            contextlib.ExitStack() as ray_stack:
        res: pipeline.Resources | None = None
        dedup = Deduplicator(spec)
        for planned, items, failed, skipped in iter_waves(run, work, dedup):
            reused = sum(t.num_rows for t in skipped)
            streamed.images_planned += planned
            streamed.images_to_do += items.num_rows
            streamed.images_reused += reused
            log.event("wave", images_planned=planned, images_to_do=items.num_rows, rows_failed=failed.num_rows,
                      images_reused=reused)
            for r in failed.select(["id", "manifest_row", "error"]).to_pylist():
                log.failure(**r, image_index=None)
            if failed.num_rows:
                committer.add(failed.append_column("status", pa.array(["failed"] * failed.num_rows)))
            for t in skipped:  # reused images, recorded as done (status skipped, the earlier image's uri)
                committer.add(t)
            if not items.num_rows:
                continue
            if res is None:  # no Ray at all when nothing is left to do
                res = ray_stack.enter_context(pipeline.ray_session(spec))
                attempt.entry["resources"] = res.__dict__
                log.event("resources", **res.__dict__)
            for warning in cpu_size_warnings(items, res) if spec.model != "none" else []:  # a dry run samples nothing
                log.warning(warning)
            for batch in pipeline.run_items(items, spec, res, upload=not out.is_process_local):
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
    if dedup.facts:
        attempt.entry["dedup"] = dedup.facts
        log.event("dedup", **dedup.facts)
    return streamed


def finish(run: OpenRun, work: Work, attempt: Attempt, streamed: Streamed, t_start: float) -> Summary:
    """Step 5: counts over the whole run (earlier attempts included, read back key columns only), the finished
    run record, the log's last event, then the ``_SUCCESS`` marker, written last."""
    spec, committer, entry, record = run.spec, attempt.committer, attempt.entry, attempt.record
    record["images_planned"] = streamed.images_planned
    counts = DoneIndex.read(run.out).tally(run.out, run.scan.rows, streamed.images_planned, failure_reason)
    summary = Summary(run_id=spec.run_id, output=spec.output, attempt=run.attempt, **counts,
                      images_this_attempt=streamed.images_to_do,
                      images_skipped=streamed.images_planned - streamed.images_to_do - streamed.images_reused,
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
                 images_per_second=summary.images_per_second, generate_seconds=streamed.seconds,
                 images_planned=streamed.images_planned, images_to_do=streamed.images_to_do)
    record.update(status=status, finished_at=entry["finished_at"],
                  summary={k: v for k, v in summary.__dict__.items() if k != "output"})
    ident = generation_identity(run.out)  # the checker the actors loaded (location, resolved revision) or null
    record["safety_checker"] = ({"location": ident["safety_checker"], "revision": ident["safety_checker_revision"]}
                                if ident["safety_checker"] else None)
    run.out.put_json(RUN_RECORD, record)
    attempt.log.event("finish", force=True, **{k: v for k, v in summary.__dict__.items() if k != "output"},
                      images_planned=streamed.images_planned, metadata_parts=committer.parts)
    write_dataset_card(run.out, spec, summary, record, ident)  # README.md: model, licence, counts, how to load
    if summary.complete:
        run.out.put_json(SUCCESS_MARKER, {"run_id": spec.run_id, "attempt": run.attempt,
                                          "finished_at": record["finished_at"], **counts})
    return summary


def _progress(total: int | None, enabled: bool):
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

"""A batch job from spec to completion marker: plan in the driver, generate through Ray, commit results.

1. open the output prefix; refuse one that already holds a run (nothing is ever written twice);
2. read and plan the manifest (bad manifest: fail fast; bad rows: recorded as failed, job goes on);
3. write the run record (``status: running``) and commit the failed rows' metadata;
4. stream generated items from the Ray pipeline, committing metadata parts every ``commit_every`` rows;
5. finish the run record with counts and timings; write ``_SUCCESS`` last.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import platform
import re
import secrets
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from typing import Any

import pyarrow as pa

from batch import pipeline
from batch.config import JobSpec, SpecError
from batch.models import locate
from batch.manifest import Plan, failure_reason, plan, read_manifest
from batch.storage import (
    METADATA_DIR,
    RESERVED_COLUMNS,
    RUN_RECORD,
    SUCCESS_MARKER,
    Output,
    conform,
    open_output,
)
from batch.runlog import RunLog
from batch.writers import OutputFormat, format_warnings, write_puts

VERSIONED_PACKAGES = ("sdbatch", "torch", "diffusers", "transformers", "ray", "pyarrow", "fsspec", "safetensors",
                      "pillow", "numpy")


class RunExistsError(RuntimeError):
    """The output prefix already holds a run."""


@dataclass
class Summary:
    """What a finished run did; ``exit_code`` applies ``max_failed_fraction``."""

    run_id: str
    output: str
    rows: int = 0
    rows_ok: int = 0
    rows_failed: int = 0
    images_ok: int = 0
    images_failed: int = 0
    seconds: float = 0.0
    generate_seconds: float = 0.0
    first_result_seconds: float = 0.0  # from the start of generation to the first finished block (start-up)
    failure_reasons: dict[str, int] = field(default_factory=dict)
    exit_code: int = 0

    @property
    def images_per_second(self) -> float:
        return self.images_ok / self.generate_seconds if self.generate_seconds > 0 else 0.0

    def text(self) -> str:
        lines = [
            f"run {self.run_id} -> {self.output}",
            f"  rows: {self.rows_ok} ok, {self.rows_failed} failed (of {self.rows})",
            f"  images: {self.images_ok} ok, {self.images_failed} failed; "
            f"{self.images_per_second:.3f} images/s over {self.generate_seconds:.1f}s of generation, "
            f"of which {self.first_result_seconds:.1f}s until the first block (actor start-up); "
            f"{self.seconds:.1f}s in all",
        ]
        for reason, count in sorted(self.failure_reasons.items(), key=lambda kv: -kv[1])[:20]:
            lines.append(f"  failed x{count}: {reason}")
        return "\n".join(lines)


def package_versions() -> dict[str, str]:
    out = {}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["python"] = platform.python_version()
    return out


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


_SECRET = re.compile(r"key|secret|token|password|passwd|credential|session|auth", re.IGNORECASE)
_NOT_SECRET = {"endpoint_url", "region_name", "anon", "use_ssl"}


def redact(value: Any, name: str = "") -> Any:
    """Copy of ``value`` with secret-looking entries (access keys, tokens, passwords) replaced."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, name) for v in value]
    if name and name not in _NOT_SECRET and _SECRET.search(name) and value is not None:
        return "***"
    return value


def redact_arg(arg: str) -> str:
    """``--set storage_options.secret=X`` -> ``--set storage_options.secret=***``."""
    name, sep, _ = arg.partition("=")
    return f"{name}=***" if sep and _SECRET.search(name.rsplit(".", 1)[-1]) else arg


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class MetadataCommitter:
    """Buffers metadata rows and commits them as numbered Parquet parts (all with one schema)."""

    def __init__(self, out: Output, carried: pa.Schema, run_id: str, every: int):
        self.out, self.carried, self.run_id, self.every = out, carried, run_id, every
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.parts = 0

    def add(self, table: pa.Table) -> None:
        table = table.append_column("run_id", pa.array([self.run_id] * table.num_rows, pa.string()))
        self.pending.append(conform(table, self.carried))
        self.pending_rows += table.num_rows
        if self.pending_rows >= self.every:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        self.out.put_parquet(f"{METADATA_DIR}/part-{self.parts:06d}.parquet", pa.concat_tables(self.pending))
        self.parts += 1
        self.pending, self.pending_rows = [], 0


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc="generating", disable=not enabled, file=sys.stderr)


def run_job(spec: JobSpec) -> Summary:
    """Run one job to completion and return its summary (see module docstring for the steps)."""
    if not spec.manifest or not spec.output:
        raise SpecError("a run needs both manifest and output (spec fields or --manifest/--output)")
    t_start = time.perf_counter()
    spec = spec.model_copy(update={"run_id": spec.run_id or new_run_id()})

    # 1. output prefix
    out = open_output(spec.output, spec.storage_options)
    if out.exists(RUN_RECORD) or out.exists(SUCCESS_MARKER) or out.list(METADATA_DIR):
        raise RunExistsError(f"output {spec.output} already holds a run; choose a new output prefix")

    # 2. model preflight (local checks only: the actors resolve a hub id), then plan
    locate(spec.model, spec.revision, spec.allow_pickle, spec.variant, resolve_hub=False)
    table = read_manifest(spec.manifest, spec.storage_options)
    job_plan: Plan = plan(table, spec, RESERVED_COLUMNS)
    carried = pa.schema([table.schema.field(c) for c in job_plan.carried])

    # 3. run record + failed rows
    started = pipeline.init_ray(spec)
    try:
        res = pipeline.resolve_resources(spec, pipeline.cluster_resources(), local=pipeline.is_local(spec))
        record = {
            "run_id": spec.run_id, "status": "running", "spec": redact(spec.model_dump(mode="json")),
            "resources": res.__dict__, "versions": package_versions(), "host": socket.gethostname(),
            "platform": platform.platform(),
            "argv": [redact_arg(a) for a in sys.argv], "started_at": _now(),
            "rows": job_plan.num_rows, "images_planned": job_plan.items.num_rows,
        }
        out.put_json(RUN_RECORD, record)
        committer = MetadataCommitter(out, carried, spec.run_id, spec.commit_every)
        log = RunLog(out, spec.run_id)
        log.event("start", rows=job_plan.num_rows, images_planned=job_plan.items.num_rows,
                  output_format=spec.output_format, image_format=spec.image_format,
                  safety_policy=spec.safety_policy, resources=res.__dict__)
        for warning in format_warnings(OutputFormat.from_spec(spec)):
            log.warning(warning)
        for r in job_plan.failed.select(["id", "manifest_row", "error"]).to_pylist():
            log.failure(**r, image_index=None)
        if job_plan.failed.num_rows:
            committer.add(job_plan.failed.append_column("status", pa.array(["failed"] * job_plan.failed.num_rows)))

        # 4. generate, write, commit as blocks finish
        statuses: Counter = Counter()
        reasons: Counter = job_plan.failure_reasons()
        failed_rows = set(job_plan.failed.column("manifest_row").to_pylist())
        t_gen, t_first = time.perf_counter(), 0.0
        with _progress(job_plan.items.num_rows, spec.progress) as bar, _record_failure(out, record, log):
            for batch in pipeline.run_items(job_plan.items, spec, res, upload=not out.is_process_local):
                if "_puts" in batch.column_names:  # process-local filesystem: the driver writes
                    for puts in batch.column("_puts").to_pylist():
                        write_puts(out, puts)
                    batch = batch.drop_columns(["_puts"])
                parts_before = committer.parts
                committer.add(batch)
                for st, err, row, rid, k in zip(batch.column("status").to_pylist(), batch.column("error").to_pylist(),
                                                batch.column("manifest_row").to_pylist(),
                                                batch.column("id").to_pylist(), batch.column("image_index").to_pylist()):
                    statuses[st] += 1
                    if st != "ok":
                        reasons[failure_reason(err or "unknown")] += 1
                        failed_rows.add(row)
                        log.failure(id=rid, manifest_row=row, image_index=k, error=err)
                block_ok = batch.column("status").to_pylist().count("ok")
                log.event("block", images=batch.num_rows, ok=block_ok, failed=batch.num_rows - block_ok,
                          images_done=sum(statuses.values()))
                if committer.parts != parts_before:
                    log.event("commit", parts=committer.parts, images_done=sum(statuses.values()))
                bar.update(batch.num_rows)
                t_first = t_first or time.perf_counter() - t_gen
        gen_seconds = time.perf_counter() - t_gen
        parts_before = committer.parts
        committer.flush()
        if committer.parts != parts_before:
            log.event("commit", parts=committer.parts, images_done=sum(statuses.values()))
    finally:
        if started:
            pipeline.shutdown()

    # 5. run record, then the marker
    summary = Summary(
        run_id=spec.run_id, output=spec.output, rows=job_plan.num_rows,
        rows_failed=len(failed_rows), rows_ok=job_plan.num_rows - len(failed_rows),
        images_ok=statuses["ok"], images_failed=statuses["failed"], seconds=time.perf_counter() - t_start,
        generate_seconds=gen_seconds, first_result_seconds=t_first, failure_reasons=dict(reasons),
    )
    frac = summary.rows_failed / summary.rows if summary.rows else 0.0
    summary.exit_code = 0 if frac <= spec.max_failed_fraction else 1
    record.update(status="finished", finished_at=_now(), summary={
        k: v for k, v in summary.__dict__.items()} | {"images_per_second": summary.images_per_second},
        metadata_parts=committer.parts)
    out.put_json(RUN_RECORD, record)
    log.event("finish", force=True, **record["summary"], metadata_parts=committer.parts)
    out.put_json(SUCCESS_MARKER, {"run_id": spec.run_id, "finished_at": record["finished_at"],
                                  "rows_ok": summary.rows_ok, "rows_failed": summary.rows_failed,
                                  "images_ok": summary.images_ok, "metadata_parts": committer.parts})
    return summary


@contextlib.contextmanager
def _record_failure(out: Output, record: dict, log: RunLog | None = None):
    """If the job itself dies (not a row), say so in the run record before the error propagates."""
    try:
        yield
    except BaseException as err:
        if log is not None:
            log.event("crashed", force=True, error=f"{type(err).__name__}: {err}")
        out.put_json(RUN_RECORD, {**record, "status": "crashed", "error": f"{type(err).__name__}: {err}",
                                  "crashed_at": _now()})
        raise


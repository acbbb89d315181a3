"""A batch job from spec to completion marker, exactly once across crashes and restarts.

1. open the output prefix; if it already holds a run, it must be the same run (same model, defaults,
   limits, seed and manifest contents): this attempt then resumes it; anything else is refused;
2. take the lease (one driver per run; a dead driver's lease is taken over);
3. read and plan the manifest; read what earlier attempts committed and keep only the missing work
   (``retry_failed``: only the failed images);
4. record the attempt in ``run.json``, commit the failed rows' metadata;
5. stream generated items from the Ray pipeline, committing a metadata part every ``commit_every`` rows
   or ``commit_seconds`` (an image counts as done only once a part holding its row is written);
6. finish the run record with counts over the whole run; write ``_SUCCESS`` last.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import platform
import re
import secrets
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from typing import Any, Literal

import pyarrow as pa

from batch.run import pipeline
from batch.spec.config import JobSpec, SpecError
from batch.models.load import locate
from batch.plan.manifest import Plan, failure_reason, plan, read_manifest
from batch.store.io import (
    LEASE,
    RESERVED_COLUMNS,
    RUN_RECORD,
    SUCCESS_MARKER,
    Output,
    conform,
    latest_rows,
    metadata_parts,
    new_attempt_id,
    open_output,
    part_key,
    read_parts,
    row_key,
)
from batch.store.runlog import RunLog
from batch.models.safety import NSFW_ERROR
from batch.store.formats import OutputFormat, apply_driver_writes, format_warnings

VERSIONED_PACKAGES = ("sdbatch", "torch", "diffusers", "transformers", "ray", "pyarrow", "fsspec", "safetensors",
                      "pillow", "numpy")
# Spec fields that decide what a run produces: a later attempt on the same output must agree on them.
IDENTITY_FIELDS = ("task", "model", "revision", "variant", "allow_pickle", "defaults", "limits", "seed",
                   "allowed_input_prefixes",
                   # what is stored: a resumed run keeps one container, encoding and safety policy
                   "output_format", "image_format", "webp_lossless", "jpeg_quality", "safety_policy")
LEASE_SECONDS = 120.0  # a lease whose heartbeat is older than this is considered abandoned
HEARTBEAT_SECONDS = 20.0
SLIM_COLUMNS = ["manifest_row", "image_index", "num_images", "status", "error", "vae_redecoded_fp32", "attempt"]
Mode = Literal["run", "retry_failed"]


class RunExistsError(RuntimeError):
    """The output prefix holds a different run (other model, defaults, seed or manifest)."""


class RunInProgressError(RuntimeError):
    """Another live driver holds the run's lease."""


@dataclass
class Summary:
    """What a run has done so far, over all its attempts; ``exit_code`` applies ``max_failed_fraction``."""

    run_id: str
    output: str
    attempt: str = ""
    rows: int = 0
    rows_ok: int = 0
    rows_failed: int = 0
    images_ok: int = 0
    images_failed: int = 0
    images_pending: int = 0
    images_redecoded_fp32: int = 0  # fp16/bf16 decodes that gave NaN/black and were redone in fp32
    images_this_attempt: int = 0  # images this attempt generated or tried (the rest were already committed)
    images_skipped: int = 0  # already committed by earlier attempts
    seconds: float = 0.0
    generate_seconds: float = 0.0
    first_result_seconds: float = 0.0  # from the start of generation to the first finished block (start-up)
    steady_images_per_second: float = 0.0  # the samplers' pace after their first batch (start-up excluded)
    warmup_seconds: float = 0.0  # first sampler call per actor and shape over later calls (compile included)
    failure_reasons: dict[str, int] = field(default_factory=dict)
    exit_code: int = 0

    @property
    def images_per_second(self) -> float:
        ok_now = self.images_this_attempt
        return ok_now / self.generate_seconds if self.generate_seconds > 0 else 0.0

    def text(self) -> str:
        lines = [
            f"run {self.run_id} (attempt {self.attempt}) -> {self.output}",
            f"  rows: {self.rows_ok} ok, {self.rows_failed} failed (of {self.rows})",
            f"  images: {self.images_ok} ok, {self.images_failed} failed, {self.images_pending} pending; "
            f"this attempt {self.images_this_attempt} ({self.images_skipped} already committed), "
            f"{self.images_per_second:.3f} images/s over {self.generate_seconds:.1f}s of generation, "
            f"of which {self.first_result_seconds:.1f}s until the first block (actor start-up); "
            f"{self.steady_images_per_second:.3f} images/s at steady state; "
            f"{self.seconds:.1f}s in all",
        ]
        if self.warmup_seconds >= 1:
            lines.append(f"  sampler warm-up: each actor's first call per image shape took {self.warmup_seconds:.1f}s "
                         "longer than its later calls (kernel and allocator warm-up, and torch.compile when "
                         "optimizations.compile is on)")
        if self.images_redecoded_fp32:
            lines.append(f"  {self.images_redecoded_fp32} image(s) re-decoded in fp32 after a NaN/black fp16 decode")
        for reason, count in sorted(self.failure_reasons.items(), key=lambda kv: -kv[1])[:20]:
            lines.append(f"  failed x{count}: {reason}")
        return "\n".join(lines)


def sampler_calls(batch: pa.Table) -> dict[tuple, tuple[int, float]]:
    """The sampler calls in a finished block: (worker, height, width, sampled_at) -> (images, seconds).

    Images of one call share the actor's ``worker`` and ``sampled_at`` stamp; ``t_sample_s`` is the call's
    time per image."""
    calls: dict[tuple, tuple[int, float]] = {}
    cols = batch.select(["worker", "height", "width", "sampled_at", "t_sample_s"]).to_pylist()
    for r in cols:
        if r["sampled_at"] is None:
            continue
        key = (r["worker"], r["height"], r["width"], r["sampled_at"])
        n, _ = calls.get(key, (0, 0.0))
        calls[key] = (n + 1, (n + 1) * (r["t_sample_s"] or 0.0))
    return calls


def call_ends(calls: dict[tuple, tuple[int, float]]) -> Counter:
    """Images finished at each sampler-call end stamp (the input of :func:`steady_rate`)."""
    ends: Counter = Counter()
    for (_, _, _, at), (n, _) in calls.items():
        ends[at] += n
    return ends


def warmup_seconds(calls: dict[tuple, tuple[int, float]]) -> float:
    """Extra time of each actor's first sampler call for an image shape over its later calls' median
    (CUDA/cuDNN warm-up, and the ``torch.compile`` of the UNet when that switch is on), averaged over the
    (actor, shape) pairs that had later calls; 0 when none did."""
    by_shape: dict[tuple, list[tuple[float, float]]] = {}
    for (worker, h, w, at), (_, seconds) in calls.items():
        by_shape.setdefault((worker, h, w), []).append((at, seconds))
    extra = []
    for timeline in by_shape.values():
        timeline.sort()
        if len(timeline) > 1:
            later = sorted(t for _, t in timeline[1:])
            extra.append(max(0.0, timeline[0][1] - later[len(later) // 2]))
    return sum(extra) / len(extra) if extra else 0.0


def steady_rate(batch_ends: Counter) -> float:
    """Images per second after the first sampler batch: images of the later batches over the time from
    the first batch's end to the last one's (the ``sampled_at`` stamps); 0 with fewer than two batches."""
    ends = sorted(batch_ends.items())
    if len(ends) < 2 or ends[-1][0] <= ends[0][0]:
        return 0.0
    return sum(n for _, n in ends[1:]) / (ends[-1][0] - ends[0][0])


def tally(meta: pa.Table, rows: int, images_planned: int) -> dict[str, Any]:
    """Counts over a run's (latest-wins) metadata: rows and images by status, failure reasons.

    A row is ok once all its ``num_images`` images are committed ok, failed once any record of it failed.
    """
    recs = meta.select(["manifest_row", "image_index", "num_images", "status", "error",
                        "vae_redecoded_fp32"]).to_pylist()
    failed_rows = {r["manifest_row"] for r in recs if r["status"] != "ok"}
    ok_images: Counter = Counter()
    wanted: dict[int, int] = {}
    images = 0
    for r in recs:
        if r["image_index"] is not None:
            images += 1
            wanted[r["manifest_row"]] = r["num_images"]
            ok_images[r["manifest_row"]] += r["status"] == "ok"
    rows_ok = sum(1 for row, n in wanted.items() if row not in failed_rows and ok_images[row] == n)
    return {
        "rows": rows, "rows_ok": rows_ok, "rows_failed": len(failed_rows),
        "images_ok": sum(ok_images.values()), "images_failed": images - sum(ok_images.values()),
        "images_pending": max(0, images_planned - images),
        "images_redecoded_fp32": sum(bool(r["vae_redecoded_fp32"]) for r in recs),
        "failure_reasons": dict(Counter(failure_reason(r["error"] or "unknown") for r in recs
                                        if r["status"] != "ok")),
    }


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
    """Buffers metadata rows and commits them as Parquet parts named by attempt (never overwritten).

    A part is written whole (see :meth:`batch.store.io.Output.put`), so a crash loses at most the rows
    still buffered; their images are regenerated (same seeds, same pixels) by the next attempt.
    """

    def __init__(self, out: Output, carried: pa.Schema, run_id: str, attempt: str, every: int, seconds: float):
        self.out, self.carried, self.run_id, self.attempt = out, carried, run_id, attempt
        self.every, self.seconds = every, seconds
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.oldest = 0.0
        self.parts = 0
        self.committed: list[pa.Table] = []  # slim copies (keys and status) of what this attempt committed

    def add(self, table: pa.Table) -> bool:
        """Buffer ``table``'s rows; commit a part when enough rows or time have gathered (then True)."""
        n = table.num_rows
        table = table.append_column("run_id", pa.array([self.run_id] * n, pa.string()))
        table = table.append_column("attempt", pa.array([self.attempt] * n, pa.string()))
        self.pending.append(conform(table, self.carried))
        self.oldest = self.oldest or time.monotonic()
        self.pending_rows += n
        if self.pending_rows >= self.every or time.monotonic() - self.oldest >= self.seconds:
            return self.flush()
        return False

    def flush(self) -> bool:
        """Commit the buffered rows as one part; False when there were none."""
        if not self.pending:
            return False
        table = pa.concat_tables(self.pending)
        self.out.put_parquet(part_key(self.attempt, self.parts), table)
        self.committed.append(table.select(SLIM_COLUMNS))
        self.parts += 1
        self.pending, self.pending_rows, self.oldest = [], 0, 0.0
        return True


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc="generating", disable=not enabled, file=sys.stderr)


def manifest_digest(table: pa.Table) -> str:
    """SHA-256 of the manifest's contents (schema and rows, in order), to tell a changed manifest."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.combine_chunks())
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


def _identity(spec_json: dict[str, Any]) -> dict[str, Any]:
    return {k: spec_json.get(k) for k in IDENTITY_FIELDS}


def _differences(old: Any, new: Any, path: str = "") -> list[str]:
    """``"defaults.num_inference_steps: 1 -> 12"`` for every leaf where two spec dumps differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in _differences(old.get(k), new.get(k), f"{path}.{k}" if path else str(k))]
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


def check_same_run(record: dict[str, Any], spec: JobSpec, digest: str, output: str) -> None:
    """Refuse to add an attempt to a run that was started with other outputs in mind."""
    diffs = _differences(_identity(record.get("spec", {})), _identity(redact(spec.model_dump(mode="json"))))
    if record.get("manifest_sha256") != digest:
        diffs.append("manifest contents changed (sha256 differs)")
    if diffs:
        raise RunExistsError(
            f"output {output} holds run {record.get('run_id')} started with a different spec or manifest, so it "
            "cannot be resumed with this one:\n  " + "\n  ".join(diffs) + "\nUse a new output prefix.")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """One driver per run: a ``_LEASE`` object with a heartbeat, refreshed in a background thread.

    A lease is free when released, older than ``LEASE_SECONDS``, or held by a dead process on this host
    (a driver killed with SIGKILL and restarted here takes over at once). Object stores offer no atomic
    create-if-absent, so two drivers started within the same second could both win; the lease guards
    against the usual mistake (a second submission of a running job), not against that race.
    """

    def __init__(self, out: Output, attempt: str, force: bool = False):
        self.out, self.attempt = out, attempt
        self.me = {"attempt": attempt, "host": socket.gethostname(), "pid": os.getpid()}
        if out.exists(LEASE) and not force:
            held = out.get_json(LEASE)
            age = time.time() - float(held.get("heartbeat", 0))
            dead_here = held.get("host") == self.me["host"] and not _pid_alive(int(held.get("pid", -1)))
            if not held.get("released") and age < LEASE_SECONDS and not dead_here:
                raise RunInProgressError(
                    f"run is being driven by {held.get('host')} pid {held.get('pid')} (attempt {held.get('attempt')},"
                    f" heartbeat {age:.0f}s ago); wait {LEASE_SECONDS - age:.0f}s for it to lapse, or pass --force "
                    "if that driver is certainly gone")
        self._beat()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sdbatch-lease", daemon=True)
        self._thread.start()

    def _beat(self, released: bool = False) -> None:
        self.out.put_json(LEASE, {**self.me, "heartbeat": time.time(), "released": released})

    def _loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(Exception):  # a missed beat is not fatal; the next one retries
                self._beat()

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            self._beat(released=True)


def select_work(job_plan: Plan, committed: pa.Table, mode: Mode) -> tuple[pa.Table, pa.Table]:
    """The items to generate and the failed rows to commit in this attempt.

    ``run``: everything without a committed record. ``retry_failed``: only images whose latest record
    failed, except those that would fail the same way again: rows that failed validation, and images the
    safety checker dropped (same seed and parameters, same image, same verdict).
    """
    keys = [row_key(r, k) for r, k in zip(committed.column("manifest_row").to_pylist(),
                                          committed.column("image_index").to_pylist())]
    status = dict(zip(keys, committed.column("status").to_pylist()))
    dropped = {k for k, err in zip(keys, committed.column("error").to_pylist()) if err == NSFW_ERROR}
    item_keys = [row_key(r, k) for r, k in zip(job_plan.items.column("manifest_row").to_pylist(),
                                               job_plan.items.column("image_index").to_pylist())]
    if mode == "retry_failed":
        keep = [status.get(k, "ok") != "ok" and k not in dropped for k in item_keys]
        failed_keep = [False] * job_plan.failed.num_rows
    else:
        keep = [k not in status for k in item_keys]
        failed_keep = [row_key(r, None) not in status for r in job_plan.failed.column("manifest_row").to_pylist()]
    return job_plan.items.filter(pa.array(keep, pa.bool_())), job_plan.failed.filter(pa.array(failed_keep, pa.bool_()))


def run_job(spec: JobSpec, mode: Mode = "run", force: bool = False) -> Summary:
    """Run (or resume, or retry the failed images of) one job; return the summary over the whole run.

    See the module docstring for the steps. Safe to call again on the same output after any crash.
    """
    if not spec.manifest or not spec.output:
        raise SpecError("a run needs both manifest and output (spec fields or --manifest/--output)")
    t_start = time.perf_counter()
    attempt = new_attempt_id()

    # 1. the output prefix: a new run, or an attempt of the same run
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

    # 2. the lease, 3. the plan minus what is committed
    lease = Lease(out, attempt, force)
    started = False
    try:
        job_plan: Plan = plan(table, spec, RESERVED_COLUMNS)
        carried = pa.schema([table.schema.field(c) for c in job_plan.carried])
        committed = latest_rows(read_parts(out))
        items, failed = select_work(job_plan, committed, mode)

        # 4. the run record and this attempt's entry in it (no Ray at all when nothing is left to do)
        res = None
        if items.num_rows:
            started = pipeline.init_ray(spec)
            res = pipeline.resolve_resources(spec, pipeline.cluster_resources(), local=pipeline.is_local(spec))
        entry = {"attempt": attempt, "mode": mode, "started_at": _now(), "host": socket.gethostname(),
                 "pid": os.getpid(), "argv": [redact_arg(a) for a in sys.argv], "resources": res and res.__dict__,
                 "versions": package_versions(), "platform": platform.platform(),
                 "images_to_do": items.num_rows, "images_committed_before": committed.num_rows}
        if record is None:
            record = {"run_id": spec.run_id, "spec": redact(spec.model_dump(mode="json")),
                      "manifest_sha256": digest, "rows": job_plan.num_rows,
                      "images_planned": job_plan.items.num_rows, "created_at": _now(), "attempts": []}
        record.update(status="running", attempt=attempt)
        record["attempts"].append(entry)
        out.put_json(RUN_RECORD, record)
        committer = MetadataCommitter(out, carried, spec.run_id, attempt, spec.commit_every, spec.commit_seconds)
        log = RunLog(out, spec.run_id)  # logs/<run_id>.jsonl: structured events of every attempt
        log.event("start", attempt=attempt, mode=mode, rows=job_plan.num_rows,
                  images_planned=job_plan.items.num_rows, images_to_do=items.num_rows,
                  images_committed_before=committed.num_rows, output_format=spec.output_format,
                  image_format=spec.image_format, safety_policy=spec.safety_policy,
                  resources=res and res.__dict__)
        for warning in format_warnings(OutputFormat.from_spec(spec)):
            log.warning(warning)
        for r in failed.select(["id", "manifest_row", "error"]).to_pylist():
            log.failure(**r, image_index=None)
        if failed.num_rows:
            committer.add(failed.append_column("status", pa.array(["failed"] * failed.num_rows)))

        # 5. generate, write, commit as blocks finish
        t_gen, t_first, calls = time.perf_counter(), 0.0, {}
        with _progress(items.num_rows, spec.progress) as bar, _record_failure(out, record, entry, log):
            batches = pipeline.run_items(items, spec, res, upload=not out.is_process_local) if res else iter(())
            done = 0
            for batch in batches:
                if "_puts" in batch.column_names:  # process-local filesystem: the driver writes (batch.store.formats)
                    batch = apply_driver_writes(out, batch)
                committed_part = committer.add(batch)
                done += batch.num_rows
                _log_block(log, batch, done, committer.parts if committed_part else None)
                bar.update(batch.num_rows)
                calls.update(sampler_calls(batch))
                if not t_first:
                    t_first = time.perf_counter() - t_gen
            if committer.flush():
                log.event("commit", parts=committer.parts, images_done=done)
        gen_seconds = time.perf_counter() - t_gen
    finally:
        if started:
            pipeline.shutdown()
        lease.release()

    # 6. counts over the whole run, the run record, then the marker
    final = latest_rows(pa.concat_tables([committed.select(SLIM_COLUMNS)] + committer.committed))
    counts = tally(final, job_plan.num_rows, job_plan.items.num_rows)
    summary = Summary(run_id=spec.run_id, output=spec.output, attempt=attempt, **counts,
                      images_this_attempt=items.num_rows, images_skipped=job_plan.items.num_rows - items.num_rows,
                      seconds=time.perf_counter() - t_start, generate_seconds=gen_seconds,
                      first_result_seconds=t_first,
                      steady_images_per_second=steady_rate(call_ends(calls)), warmup_seconds=warmup_seconds(calls))
    frac = summary.rows_failed / summary.rows if summary.rows else 0.0
    summary.exit_code = 0 if frac <= spec.max_failed_fraction else 1
    entry.update(status="finished", finished_at=_now(), metadata_parts=committer.parts,
                 images_per_second=summary.images_per_second, generate_seconds=gen_seconds)
    record.update(status="finished", finished_at=entry["finished_at"],
                  summary={k: v for k, v in summary.__dict__.items() if k != "output"})
    out.put_json(RUN_RECORD, record)
    log.event("finish", force=True, **{k: v for k, v in summary.__dict__.items() if k != "output"},
              metadata_parts=committer.parts)
    out.put_json(SUCCESS_MARKER, {"run_id": spec.run_id, "attempt": attempt, "finished_at": record["finished_at"],
                                  **counts})
    return summary


@contextlib.contextmanager
def _record_failure(out: Output, record: dict, entry: dict, log: RunLog | None = None):
    """If the job itself dies (not a row), say so in the run record before the error propagates."""
    try:
        yield
    except BaseException as err:
        if log is not None:
            with contextlib.suppress(Exception):
                log.event("crashed", force=True, error=f"{type(err).__name__}: {err}")
        entry.update(status="crashed", error=f"{type(err).__name__}: {err}", crashed_at=_now())
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

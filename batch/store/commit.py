"""Exactly once: the commit protocol, the lease, attempts, and reading back what was committed.

Under a run's output prefix::

    metadata/part-<attempt>-<nnnnnn>.parquet  committed metadata, one row per image or failed manifest row
    run.json                                  run record: spec, manifest hash, attempts, counts
    _LEASE                                    which driver is working on the run (heartbeat, epoch)
    _LEASE.claims/<epoch>                     one per lease takeover, created if absent
    _SUCCESS                                  completion marker, written last

1. One driver per run: :class:`Lease` (created if absent, a heartbeat; a dead driver's lease is taken over).
2. Each driver attempt has an id (:func:`new_attempt_id`, sorts in start order) and names its parts with it
   (:func:`part_key`), so no part is ever overwritten.
3. An image object is written whole (``batch.store.io.Output.put``) *before* the metadata part that
   references it; :class:`MetadataCommitter` writes a part whole, and an image counts as done only once a
   part holding its row exists.
4. Readers take the union of the parts and keep, for each (manifest row, image index), the row of the
   latest attempt (:func:`latest_rows`), so a retried row supersedes its failed record and compaction
   (:func:`compact`) never shows an image twice.
5. A new attempt does only what is missing (:func:`select_work`; a job uses its bounded-memory form,
   :class:`batch.store.done.DoneIndex`); ``_SUCCESS`` is written last.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from batch.store.io import TMP_MARK, Output, open_output
from batch.store.schema import DONE_STATUSES, METADATA_SCHEMA, NSFW_ERROR, conform

if TYPE_CHECKING:
    from batch.plan.manifest import Plan

METADATA_DIR = "metadata"


RUN_RECORD = "run.json"


SUCCESS_MARKER = "_SUCCESS"


LEASE = "_LEASE"


LEASE_CLAIMS = "_LEASE.claims"  # one object per lease takeover (epoch), created if absent


LEASE_SECONDS = 120.0  # a lease whose heartbeat is older than this is considered abandoned


HEARTBEAT_SECONDS = 20.0


Mode = Literal["run", "retry_failed", "extend"]  # extend: a run whose manifest gained rows at its end


class RunExistsError(RuntimeError):
    """The output prefix holds a different run (other model, defaults, seed or manifest)."""


class RunInProgressError(RuntimeError):
    """Another live driver holds the run's lease."""


class IncompleteRunError(RuntimeError):
    """An attempt ended without a committed record for every planned image and row (the cluster lost work,
    or the stream ended early): ``_SUCCESS`` is not written; ``sdbatch resume`` finishes the run."""


def new_attempt_id() -> str:
    """A driver attempt's id: UTC time to the microsecond, then random; sorts in start order."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"{time.time() % 1:.6f}"[1:].replace(".", "") \
        + "Z-" + uuid.uuid4().hex[:6]


def part_key(attempt: str, number: int) -> str:
    """Key of metadata part ``number`` committed by driver attempt ``attempt`` (never reused)."""
    return f"{METADATA_DIR}/part-{attempt}-{number:06d}.parquet"


def metadata_parts(out: Output) -> list[str]:
    """Committed parts only: names ending ``.parquet`` (an interrupted local write leaves ``*.tmp-*``)."""
    return [k for k in out.list(METADATA_DIR) if k.endswith(".parquet")]


def row_key(manifest_row: int | None, image_index: int | None) -> tuple[int, int]:
    """What a metadata row stands for: an image (row, k) or a failed manifest row (row, -1)."""
    return (int(manifest_row), -1 if image_index is None else int(image_index))


def latest_rows(table: pa.Table) -> pa.Table:
    """Keep, for each :func:`row_key`, the row of the latest ``attempt`` (ties: the later part)."""
    if table.num_rows == 0:
        return table
    keys = zip(table.column("manifest_row").to_pylist(), table.column("image_index").to_pylist())
    attempts = table.column("attempt").to_pylist()
    best: dict[tuple[int, int], int] = {}
    for i, (key, att) in enumerate(zip(map(lambda k: row_key(*k), keys), attempts)):
        j = best.get(key)
        if j is None or (att or "") >= (attempts[j] or ""):
            best[key] = i
    return table.take(pa.array(sorted(best.values()), pa.int64()))


def read_parts(out: Output, keys: list[str] | None = None) -> pa.Table:
    """The committed parts (all of them, or ``keys``), concatenated as written (no de-duplication)."""
    keys = metadata_parts(out) if keys is None else keys
    if not keys:
        return METADATA_SCHEMA.empty_table()
    tables = [pq.read_table(io.BytesIO(out.get(k))) for k in keys]
    return pa.concat_tables(tables, promote_options="default")


def read_metadata(uri: str | Output, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """A run's committed metadata: one row per image or failed manifest row, exactly once (latest wins)."""
    out = uri if isinstance(uri, Output) else open_output(uri, storage_options)
    return latest_rows(read_parts(out))


def stale_temp_files(out: Output) -> list[str]:
    """Keys of temp files an interrupted local write left behind (``<dir>/.<name>.tmp-<random>``: a driver or
    writer killed mid-write, or a disk that filled); object stores write whole objects and leave none."""
    if not out.is_local:
        return []
    return [k for k in out.list("") if TMP_MARK in k.rsplit("/", 1)[-1]]


def compact(out: Output, rows_per_part: int = 250_000) -> tuple[int, int]:
    """Rewrite the committed parts as a few parts; return (parts before, parts after). Temp files left by
    interrupted writes (:func:`stale_temp_files`) are removed first: no driver runs while compacting.

    Crash-safe: the compacted parts are committed first (rows keep their own ``attempt``), the old parts
    are deleted after; a crash in between leaves identical duplicates, which readers collapse.
    """
    for key in stale_temp_files(out):
        out.delete(key)
    old = metadata_parts(out)
    if len(old) <= 1:
        return len(old), len(old)
    table = latest_rows(read_parts(out, old))
    attempt = new_attempt_id()
    new = []
    for n, start in enumerate(range(0, max(table.num_rows, 1), rows_per_part)):
        key = part_key(attempt, n)
        out.put_parquet(key, table.slice(start, rows_per_part))
        new.append(key)
    for key in old:
        out.delete(key)
    return len(old), len(new)


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
        self.parts += 1
        self.pending, self.pending_rows, self.oldest = [], 0, 0.0
        return True


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

    Taking the lease is atomic wherever the store has create-if-absent (:meth:`batch.store.io.Output.create`:
    local link, S3 ``If-None-Match: *``, memory://; GCS ``ifGenerationMatch=0`` where gcsfs implements
    ``mode="create"``, untested here): the first driver of a run creates ``_LEASE`` (epoch 0). A lease is free
    when released, older than ``LEASE_SECONDS`` (no heartbeat), or held by a dead process on this host (a
    driver killed with SIGKILL and restarted here takes over at once); ``force`` takes a live one. Taking over
    lease epoch ``e`` means creating ``_LEASE.claims/<e+1>`` first: of two drivers racing for the same lapsed
    lease exactly one creates the claim, the other gets :class:`RunInProgressError`. The winner then writes
    ``_LEASE`` with its epoch and heartbeat. A driver whose lease was taken over (it stalled past
    ``LEASE_SECONDS``) sees a newer epoch at its next heartbeat and stops beating (``lost``); its committed
    parts stay valid (attempt-named, latest wins), so at worst some images are generated twice, never
    committed twice.
    """

    def __init__(self, out: Output, attempt: str, force: bool = False):
        self.out, self.attempt = out, attempt
        self.me = {"attempt": attempt, "host": socket.gethostname(), "pid": os.getpid()}
        self.lost = False
        self.epoch = self._acquire(force)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sdbatch-lease", daemon=True)
        self._thread.start()

    def _body(self, epoch: int, released: bool = False) -> bytes:
        return json.dumps({**self.me, "epoch": epoch, "heartbeat": time.time(), "released": released},
                          sort_keys=True).encode()

    def _acquire(self, force: bool) -> int:
        if self.out.create(LEASE, self._body(0)):
            return 0
        held = self.out.get_json(LEASE)
        if held.get("attempt") == self.attempt:  # our own create, retried after its response was lost
            return int(held.get("epoch", 0))
        age = time.time() - float(held.get("heartbeat", 0))
        dead_here = held.get("host") == self.me["host"] and not _pid_alive(int(held.get("pid", -1)))
        if not force and not held.get("released") and age < LEASE_SECONDS and not dead_here:
            raise RunInProgressError(
                f"run is being driven by {held.get('host')} pid {held.get('pid')} (attempt {held.get('attempt')},"
                f" heartbeat {age:.0f}s ago); wait {LEASE_SECONDS - age:.0f}s for it to lapse, or pass --force "
                "if that driver is certainly gone")
        epoch = int(held.get("epoch", 0)) + 1
        claim = f"{LEASE_CLAIMS}/{epoch:06d}"
        if not self.out.create(claim, json.dumps(self.me, sort_keys=True).encode()):
            winner = self.out.get_json(claim)
            if winner.get("attempt") != self.attempt:
                raise RunInProgressError(
                    f"another driver ({winner.get('host')} pid {winner.get('pid')}, attempt {winner.get('attempt')})"
                    f" took over the lapsed lease at the same time (lease epoch {epoch})")
        self.out.put(LEASE, self._body(epoch))
        return epoch

    def _beat(self, released: bool = False) -> None:
        self.out.put(LEASE, self._body(self.epoch, released))

    def _loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(Exception):  # a missed beat is not fatal; the next one retries
                held = self.out.get_json(LEASE)
                if int(held.get("epoch", 0)) > self.epoch:  # taken over while this driver stalled
                    self.lost = True
                    logging.getLogger(__name__).warning(
                        "lease taken over by %s pid %s (attempt %s): this driver stops its heartbeat",
                        held.get("host"), held.get("pid"), held.get("attempt"))
                    return
                self._beat()

    def release(self) -> None:
        """Stop the heartbeat and mark the lease released (unless another driver has taken it over)."""
        self._stop.set()
        self._thread.join(timeout=5)
        if not self.lost:
            with contextlib.suppress(Exception):
                self._beat(released=True)


def select_work(job_plan: Plan, committed: pa.Table, mode: Mode) -> tuple[pa.Table, pa.Table]:
    """The items to generate and the failed rows to commit in this attempt.

    ``run``: everything without a committed record. ``retry_failed``: that, plus the images whose latest
    record failed (an image ``skipped`` by deduplication is done, like an ``ok`` one), except those that would fail the same way again: rows that failed validation, and images
    the safety checker dropped (same seed and parameters, same image, same verdict). So retrying the failures
    of an interrupted run also finishes it (an image without a record was never "ok").
    """
    keys = [row_key(r, k) for r, k in zip(committed.column("manifest_row").to_pylist(),
                                          committed.column("image_index").to_pylist())]
    status = dict(zip(keys, committed.column("status").to_pylist()))
    dropped = {k for k, err in zip(keys, committed.column("error").to_pylist()) if err == NSFW_ERROR}
    item_keys = [row_key(r, k) for r, k in zip(job_plan.items.column("manifest_row").to_pylist(),
                                               job_plan.items.column("image_index").to_pylist())]
    if mode == "retry_failed":
        keep = [k not in status or (status[k] not in DONE_STATUSES and k not in dropped) for k in item_keys]
    else:
        keep = [k not in status for k in item_keys]
    failed_keep = [row_key(r, None) not in status for r in job_plan.failed.column("manifest_row").to_pylist()]
    return job_plan.items.filter(pa.array(keep, pa.bool_())), job_plan.failed.filter(pa.array(failed_keep, pa.bool_()))

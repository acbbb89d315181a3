"""Output layout, object keys, image encoding and the metadata schema, over any fsspec filesystem.

Layout under a run's output prefix::

    images/<slug>-<hash>/<k>.png              one object per generated image (k = image index in the row)
    metadata/part-<attempt>-<nnnnnn>.parquet  committed metadata, one row per image or failed manifest row
    run.json                                  run record: spec, manifest hash, attempts, counts
    _LEASE                                    which driver is working on the run (heartbeat)
    _SUCCESS                                  completion marker, written last

Commit protocol (see README "Exactly once"): an image object is written whole (local files: temp name
then rename; object stores: one PUT) *before* the metadata part that references it; a part is itself
written whole, and an image counts as done only once a part holding its row exists. Readers take the
union of the parts and keep, for each (manifest row, image index), the row of the latest attempt, so
a retried row supersedes its failed record and compaction never shows an image twice.

Object keys derive only from (row id, image index): the id is reduced to a short slug of
``[A-Za-z0-9_-]`` plus 16 hex digits of its SHA-256, so no id (``../``, absolute paths, separators,
unicode, NUL) can steer a write outside the prefix, and two ids never share a key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import random
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from batch.plan.image_manifest import IMAGE_ITEM_FIELDS, INPUT_FIELDS
from batch.plan.manifest import ITEM_SCHEMA

log = logging.getLogger(__name__)

IMAGES_DIR = "images"
METADATA_DIR = "metadata"
RUN_RECORD = "run.json"
SUCCESS_MARKER = "_SUCCESS"
LEASE = "_LEASE"

RESULT_FIELDS = [
    ("status", pa.string()),  # "ok" or "failed"
    ("error", pa.string()),  # "field: reason" for bad rows, "<Exception>: message" for failed generation
    ("uri", pa.string()),
    ("sha256", pa.string()),
    ("file_size", pa.int64()),
    ("model", pa.string()),
    ("model_revision", pa.string()),
    ("prediction_type", pa.string()),
    ("scheduler_class", pa.string()),
    ("scheduler_config", pa.string()),  # JSON: the exact config the scheduler was built from
    ("dtype", pa.string()),
    ("device", pa.string()),
    ("worker", pa.string()),
    ("t_sample_s", pa.float64()),  # sampler wall time of the image's batch / images in that batch
    ("sampled_at", pa.float64()),  # unix time when the image's sampler call finished (throughput over time)
    ("t_write_s", pa.float64()),
    ("optimizations", pa.string()),  # JSON: the speed switches the sampler ran with (batch/models/speed.py)
    ("vae_redecoded_fp32", pa.bool_()),  # an fp16/bf16 decode gave NaN/black and was redone in fp32
    ("warnings", pa.string()),  # e.g. "prompt: truncated to 77 tokens (had 2391)"; null when none
    ("run_id", pa.string()),
    ("attempt", pa.string()),  # the driver attempt that committed the row; the latest attempt wins
    ("member", pa.string()),  # shard formats: the image's tar member / Parquet key inside the shard at uri
    ("nsfw", pa.bool_()),  # safety checker verdict; null when the model has no checker
]
METADATA_SCHEMA = pa.schema(list(ITEM_SCHEMA) + [pa.field(n, t) for n, t in RESULT_FIELDS]
                            + [pa.field(n, t) for n, t in IMAGE_ITEM_FIELDS + INPUT_FIELDS])  # image tasks; null for txt2img
RESERVED_COLUMNS = set(METADATA_SCHEMA.names) | {"_pixels", "_png", "_input", "_puts", "_uri_key"}

_SLUG = re.compile(r"[^A-Za-z0-9_-]+")


def image_key(row_id: str, image_index: int, ext: str = "png") -> str:
    """Object key of image ``image_index`` of row ``row_id``, relative to the output prefix."""
    digest = hashlib.sha256(row_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    slug = _SLUG.sub("_", row_id).strip("_")[:48]
    name = f"{slug}-{digest}" if slug else digest
    return f"{IMAGES_DIR}/{name}/{int(image_index)}.{ext}"


# Transient storage errors: retried with bounded exponential backoff; anything else fails at once.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError,
              ValueError, TypeError, KeyError)
_TRANSIENT_TEXT = re.compile(
    r"slow ?down|throttl|timed? ?out|timeout|temporar|unavailable|internal ?error|too many requests|"
    r"connection (reset|aborted|refused)|broken pipe|\b(429|500|502|503|504)\b", re.IGNORECASE)


def is_transient(err: BaseException) -> bool:
    """Whether a storage error is worth retrying (timeouts, 5xx, throttling, dropped connections)."""
    if isinstance(err, _PERMANENT):
        return False
    if isinstance(err, (TimeoutError, ConnectionError)):
        return True
    return bool(_TRANSIENT_TEXT.search(f"{type(err).__name__}: {err}"))


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries: ``attempts`` tries in all, sleeping ``base * 2**i`` (capped, with jitter) between."""

    attempts: int = 6
    base_seconds: float = 0.5
    max_seconds: float = 20.0

    def delay(self, i: int) -> float:
        return min(self.max_seconds, self.base_seconds * 2**i) * random.uniform(0.5, 1.0)


DEFAULT_RETRY = RetryPolicy()


def retrying(fn, *args, policy: RetryPolicy = DEFAULT_RETRY, what: str = "", **kwargs):
    """Call ``fn(*args, **kwargs)``; retry transient errors per ``policy``, re-raise the rest (and the last)."""
    for i in range(policy.attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            if i == policy.attempts - 1 or not is_transient(err):
                raise
            pause = policy.delay(i)
            log.warning("storage %s: %s: %s; retry %d/%d in %.1fs", what or getattr(fn, "__name__", "call"),
                        type(err).__name__, err, i + 1, policy.attempts - 1, pause)
            time.sleep(pause)
    raise AssertionError("unreachable")


@dataclass
class Output:
    """A run's output prefix on some fsspec filesystem; every operation retries transient errors."""

    fs: fsspec.AbstractFileSystem
    root: str  # the prefix in the filesystem's own path form (no protocol)
    retry: RetryPolicy = DEFAULT_RETRY

    @property
    def is_local(self) -> bool:
        """A local filesystem (files can be appended to and renamed)."""
        return _is_local(self.fs)

    @property
    def is_process_local(self) -> bool:
        """True for filesystems other processes cannot see (``memory://``): writes must stay in-process."""
        from fsspec.implementations.memory import MemoryFileSystem

        return isinstance(self.fs, MemoryFileSystem)

    def path(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"refusing key outside the output prefix: {key!r}")
        return f"{self.root.rstrip('/')}/{key}"

    def uri(self, key: str) -> str:
        return self.fs.unstrip_protocol(self.path(key))

    def exists(self, key: str) -> bool:
        return retrying(self.fs.exists, self.path(key), policy=self.retry, what=f"exists {key}")

    def put(self, key: str, data: bytes) -> None:
        """Write an object whole: object stores PUT atomically; local files go to a temp name, then rename."""
        retrying(self._put, key, data, policy=self.retry, what=f"put {key}")

    def _put(self, key: str, data: bytes) -> None:
        path = self.path(key)
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        if self.is_local:
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def get(self, key: str) -> bytes:
        return retrying(self.fs.cat_file, self.path(key), policy=self.retry, what=f"get {key}")

    def delete(self, key: str) -> None:
        retrying(self.fs.rm_file, self.path(key), policy=self.retry, what=f"delete {key}")

    def put_json(self, key: str, obj: Any) -> None:
        self.put(key, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())

    def get_json(self, key: str) -> Any:
        return json.loads(self.get(key))

    def put_parquet(self, key: str, table: pa.Table) -> None:
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, compression="zstd")
        self.put(key, buf.getvalue().to_pybytes())

    def list(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` (relative to the output prefix), sorted."""
        return retrying(self._list, prefix, policy=self.retry, what=f"list {prefix}")

    def _list(self, prefix: str) -> list[str]:
        base = self.path(prefix)
        self.fs.invalidate_cache(base)  # another process (a previous attempt) may have written here
        if not self.fs.exists(base):
            return []
        root = self.root.rstrip("/") + "/"
        return sorted(p[len(root):] if p.startswith(root) else p for p in self.fs.find(base))


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def open_output(uri: str, storage_options: dict[str, Any] | None = None, retries: int | None = None) -> Output:
    """Open an output prefix (any fsspec URI); ``retries``: tries per operation on transient errors."""
    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    policy = DEFAULT_RETRY if retries is None else dataclasses.replace(DEFAULT_RETRY, attempts=retries)
    return Output(fs=fs, root=root, retry=policy)


def error_text(err: BaseException) -> str:
    """The metadata ``error`` text of an exception that failed an image or a row (bounded length)."""
    return f"{type(err).__name__}: {err}".strip()[:2000]


def set_column(table: pa.Table, name: str, values: list, type_: pa.DataType) -> pa.Table:
    """``table`` with column ``name`` replaced (or appended) by ``values`` of type ``type_``."""
    arr = pa.array(values, type=type_)
    i = table.schema.get_field_index(name)
    if i >= 0:
        return table.set_column(i, pa.field(name, type_), arr)
    return table.append_column(pa.field(name, type_), arr)


def conform(table: pa.Table, carried: pa.Schema) -> pa.Table:
    """Give ``table`` the full metadata schema: missing columns become nulls, carried columns go last."""
    cols, fields = [], []
    for f in list(METADATA_SCHEMA) + list(carried):
        if f.name in table.column_names:
            col = table.column(f.name)
            cols.append(col if col.type == f.type else col.cast(f.type))
        else:
            cols.append(pa.nulls(table.num_rows, type=f.type))
        fields.append(f)
    return pa.Table.from_arrays(cols, schema=pa.schema(fields))


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


def compact(out: Output, rows_per_part: int = 250_000) -> tuple[int, int]:
    """Rewrite the committed parts as a few parts; return (parts before, parts after).

    Crash-safe: the compacted parts are committed first (rows keep their own ``attempt``), the old parts
    are deleted after; a crash in between leaves identical duplicates, which readers collapse.
    """
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

"""fsspec I/O for a run's output prefix: object keys, whole-object writes, bounded retries of transient errors.

Layout under a run's output prefix::

    images/<slug>-<hash>/<k>.png              one object per generated image (k = image index in the row)
    shards/...                                WebDataset / Parquet shards (``output_format``)
    metadata/part-<attempt>-<nnnnnn>.parquet  committed metadata (``batch.store.commit``)
    run.json, _LEASE, _SUCCESS                run record, lease, completion marker (``batch.store.commit``)
    logs/<run_id>.jsonl                       structured run log (``batch.store.runlog``)

Object keys derive only from (row id, image index): the id is reduced to a short slug of
``[A-Za-z0-9_-]`` plus 16 hex digits of its SHA-256, so no id (``../``, absolute paths, separators,
unicode, NUL) can steer a write outside the prefix, and two ids never share a key.
"""

from __future__ import annotations

import dataclasses
import hashlib
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

log = logging.getLogger(__name__)


IMAGES_DIR = "images"


TMP_MARK = ".tmp-"  # local writes go to <dir>/.<name>.tmp-<random> first, then are renamed (``Output.put``)


def temp_path(path: str) -> str:
    """A fresh temp name next to ``path`` for a local write: ``<dir>/.<name>.tmp-<random>``. The leading dot
    hides a temp file left by a killed writer from Ray Data's directory listing (it skips names starting with
    ``.`` or ``_``), so ``ray.data.read_webdataset(OUTPUT/shards)`` never opens a partial shard."""
    parent, _, name = path.rpartition("/")
    return f"{parent}/.{name}{TMP_MARK}{uuid.uuid4().hex}" if parent else f".{name}{TMP_MARK}{uuid.uuid4().hex}"


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


class StorageError(OSError):
    """The output store refused a write after its retries (disk full, read-only, no permission, gone): an
    environment failure that ends the job (exit code 3, ``batch.cli``), never a row failure of the driver."""


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries: ``attempts`` tries in all, sleeping ``base * 2**i`` (capped, with jitter) between."""

    attempts: int = 6
    base_seconds: float = 0.5
    max_seconds: float = 20.0

    def delay(self, i: int) -> float:
        return min(self.max_seconds, self.base_seconds * 2**i) * random.uniform(0.5, 1.0)


DEFAULT_RETRY = RetryPolicy()


# Retry layers (one per filesystem; never stacked):
# - s3fs: botocore retries every request (``config_kwargs.retries``, set by :func:`storage_options_for` to
#   standard mode with ``storage_retries`` attempts: throttling such as 503 SlowDown, 5xx, timeouts, dropped
#   connections, with exponential backoff and jitter), and s3fs's own ``_error_wrapper`` (as s3fs ships it)
#   retries reading a response body and a SlowDown that reaches it. ``retrying`` below makes one try there.
# - gcsfs retries 5xx/429 and timeouts itself (``retry_request``); ``retrying`` makes one try there too.
# - every other filesystem (local disks and mounts, memory://, plug-ins): ``retrying`` with ``RetryPolicy``.
OWN_RETRY_PROTOCOLS = ("s3", "s3a", "gs", "gcs")


def has_own_retries(fs: Any) -> bool:
    """Whether ``fs``'s client already retries transient errors (s3fs/botocore, gcsfs): then we do not."""
    protocols = getattr(fs, "protocol", ())
    protocols = (protocols,) if isinstance(protocols, str) else tuple(protocols or ())
    return any(p in OWN_RETRY_PROTOCOLS for p in protocols)


def storage_options_for(uri: str, storage_options: dict[str, Any] | None, retries: int | None = None) -> dict:
    """``storage_options`` for ``uri``, plus botocore's retry settings for S3 (``config_kwargs.retries``:
    standard mode, ``retries`` tries in all) unless the user set them."""
    options = dict(storage_options or {})
    if uri.split("://", 1)[0] in ("s3", "s3a"):
        config = dict(options.get("config_kwargs") or {})
        # total_max_attempts counts the first try (botocore's max_attempts counts retries only)
        config.setdefault("retries", {"mode": "standard", "total_max_attempts":
                                      retries if retries is not None else DEFAULT_RETRY.attempts})
        options["config_kwargs"] = config
    return options


def retrying(fn, *args, policy: RetryPolicy = DEFAULT_RETRY, what: str = "", **kwargs):
    """Call ``fn(*args, **kwargs)``; retry transient errors per ``policy``, re-raise the rest (and the last).

    One try only when ``fn`` is a method of a filesystem that retries by itself (:func:`has_own_retries`)."""
    if has_own_retries(getattr(fn, "__self__", None)):
        return fn(*args, **kwargs)
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
        """Write an object whole: object stores PUT atomically; local files go to a temp name, then rename.
        A write that still fails after the retries raises :class:`StorageError` naming the object."""
        try:
            retrying(self._put, key, data, policy=self.retry, what=f"put {key}")
        except OSError as err:
            raise StorageError(f"cannot write {self.uri(key)}: {type(err).__name__}: {err}") from err

    def _put(self, key: str, data: bytes) -> None:
        path = self.path(key)
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        if self.is_local:
            tmp = temp_path(path)
            try:
                self.fs.pipe_file(tmp, data)
                self.fs.mv(tmp, path)
            except BaseException:  # a full disk leaves a partial temp file: remove it (compact removes any left)
                try:
                    self.fs.rm_file(tmp)
                except Exception:
                    pass
                raise
        else:
            self.fs.pipe_file(path, data)

    def create(self, key: str, data: bytes) -> bool:
        """Write an object only if it does not exist: True if this call created it, False if it existed.

        Atomic where the store offers create-if-absent: local files are written to a temp name and hard-linked
        into place (``link`` fails if the name exists: no reader sees a partial file); S3 via s3fs's
        ``pipe_file(mode="create")``, a PUT with ``If-None-Match: *`` (412 PreconditionFailed when the key
        exists); other fsspec filesystems via the same ``mode="create"`` (memory:// honours it; gcsfs releases
        that implement it send ``ifGenerationMatch=0``: not exercised here). A filesystem that refuses the mode
        gets exists-then-put, which is not atomic (a warning is logged). A write that fails for another reason
        raises :class:`StorageError` naming the object.
        """
        try:
            return retrying(self._create, key, data, policy=self.retry, what=f"create {key}")
        except OSError as err:
            raise StorageError(f"cannot write {self.uri(key)}: {type(err).__name__}: {err}") from err

    def _create(self, key: str, data: bytes) -> bool:
        path = self.path(key)
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        try:
            if self.is_local:
                import os

                tmp = temp_path(path)
                try:
                    self.fs.pipe_file(tmp, data)
                    os.link(tmp, path)  # atomic, and fails when ``path`` exists (O_EXCL semantics)
                finally:
                    if os.path.lexists(tmp):
                        os.unlink(tmp)
            else:
                self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        except (NotImplementedError, TypeError, ValueError) as err:  # no create-if-absent in this filesystem
            log.warning("storage create %s: %s has no create-if-absent (%s); writing if absent, not atomically",
                        key, type(self.fs).__name__, err)
            if self.fs.exists(path):
                return False
            self._put(key, data)
        return True

    def get(self, key: str) -> bytes:
        return retrying(self.fs.cat_file, self.path(key), policy=self.retry, what=f"get {key}")

    def delete(self, key: str) -> None:
        try:
            retrying(self.fs.rm_file, self.path(key), policy=self.retry, what=f"delete {key}")
        except OSError as err:
            raise StorageError(f"cannot delete {self.uri(key)}: {type(err).__name__}: {err}") from err

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
    """Open an output prefix (any fsspec URI); ``retries``: tries per operation on transient errors, by the
    filesystem's own client where it has one (S3: botocore), else by :func:`retrying`."""
    fs, root = fsspec.core.url_to_fs(uri, **storage_options_for(uri, storage_options, retries))
    policy = DEFAULT_RETRY if retries is None else dataclasses.replace(DEFAULT_RETRY, attempts=retries)
    if has_own_retries(fs):  # one retry layer: the client's (see OWN_RETRY_PROTOCOLS)
        policy = dataclasses.replace(policy, attempts=1)
    return Output(fs=fs, root=root, retry=policy)


def error_text(err: BaseException) -> str:
    """The metadata ``error`` text of an exception that failed an image or a row (bounded length); a
    :class:`StorageError` is described by the store's own error (the row's ``uri`` already names the object)."""
    if isinstance(err, StorageError) and err.__cause__ is not None:
        err = err.__cause__
    return f"{type(err).__name__}: {err}".strip()[:2000]

"""Output layout, object keys, image encoding and the metadata schema, over any fsspec filesystem.

Layout under a run's output prefix::

    images/<slug>-<hash>/<k>.png   one object per generated image (k = image index within the row)
    metadata/part-000000.parquet  metadata, one row per image (or per failed manifest row), in parts
    run.json                      run record: spec, versions, host, start/end, counts
    _SUCCESS                      completion marker, written last

Object keys derive only from (row id, image index): the id is reduced to a short slug of
``[A-Za-z0-9_-]`` plus 16 hex digits of its SHA-256, so no id (``../``, absolute paths, separators,
unicode, NUL) can steer a write outside the prefix, and two ids never share a key.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from batch.manifest import ITEM_SCHEMA

IMAGES_DIR = "images"
METADATA_DIR = "metadata"
RUN_RECORD = "run.json"
SUCCESS_MARKER = "_SUCCESS"

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
    ("t_write_s", pa.float64()),
    ("run_id", pa.string()),
    ("member", pa.string()),  # shard formats: the image's tar member / Parquet key inside the shard at uri
    ("nsfw", pa.bool_()),  # safety checker verdict; null when the model has no checker
]
METADATA_SCHEMA = pa.schema(list(ITEM_SCHEMA) + [pa.field(n, t) for n, t in RESULT_FIELDS])
RESERVED_COLUMNS = set(METADATA_SCHEMA.names) | {"_pixels", "_png", "_puts"}

_SLUG = re.compile(r"[^A-Za-z0-9_-]+")


def image_key(row_id: str, image_index: int, ext: str = "png") -> str:
    """Object key of image ``image_index`` of row ``row_id``, relative to the output prefix."""
    digest = hashlib.sha256(row_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    slug = _SLUG.sub("_", row_id).strip("_")[:48]
    name = f"{slug}-{digest}" if slug else digest
    return f"{IMAGES_DIR}/{name}/{int(image_index)}.{ext}"


def encode_png(pixels: np.ndarray) -> bytes:
    """Lossless PNG of an (H, W, 3) uint8 array; deterministic for equal pixels."""
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@dataclass
class Output:
    """A run's output prefix on some fsspec filesystem."""

    fs: fsspec.AbstractFileSystem
    root: str  # the prefix in the filesystem's own path form (no protocol)

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
        return self.fs.exists(self.path(key))

    def put(self, key: str, data: bytes) -> None:
        """Write an object whole: object stores PUT atomically; local files go to a temp name, then rename."""
        path = self.path(key)
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        if _is_local(self.fs):
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def get(self, key: str) -> bytes:
        return self.fs.cat_file(self.path(key))

    def put_json(self, key: str, obj: Any) -> None:
        self.put(key, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())

    def get_json(self, key: str) -> Any:
        return json.loads(self.get(key))

    def put_parquet(self, key: str, table: pa.Table) -> None:
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, compression="zstd")
        self.put(key, buf.getvalue().to_pybytes())

    def list(self, prefix: str) -> list[str]:
        base = self.path(prefix)
        if not self.fs.exists(base):
            return []
        root = self.root.rstrip("/") + "/"
        return sorted(p[len(root):] if p.startswith(root) else p for p in self.fs.find(base))


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def open_output(uri: str, storage_options: dict[str, Any] | None = None) -> Output:
    """Open an output prefix (any fsspec URI)."""
    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    return Output(fs=fs, root=root)


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


def read_metadata(uri: str, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """All committed metadata rows of a run, as one table."""
    out = open_output(uri, storage_options)
    parts = [k for k in out.list(METADATA_DIR) if k.endswith(".parquet")]
    if not parts:
        return METADATA_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(io.BytesIO(out.get(k))) for k in parts])

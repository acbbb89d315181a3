"""Output formats: where and how a block of generated images is written (img2dataset conventions).

``output_format`` (spec) picks the container, ``image_format`` the encoding of each image. Each container is
one :class:`BlockWriter` subclass, registered by name in :data:`WRITERS` (as img2dataset's ``writer.py``):

* :class:`FilesWriter` (``files``, default): one object per image, ``images/<slug>-<sha16>/<k>.<ext>``;
  metadata ``uri`` is the object, ``member`` is null.
* :class:`WebDatasetWriter` (``webdataset``): one tar shard per written block (or per ``images_per_shard``
  images of it), ``shards/<block>.tar``,
  holding per sample ``<key>.<ext>`` (the image), ``<key>.json`` (its generation parameters) and
  ``<key>.txt`` (the prompt); metadata ``uri`` is the shard and ``member`` the image's tar member name.
* :class:`ParquetWriter` (``parquet``): one Parquet file per written block (or per ``images_per_shard``),
  ``shards/<block>.parquet``, one row per image with the encoded bytes in a column named by the extension
  (``png``/``webp``/``jpg``) next to ``key``, ``caption`` (the prompt, img2dataset's name), ``sha256`` and
  every generation parameter of :data:`SAMPLE_FIELDS` (prompt, seed, guidance, steps, scheduler, model, ...)
  typed as in the metadata schema, so a shard is usable without a join; metadata ``member`` is the ``key``.

The interface: ``BlockWriter(fmt, put, block_images).write(samples)`` takes the block's encoded samples
(:class:`Sample`: ``key``, ``meta``, ``data``), writes them through ``put`` and returns, per sample, a
:class:`Stored` (object ``key`` under the output prefix, ``member`` inside it, write ``seconds``) or the
exception that failed it. :class:`ShardWriter` is the shared base of the two shard formats: a subclass
says only how to build its shard bytes and name a sample's member. :func:`write_block` does the rest for
every format: encoding, hashing, per-image failures as data, retries and the ``upload=False`` hand-off.

Every shard has a ``shards/_stats/<block>.json`` (counts, bytes, format, timings): under a folder whose name
starts with ``_``, which Ray Data's directory listing skips (``ray.data.datasource.file_meta_provider.
_expand_directory`` excludes relative paths starting with ``.`` or ``_``), so ``ray.data.read_webdataset(
OUTPUT/shards)`` and ``ray.data.read_parquet(OUTPUT/shards)`` read the shards alone, with no arguments.
``<block>`` is derived from the shard's sample keys only (16 hex digits of their SHA-256), so a rerun of the
same block writes the same name. A shard is built whole in memory and written with one atomic put (object stores PUT
whole objects; local files go to a temp name, then rename), and metadata naming it is committed only after
that put returned: metadata never references a partial shard.

Image encodings: ``png`` (lossless), ``webp`` (lossless by default, ``webp_lossless: false`` for lossy at
``jpeg_quality``), ``jpeg`` (``jpeg_quality``, 4:4:4). Lossy encodings change pixels and so shift FID and
other metrics computed from the stored images: :func:`format_warnings` says so at job start. PNGs carry
their generation parameters in a ``parameters`` text chunk (:func:`png_parameters`, the AUTOMATIC1111 web UI's
infotext, which Stable Diffusion tools read back); the chunk holds no timestamp, so equal pixels and
parameters still give equal bytes (and ``sha256``).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from batch.store.io import (DEFAULT_RETRY, Output, RetryPolicy, error_text, image_key, open_output, retrying,
                            storage_options_for)
from batch.store.schema import METADATA_SCHEMA
from batch.store.schema import set_column as _set_column

SHARDS_DIR = "shards"
STATS_DIR = f"{SHARDS_DIR}/_stats"  # "_": skipped by Ray Data's listing of SHARDS_DIR (module docstring)
EXTENSIONS = {"png": "png", "webp": "webp", "jpeg": "jpg"}
# generation parameters stored in each WebDataset sample's .json (and useful to any reader of a shard)
SAMPLE_FIELDS = ("id", "image_index", "prompt", "negative_prompt", "seed", "height", "width", "guidance_scale",
                 "num_inference_steps", "scheduler", "model", "model_revision", "nsfw")
PUTS_TYPE = pa.list_(pa.struct([("key", pa.string()), ("data", pa.binary())]))


@dataclass(frozen=True)
class OutputFormat:
    """Container and image encoding of a run's outputs (the spec's ``output_format`` etc.)."""

    output_format: str = "files"
    image_format: str = "png"
    webp_lossless: bool = True
    jpeg_quality: int = 95
    images_per_shard: int | None = None  # shard formats: at most this many images per shard (None: the block)

    @classmethod
    def from_spec(cls, spec) -> "OutputFormat":
        return cls(spec.output_format, spec.image_format, spec.webp_lossless, spec.jpeg_quality,
                   getattr(spec, "images_per_shard", None))

    @property
    def ext(self) -> str:
        return EXTENSIONS[self.image_format]

    @property
    def lossless(self) -> bool:
        return self.image_format == "png" or (self.image_format == "webp" and self.webp_lossless)


def format_warnings(fmt: OutputFormat) -> list[str]:
    """Warnings worth logging at job start (lossy encodings distort FID)."""
    if fmt.lossless:
        return []
    return [f"image_format={fmt.image_format} (quality {fmt.jpeg_quality}) is lossy: stored pixels differ from the "
            "generated ones, which shifts FID and CLIP scores computed from them; use png or lossless webp for "
            "evaluation runs"]


def _a1111_quote(value: Any) -> str:
    """A value as AUTOMATIC1111's infotext writes it: JSON-quoted only if it holds ``,`` ``:`` or a newline
    (``modules/infotext_utils.py::quote`` in stable-diffusion-webui)."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def png_parameters(meta: dict) -> str:
    """The ``parameters`` PNG text of one image, in AUTOMATIC1111's infotext form
    (``modules/processing.py::create_infotext``): the prompt, ``Negative prompt: ...`` when there is one,
    then ``Steps: 50, Sampler: <scheduler>, CFG scale: 7.5, Seed: 123, Size: <W>x<H>, Model: <model>, ...``
    (absent values left out). Only generation parameters: no time, no host, so it is deterministic."""
    params = {"Steps": meta.get("num_inference_steps"), "Sampler": meta.get("scheduler"),
              "CFG scale": meta.get("guidance_scale"), "Seed": meta.get("seed"),
              "Size": f"{meta['width']}x{meta['height']}" if meta.get("width") and meta.get("height") else None,
              "Model": meta.get("model"), "Model revision": meta.get("model_revision"),
              "Image index": meta.get("image_index")}
    negative = meta.get("negative_prompt")
    lines = [meta.get("prompt") or ""] + ([f"Negative prompt: {negative}"] if negative else [])
    lines.append(", ".join(f"{k}: {_a1111_quote(_jsonable(v))}" for k, v in params.items() if v is not None))
    return "\n".join(lines)


def encode_image(pixels: np.ndarray, fmt: OutputFormat, parameters: str | None = None) -> bytes:
    """Encode an (H, W, 3) uint8 array; deterministic bytes for equal pixels, settings and ``parameters``.

    ``parameters`` (PNG only) goes into a ``parameters`` text chunk (tEXt, or compressed iTXt when it is not
    Latin-1); it never changes the pixels."""
    buf = io.BytesIO()
    img = Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")
    if fmt.image_format == "png":
        info = None
        if parameters is not None:
            from PIL.PngImagePlugin import PngInfo

            info = PngInfo()
            info.add_text("parameters", parameters)  # Pillow switches to iTXt for non-Latin-1 text
        img.save(buf, format="PNG", pnginfo=info)
    elif fmt.image_format == "webp":
        if fmt.webp_lossless:
            img.save(buf, format="WEBP", lossless=True, quality=100, method=4, exact=True)
        else:
            img.save(buf, format="WEBP", quality=fmt.jpeg_quality, method=4)
    elif fmt.image_format == "jpeg":
        img.save(buf, format="JPEG", quality=fmt.jpeg_quality, subsampling=0)
    else:
        raise ValueError(f"image_format must be one of {list(EXTENSIONS)}, got {fmt.image_format!r}")
    return buf.getvalue()


def encode_row(row: dict, fmt: OutputFormat) -> bytes:
    """One generated image as every writer stores it: ``row["_pixels"]`` (raw uint8 ``height`` x ``width`` x 3,
    from the sampler) encoded in ``fmt``, PNGs with :func:`png_parameters` of ``row``. The one encoder of
    :func:`write_block` and of the serving endpoint (:mod:`batch.serve.protocol`), so an image served for a row
    is byte for byte the image the batch job writes for it."""
    arr = np.frombuffer(row["_pixels"], dtype=np.uint8).reshape(row["height"], row["width"], 3)
    return encode_image(arr, fmt, png_parameters(row) if fmt.image_format == "png" else None)


def decode_image(data: bytes) -> np.ndarray:
    """Decode PNG/WebP/JPEG bytes to an (H, W, 3) uint8 array."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def sample_key(row_id: str, image_index: int) -> str:
    """WebDataset/Parquet sample key of image ``image_index`` of row ``row_id``: no dots, no slashes, unique
    (the same ``<slug>-<sha16>`` as the files layout, then ``_<k>``)."""
    return f"{image_key(row_id, image_index).split('/')[1]}_{int(image_index)}"


def block_name(keys: list[str]) -> str:
    """Deterministic shard name of a block: 16 hex digits of SHA-256 over its sample keys, in order."""
    return hashlib.sha256("\n".join(keys).encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: equal samples -> equal bytes
    tar.addfile(info, io.BytesIO(data))


def _jsonable(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _stats_bytes(stats: dict) -> bytes:
    return (json.dumps(stats, indent=2, sort_keys=True) + "\n").encode()


class Sample(NamedTuple):
    """One encoded image of a block, as a writer gets it (a plain ``(key, meta, data)`` tuple works too)."""

    key: str  # sample key (:func:`sample_key`): no dots, no slashes
    meta: dict  # its generation parameters (the :data:`SAMPLE_FIELDS` the block has; always id, image_index)
    data: bytes  # the encoded image


class Stored(NamedTuple):
    """Where a writer stored one sample."""

    key: str  # the object holding it, relative to the output prefix (metadata ``uri`` names it)
    member: str | None  # its name inside that object (shards), or None (the object is the image)
    seconds: float  # write time attributed to this sample


# put(j, key, data): write one whole object; j is the position (in the samples passed to write) of the
# sample whose row carries the object when the driver writes instead (upload=False)
Put = Callable[[int, str, bytes], None]


class BlockWriter(ABC):
    """One output format: writes a block's encoded samples and says where each one went.

    ``put`` writes one whole object (and raises on failure); ``block_images`` counts the block's images,
    written or not (the shard stats report it). Writers never raise for a sample: a failure is returned.
    """

    def __init__(self, fmt: OutputFormat, put: Put, block_images: int):
        self.fmt, self.put, self.block_images = fmt, put, block_images

    @abstractmethod
    def write(self, samples: Sequence[Sample]) -> list[Stored | Exception]:
        """Write ``samples``; return per sample where it was stored, or the exception that failed it."""


class FilesWriter(BlockWriter):
    """``files``: one object per image, ``images/<slug>-<sha16>/<k>.<ext>``; a failed put fails its image."""

    def write(self, samples: Sequence[Sample]) -> list[Stored | Exception]:
        stored: list[Stored | Exception] = []
        for j, (_, meta, data) in enumerate(samples):
            t0 = time.perf_counter()
            key = image_key(meta["id"], meta["image_index"], self.fmt.ext)
            try:
                self.put(j, key, data)
            except Exception as err:  # a storage error fails this image only
                stored.append(err)
                continue
            stored.append(Stored(key, None, time.perf_counter() - t0))
        return stored


class ShardWriter(BlockWriter):
    """A shard format: the block's samples in one object, ``shards/<block>.<extension>`` (or, with
    ``images_per_shard``, consecutive runs of at most that many in one object each), written whole by one put,
    then ``shards/_stats/<block>.json``; a failure of either fails every sample in that shard."""

    extension: ClassVar[str]

    @staticmethod
    @abstractmethod
    def build(samples: Sequence[Sample], ext: str) -> bytes:
        """The shard's bytes; ``ext`` is the image extension (``png``/``webp``/``jpg``)."""

    @abstractmethod
    def member(self, sample: Sample) -> str:
        """The name of ``sample``'s image inside the shard (metadata ``member``)."""

    def write(self, samples: Sequence[Sample]) -> list[Stored | Exception]:
        if not samples:  # nothing to write: no shard, no stats
            return []
        size = self.fmt.images_per_shard or len(samples)
        stored: list[Stored | Exception] = []
        for start in range(0, len(samples), size):
            # the block's images that failed before writing are counted once, in its first shard's stats
            failed_before = self.block_images - len(samples) if start == 0 else 0
            stored += self._write_shard(samples[start:start + size], failed_before)
        return stored

    def _write_shard(self, samples: Sequence[Sample], failed_before: int) -> list[Stored | Exception]:
        t0 = time.perf_counter()
        name = block_name([s.key for s in samples])
        key = f"{SHARDS_DIR}/{name}.{self.extension}"
        fmt = self.fmt
        stats: dict[str, Any] = {"output_format": fmt.output_format, "image_format": fmt.image_format,
                                 "lossless": fmt.lossless, "images": len(samples) + failed_before,
                                 "failed_before_write": failed_before}
        try:
            shard = self.build(samples, fmt.ext)
            self.put(0, key, shard)  # atomic: the whole shard or nothing
            stats.update(shard=key, written=len(samples), bytes=len(shard),
                         image_bytes=sum(len(d) for _, _, d in samples), t_write_s=time.perf_counter() - t0)
            self.put(0, stats_key(key), _stats_bytes(stats))
        except Exception as err:  # the shard failed: every image in it fails
            return [err] * len(samples)
        dt = (time.perf_counter() - t0) / len(samples)
        return [Stored(key, self.member(s), dt) for s in samples]


def stats_key(shard_key: str) -> str:
    """The stats object of a shard: ``shards/<block>.<ext>`` -> ``shards/_stats/<block>.json``."""
    return f"{STATS_DIR}/{shard_key.rsplit('/', 1)[-1].rsplit('.', 1)[0]}.json"


class WebDatasetWriter(ShardWriter):
    """``webdataset``: a tar shard; per sample ``key.<ext>``, ``key.json``, ``key.txt`` (grouped by key)."""

    extension = "tar"

    @staticmethod
    def build(samples: Sequence[Sample], ext: str) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, meta, data in samples:
                _tar_member(tar, f"{key}.{ext}", data)
                _tar_member(tar, f"{key}.json", json.dumps({k: _jsonable(v) for k, v in meta.items()},
                                                           sort_keys=True).encode())
                _tar_member(tar, f"{key}.txt", (meta.get("prompt") or "").encode())
        return buf.getvalue()

    def member(self, sample: Sample) -> str:
        return f"{sample[0]}.{self.fmt.ext}"


class ParquetWriter(ShardWriter):
    """``parquet``: a Parquet shard, one row per image, the encoded bytes in the column named ``ext``."""

    extension = "parquet"

    @staticmethod
    def build(samples: Sequence[Sample], ext: str) -> bytes:
        columns = {"key": pa.array([k for k, _, _ in samples], pa.string()),
                   "caption": pa.array([m.get("prompt") for _, m, _ in samples], pa.string())}
        for name in SAMPLE_FIELDS:  # every generation parameter, typed as the metadata column of that name
            columns[name] = pa.array([_jsonable(m.get(name)) for _, m, _ in samples],
                                     METADATA_SCHEMA.field(name).type)
        columns["sha256"] = pa.array([hashlib.sha256(d).hexdigest() for _, _, d in samples], pa.string())
        columns[ext] = pa.array([d for _, _, d in samples], pa.binary())
        table = pa.table(columns)
        out = pa.BufferOutputStream()
        pq.write_table(table, out, compression="none")  # image bytes are already compressed
        return out.getvalue().to_pybytes()

    def member(self, sample: Sample) -> str:
        return sample[0]


# one writer class per output_format (the spec's names)
WRITERS: dict[str, type[BlockWriter]] = {"files": FilesWriter, "webdataset": WebDatasetWriter,
                                         "parquet": ParquetWriter}
build_webdataset = WebDatasetWriter.build  # the shard builders on their own (bench, tests)
build_parquet = ParquetWriter.build


def write_block(batch: pa.Table, output: str, storage_options: dict[str, Any], upload: bool,
                fmt: OutputFormat, retries: int | None = None) -> pa.Table:
    """Encode and write one block's images in ``fmt``; return the block with result columns.

    Adds ``uri``, ``member``, ``sha256`` (of the encoded image), ``file_size``, ``t_write_s`` and updates
    ``status``/``error`` (a failed encode or put fails its image, or for a shard every image in it).
    With ``upload=False`` nothing is written (nor opened: process-local filesystems exist only in the
    driver); a ``_puts`` column (list of ``{key, data}``) carries the objects for the driver to write, in
    order, and ``_uri_key`` the key each row's ``uri`` will name (see :func:`apply_driver_writes`).

    1. encode every generated image (per-image failure isolation; PNGs with their ``parameters`` chunk);
    2. write the encoded samples with the format's :data:`WRITERS` class;
    3. fill the result columns.
    """
    # puts retry transient storage errors; without upload the filesystem may not even exist in this process
    out = open_output(output, storage_options, retries=retries) if upload else None
    wanted = ["id", "image_index", "height", "width", "status", "error", "_pixels"]
    rows = batch.select(wanted).to_pylist()
    params = batch.select([c for c in SAMPLE_FIELDS if c in batch.column_names]).to_pylist()  # per-sample .json
    n = len(rows)
    status, error = [r["status"] for r in rows], [r["error"] for r in rows]
    uri_key: list = [None] * n  # the object holding each image, relative to the output prefix
    member: list = [None] * n
    sha: list = [None] * n
    size: list = [None] * n
    t_write: list = [None] * n
    puts: list[list[dict]] = [[] for _ in range(n)]

    # 1. encode
    encoded: dict[int, bytes] = {}
    t_enc: dict[int, float] = {}
    for i, r in enumerate(rows):
        if r["status"] != "ok" or r["_pixels"] is None:
            continue
        t0 = time.perf_counter()
        try:
            encoded[i] = encode_row({**params[i], **r}, fmt)
        except Exception as err:  # failures are data: this image fails, the block goes on
            status[i], error[i] = "failed", error_text(err)
        t_enc[i] = time.perf_counter() - t0

    # 2. write
    order = sorted(encoded)  # the row of each sample, in block order
    samples = [Sample(sample_key(rows[i]["id"], rows[i]["image_index"]), params[i], encoded[i]) for i in order]

    def put(j: int, key: str, data: bytes) -> None:
        if upload:
            out.put(key, data)
        else:
            puts[order[j]].append({"key": key, "data": data})

    writer = WRITERS.get(fmt.output_format)
    if writer is None:
        names = list(WRITERS)
        bad = ValueError(f"output_format must be {', '.join(names[:-1])} or {names[-1]}, "
                         f"got {fmt.output_format!r}")
        stored: list[Stored | Exception] = [bad] * len(samples)
    else:
        stored = writer(fmt, put, n).write(samples)
    for i, s in zip(order, stored):
        if isinstance(s, Exception):
            status[i], error[i] = "failed", error_text(s)
        else:
            uri_key[i], member[i], t_write[i] = s.key, s.member, t_enc[i] + s.seconds

    # 3. results
    for i, data in encoded.items():
        if status[i] == "ok":
            sha[i], size[i] = hashlib.sha256(data).hexdigest(), len(data)
    uri = [out.uri(k) if k else None for k in uri_key] if upload else [None] * n
    result = batch.drop_columns(["_pixels"])
    for col, values, type_ in (
        ("status", status, pa.string()), ("error", error, pa.string()), ("uri", uri, pa.string()),
        ("member", member, pa.string()), ("sha256", sha, pa.string()), ("file_size", size, pa.int64()),
        ("t_write_s", t_write, pa.float64()),
    ):
        result = _set_column(result, col, values, type_)
    if not upload:  # the driver writes the objects, then sets uri from _uri_key (apply_driver_writes)
        result = _set_column(result, "_puts", puts, PUTS_TYPE)
        result = _set_column(result, "_uri_key", uri_key, pa.string())
    return result


class ImageReader:
    """Reads any stored image back from its metadata row (``uri`` + ``member``), whatever the format.

    Keeps the last shard it opened, so reading a shard's images in order costs one fetch. Transient storage
    errors are retried per ``retry`` (:func:`batch.store.io.retrying`), as every other storage operation is.
    """

    def __init__(self, storage_options: dict[str, Any] | None = None, retry: RetryPolicy = DEFAULT_RETRY):
        self.storage_options = storage_options or {}
        self.retry = retry
        self._shard_uri: str | None = None
        self._shard: dict[str, bytes] = {}

    def _fetch(self, uri: str) -> bytes:
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri, **storage_options_for(uri, self.storage_options, self.retry.attempts))
        return retrying(fs.cat_file, path, policy=self.retry, what=f"read {uri}")

    def _open_shard(self, uri: str) -> dict[str, bytes]:
        if uri != self._shard_uri:
            data = self._fetch(uri)
            if uri.endswith(".tar"):
                with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                    members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
            elif uri.endswith(".parquet"):
                table = pq.read_table(io.BytesIO(data))
                col = next(c for c in EXTENSIONS.values() if c in table.column_names)
                members = dict(zip(table.column("key").to_pylist(), table.column(col).to_pylist()))
            else:
                raise ValueError(f"not a shard (expected .tar or .parquet): {uri}")
            self._shard_uri, self._shard = uri, members
        return self._shard

    def read_bytes(self, row: dict) -> bytes:
        """The stored (encoded) bytes of the image a metadata row points at."""
        if row.get("uri") is None:
            raise ValueError(f"row {row.get('id')!r} image {row.get('image_index')} has no stored image "
                             f"(status {row.get('status')!r})")
        if row.get("member") is None:
            return self._fetch(row["uri"])
        shard = self._open_shard(row["uri"])
        if row["member"] not in shard:
            raise KeyError(f"{row['uri']} has no member {row['member']!r}")
        return shard[row["member"]]

    def read(self, row: dict) -> np.ndarray:
        """The stored image of a metadata row as an (H, W, 3) uint8 array."""
        return decode_image(self.read_bytes(row))


def write_puts(out: Output, puts: list[dict] | None) -> None:
    """Write the objects a ``_puts`` cell carries, in order."""
    for obj in puts or []:
        out.put(obj["key"], obj["data"])


def apply_driver_writes(out: Output, batch: pa.Table) -> pa.Table:
    """Driver side of ``upload=False``: write every row's ``_puts``, then fill ``uri`` from ``_uri_key``
    and drop both columns. Objects are written before the rows are returned (and so before any commit)."""
    for puts in batch.column("_puts").to_pylist():
        write_puts(out, puts)
    uris = [out.uri(k) if k else None for k in batch.column("_uri_key").to_pylist()]
    batch = _set_column(batch, "uri", uris, pa.string())
    return batch.drop_columns(["_puts", "_uri_key"])

"""Deduplication across runs: images an earlier run already holds are recorded, not generated again.

Spec ``dedup_against`` names earlier outputs: run prefixes (holding ``run.json``), or base prefixes whose
child folders are runs (a nightly's ``BASE/`` holding ``dt=YYYY-MM-DD/``; the job's own output is left out).

**The key** of an image (:func:`image_keys`) is a 64-bit hash of what decides its pixels: the model (a local
folder by its content fingerprint alone, so a moved folder still matches), its resolved revision, the task,
prompt, negative prompt, guidance scale, steps, output size (for tasks whose manifest sets it), scheduler
name (``model``: the model's own, as the sampler records it), the effective per-image seed, and the image tasks' input URI, noise level, preprocessing and tiling.
It does not hold the dtype, device, speed switches or output encoding (they change pixels by rounding at
most, or only how they are stored), nor an input image's bytes: an input overwritten in place keeps its key,
so give changed inputs new URIs. Each column is hashed vectorised (``pandas.util.hash_array``: SipHash-2-4
for strings, a 64-bit mix for numbers; nulls get their own value) and the columns are combined as
``pandas.core.util.hashing.combine_hash_arrays`` does. A second key with another hash key verifies each
match, so a skipped image matches on 128 bits.

**The index** (:class:`DedupIndex`) is built once per job by reading only the key columns and ``status``
of every earlier committed metadata part, one part at a time; it keeps, per distinct key of a done image
(``ok``, or ``skipped``: that row names the original), the key and where the row is (part number, row): 16
bytes per distinct earlier image, sorted for ``searchsorted``. :meth:`DedupIndex.split` then looks a table
of work items up (vectorised), reads back only the parts holding matches to verify them and to copy the
earlier image's ``uri``, ``member``, ``sha256``, ... into a metadata row of status ``skipped`` with
``reused_from`` naming the earlier run. The earlier images are referenced, not copied: deleting an earlier
run's prefix leaves this run's skipped rows pointing nowhere.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batch.spec.base import SpecError
from batch.store.commit import RUN_RECORD, metadata_parts
from batch.store.io import Output, open_output, retrying
from batch.store.schema import DONE_STATUSES, METADATA_SCHEMA, SKIPPED
from batch.tasks import TASKS

# Item fields in the key (besides model and revision); height/width only for tasks whose manifest sets them
# (the x4 upscaler's output size follows its input, named by image_uri).
KEY_FIELDS = ("task", "prompt", "negative_prompt", "guidance_scale", "num_inference_steps", "height", "width",
              "scheduler", "seed", "image_uri", "noise_level", "preprocessing", "tile_size", "tile_overlap")
SIZE_FIELDS = ("height", "width")

# What a skipped row copies from the earlier image's row.
REUSED_FIELDS = ("uri", "member", "sha256", "file_size", "model", "model_revision", "prediction_type",
                 "scheduler_class", "scheduler_config", "dtype", "device", "nsfw", "safety_checker",
                 "safety_checker_revision", "warnings", "vae_redecoded_fp32",
                 "height", "width", "input_sha256", "input_width", "input_height", "input_mode")

HASH_KEY = "sdbatch-dedup-v1"  # pandas' hash key: 16 bytes
CHECK_HASH_KEY = "sdbatch-check-v1"
_SALT = {HASH_KEY: np.uint64(0), CHECK_HASH_KEY: np.uint64(0x9E3779B97F4A7C15)}
_NULL = np.uint64(0xA5A5_5A5A_F00D_D00D)
_LOCAL_REVISION = "local-"  # batch.models.weights.fingerprint: a local folder is known by its contents


def key_fields(task: str) -> list[str]:
    """The item fields in the key of ``task``'s images (see the module docstring)."""
    sized = "height" in TASKS[task].columns
    return [f for f in KEY_FIELDS if sized or f not in SIZE_FIELDS]


def _hash_column(col: pa.ChunkedArray | pa.Array, type_: pa.DataType, hash_key: str) -> np.ndarray:
    """One uint64 per value of ``col`` (cast to ``type_`` first, so int32/int64 or a null column hash alike)."""
    from pandas.util import hash_array

    if col.null_count == len(col):  # e.g. the image-task columns of a txt2img run: no per-row work
        return np.full(len(col), _NULL, dtype=np.uint64)
    if col.type != type_:
        col = col.cast(type_)
    valid = pc.is_valid(col).to_numpy(zero_copy_only=False)
    if pa.types.is_string(type_) or pa.types.is_large_string(type_):
        values = pc.fill_null(col, "").to_numpy(zero_copy_only=False).astype(object)
        h = hash_array(values, hash_key=hash_key, categorize=False)
    else:  # numbers: their 64 bits, salted per hash key, through pandas' 64-bit mix
        wide = pa.float64() if pa.types.is_floating(type_) else pa.uint64() if pa.types.is_unsigned_integer(type_) \
            else pa.int64()
        values = np.ascontiguousarray(pc.fill_null(col.cast(wide), 0).to_numpy(zero_copy_only=False))
        h = hash_array(values.view(np.uint64) ^ _SALT[hash_key])
    return np.where(valid, h, _NULL).astype(np.uint64)


def _combine(hashes: list[np.ndarray]) -> np.ndarray:
    """``pandas.core.util.hashing.combine_hash_arrays`` (CPython's tuple hash, in uint64 arithmetic)."""
    out = np.full(len(hashes[0]), 0x345678, dtype=np.uint64)
    mult = np.uint64(1000003)
    for i, h in enumerate(hashes):
        inverse = len(hashes) - i
        out ^= h
        out *= mult
        mult += np.uint64(82520 + inverse + inverse)
    return out + np.uint64(97531)


def image_keys(table: pa.Table, fields: list[str], model: str | None = None, revision: str | None = None,
               hash_key: str = HASH_KEY) -> np.ndarray:
    """The uint64 key of every row of ``table`` (work items or metadata rows), vectorised.

    ``model``/``revision``: the run's (for work items, which have no such columns); None: the table's own
    ``model``/``model_revision`` columns (earlier metadata). A missing item column counts as null."""
    n = table.num_rows
    if model is not None:  # one model for the whole table: hash it once
        if revision is not None and revision.startswith(_LOCAL_REVISION):
            model = ""  # a local folder is known by its fingerprint, not by the path it was loaded from
        one = _hash_column(pa.array([model, revision], pa.string()), pa.string(), hash_key)
        hashes = [np.full(n, one[0], np.uint64), np.full(n, one[1], np.uint64)]
    else:
        models, revisions = table.column("model"), table.column("model_revision")
        local = pc.fill_null(pc.starts_with(revisions, _LOCAL_REVISION), False)
        models = pc.if_else(local, pa.scalar("", pa.string()), models)
        hashes = [_hash_column(models, pa.string(), hash_key), _hash_column(revisions, pa.string(), hash_key)]
    for name in fields:
        type_ = METADATA_SCHEMA.field(name).type
        col = table.column(name) if name in table.column_names else pa.nulls(n, type_)
        hashes.append(_hash_column(col, type_, hash_key))
    return _combine(hashes)


@dataclass(frozen=True)
class Source:
    """One earlier run whose images may be reused: its output prefix, opened, and its run id."""

    uri: str
    out: Output
    run_id: str


def _norm(out: Output) -> str:
    return out.fs.unstrip_protocol(out.root).rstrip("/")


def find_sources(uris: list[str], storage_options: dict[str, Any] | None = None,
                 exclude: str | None = None) -> list[Source]:
    """The runs named by ``dedup_against``: each URI is a run prefix (it holds ``run.json``) or a base prefix
    whose direct child folders holding ``run.json`` are runs; ``exclude`` (this job's output) is left out.
    A URI that names no run is an error (a typo would otherwise silently dedup against nothing)."""
    own = _norm(open_output(exclude, storage_options)) if exclude else None
    found: list[Source] = []
    for uri in uris:
        out = open_output(uri, storage_options)
        if _norm(out) == own:
            raise SpecError(f"dedup_against {uri!r} is this job's own output; name earlier runs (or their base "
                            "prefix)")
        if out.exists(RUN_RECORD):
            candidates = [out]
        else:
            children = retrying(out.fs.ls, out.root, detail=True, what=f"list {uri}") \
                if retrying(out.fs.isdir, out.root, what=f"isdir {uri}") else []
            candidates = [Output(fs=out.fs, root=c["name"], retry=out.retry) for c in
                          sorted(children, key=lambda c: c["name"]) if c.get("type") == "directory"]
            candidates = [c for c in candidates if _norm(c) != own and c.exists(RUN_RECORD)]
            # a base prefix holding only this job's output (a nightly's first day) names no run yet: fine
            if not candidates and (own is None or not own.startswith(_norm(out) + "/")):
                raise SpecError(f"dedup_against {uri!r}: no run there ({RUN_RECORD} not found) and no run "
                                f"in its child folders")
        for c in candidates:
            found.append(Source(uri=_norm(c), out=c, run_id=str(c.get_json(RUN_RECORD).get("run_id"))))
    return found


def _read_part(out: Output, key: str, columns: list[str]) -> pa.Table:
    """Only ``columns`` of one committed part; a column an older part lacks comes back null."""
    data = pq.ParquetFile(io.BytesIO(out.get(key)))
    present = [c for c in columns if c in data.schema_arrow.names]
    table = data.read(columns=present)
    for c in columns:
        if c not in present:
            table = table.append_column(METADATA_SCHEMA.field(c), pa.nulls(table.num_rows, METADATA_SCHEMA.field(c).type))
    return table.select(columns)


@dataclass
class DedupIndex:
    """Sorted distinct keys of the earlier done images, and where each one's row is (part, row in part)."""

    task: str
    parts: list[tuple[Source, str]] = field(default_factory=list)
    keys: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))
    part_of: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32))
    row_of: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32))
    rows_read: int = 0

    @property
    def nbytes(self) -> int:
        """Memory the index holds: 16 bytes per distinct earlier image."""
        return self.keys.nbytes + self.part_of.nbytes + self.row_of.nbytes

    @classmethod
    def build(cls, sources: list[Source], task: str) -> "DedupIndex":
        """Read the key columns of every committed part of ``sources``, one part at a time."""
        fields = key_fields(task)
        columns = ["model", "model_revision", "status", *fields]
        index = cls(task=task)
        keys, part_of, row_of = [], [], []
        for source in sources:
            for key in metadata_parts(source.out):
                table = _read_part(source.out, key, columns)
                index.rows_read += table.num_rows
                done = pc.is_in(table.column("status"), pa.array(DONE_STATUSES)).to_numpy(zero_copy_only=False)
                rows = np.flatnonzero(done & pc.is_valid(table.column("seed")).to_numpy(zero_copy_only=False))
                if len(rows) == 0:
                    continue
                keys.append(image_keys(table.take(pa.array(rows)), fields))
                part_of.append(np.full(len(rows), len(index.parts), np.int32))
                row_of.append(rows.astype(np.int32))
                index.parts.append((source, key))
        if keys:
            all_keys = np.concatenate(keys)
            # distinct keys, the first occurrence kept (sources in the order given, parts in name order)
            index.keys, first = np.unique(all_keys, return_index=True)
            index.part_of, index.row_of = np.concatenate(part_of)[first], np.concatenate(row_of)[first]
        return index

    def split(self, items: pa.Table, model: str, revision: str | None,
              default_scheduler: str | None = None) -> tuple[pa.Table, pa.Table]:
        """``items`` into (the ones to generate, metadata rows of status ``skipped`` for the others).

        ``default_scheduler``: the model's own scheduler's name; the sampler records it for items asking
        for ``scheduler: model``, so the key does too (None: such items match nothing)."""
        fields = key_fields(self.task)
        empty = items.schema.empty_table()
        if items.num_rows == 0 or len(self.keys) == 0:
            return items, empty
        keyed = items
        if "scheduler" in fields:  # "model" as the sampler resolves it (batch.run.stages.Sampler)
            named = pc.if_else(pc.equal(items.column("scheduler"), "model"),
                               pa.scalar(default_scheduler or "model (unknown)", pa.string()), items.column("scheduler"))
            keyed = items.set_column(items.schema.get_field_index("scheduler"), "scheduler", named)
        k1 = image_keys(keyed, fields, model, revision)
        pos = np.minimum(np.searchsorted(self.keys, k1), len(self.keys) - 1)
        cand = np.flatnonzero(self.keys[pos] == k1)
        if len(cand) == 0:
            return items, empty
        where = pos[cand]
        part, row = self.part_of[where], self.row_of[where]
        check = image_keys(keyed.take(pa.array(cand)), fields, model, revision, hash_key=CHECK_HASH_KEY)
        columns = ["model", "model_revision", *fields, *[f for f in REUSED_FIELDS if f not in fields
                                                                   and f not in ("model", "model_revision")]]
        matched: list[np.ndarray] = []  # positions in ``cand``
        earlier: list[pa.Table] = []
        for p in np.unique(part):
            source, key = self.parts[int(p)]
            mine = np.flatnonzero(part == p)
            try:
                rows = _read_part(source.out, key, columns).take(pa.array(row[mine]))
            except FileNotFoundError:  # compacted or deleted since the index was built: generate them
                continue
            ok = image_keys(rows, fields, hash_key=CHECK_HASH_KEY) == check[mine]
            matched.append(mine[ok])
            rows = rows.filter(pa.array(ok))
            earlier.append(rows.append_column("reused_from", pa.array(
                [f"{source.uri} run {source.run_id}"] * rows.num_rows, pa.string())))
        hit = np.concatenate(matched) if matched else np.empty(0, np.int64)
        if len(hit) == 0:
            return items, empty
        previous = pa.concat_tables(earlier)
        skip = np.zeros(items.num_rows, bool)
        skip[cand[hit]] = True
        skipped = keyed.take(pa.array(cand[hit]))  # the scheduler as recorded, like a generated row
        for name in REUSED_FIELDS + ("reused_from",):
            col = previous.column(name)
            i = skipped.schema.get_field_index(name)
            skipped = skipped.set_column(i, name, col) if i >= 0 else skipped.append_column(name, col)
        for name, value in (("status", SKIPPED), ("error", None)):
            col = pa.array([value] * skipped.num_rows, pa.string())
            i = skipped.schema.get_field_index(name)
            skipped = skipped.set_column(i, name, col) if i >= 0 else skipped.append_column(name, col)
        return items.filter(pa.array(~skip)), skipped


_COMMIT = re.compile(r"^[0-9a-f]{40}$")


SCHEDULER_CONFIG = "scheduler/scheduler_config.json"


def model_identity(spec: Any) -> tuple[str, str | None, str | None]:
    """(model, resolved revision, its own scheduler's name) as the sampler records them in ``model``,
    ``model_revision`` and, for rows asking for ``scheduler: model``, ``scheduler``: ``tiny``'s preset, a local
    folder's fingerprint and ``scheduler_config.json``, a hub model's commit (the spec's ``revision`` when it
    is a commit hash, else asked of the hub) and scheduler config (one small file, no weights)."""
    import json

    from batch.models.tiny import TINY_SCHEDULER_CLASS
    from batch.models.weights import SCHEDULER_NAME_FOR_CLASS, locate

    kind, folder, resolved = locate(spec.model, spec.revision, spec.allow_pickle, spec.variant, resolve_hub=False)
    try:
        if kind == "tiny":
            cls = TINY_SCHEDULER_CLASS[spec.task]
        elif kind == "local":
            cls = json.loads((folder / SCHEDULER_CONFIG).read_text()).get("_class_name")
        else:
            from huggingface_hub import HfApi, hf_hub_download

            resolved = spec.revision if spec.revision and _COMMIT.match(spec.revision) else \
                HfApi().model_info(spec.model, revision=spec.revision).sha
            with open(hf_hub_download(spec.model, SCHEDULER_CONFIG, revision=resolved)) as f:
                cls = json.load(f).get("_class_name")
    except Exception as err:
        raise SpecError(f"dedup_against: cannot read the revision and scheduler of model {spec.model} "
                        f"({type(err).__name__}: {err}); pin revision to a commit hash and make "
                        f"{SCHEDULER_CONFIG} reachable") from None
    return spec.model, resolved, SCHEDULER_NAME_FOR_CLASS.get(cls)


class Deduplicator:
    """The job's step, chunk by chunk: :func:`find_sources`, :meth:`DedupIndex.build` and
    :func:`model_identity` once per job, on the first chunk with work (a resumed run with nothing left builds
    nothing); then :meth:`split` per chunk of items. Memory: the index (16 bytes per earlier image) plus one
    chunk's skipped rows. ``facts`` is what the run record says about it."""

    def __init__(self, spec: Any):
        self.spec, self.index, self.identity, self.facts = spec, None, None, {}

    def split(self, items: pa.Table) -> tuple[pa.Table, pa.Table | None]:
        """(items to generate, skipped metadata rows or None) for one chunk; ``items`` unchanged without
        ``dedup_against``."""
        if not self.spec.dedup_against or items.num_rows == 0:
            return items, None
        if self.index is None:
            import time

            t0 = time.perf_counter()
            sources = find_sources(self.spec.dedup_against, self.spec.storage_options, exclude=self.spec.output)
            self.index, self.identity = DedupIndex.build(sources, self.spec.task), model_identity(self.spec)
            self.facts = {"sources": [f"{s.uri} run {s.run_id}" for s in sources],
                          "earlier_rows_read": self.index.rows_read, "index_images": int(len(self.index.keys)),
                          "index_bytes": self.index.nbytes, "build_seconds": round(time.perf_counter() - t0, 3),
                          "images_reused": 0}
        todo, skipped = self.index.split(items, *self.identity)
        self.facts["images_reused"] += skipped.num_rows
        return todo, skipped

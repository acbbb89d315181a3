"""Planning a manifest: Parquet rows in, per-image work items (validated, seeded, bucketed) and failed rows out.

A manifest (Parquet, CSV, JSON Lines or a catalogue request file; a file, folder, glob or list of them:
:mod:`batch.plan.sources`, unified into one schema) has one row per request; its columns are the task's
(``batch.tasks``: the txt2img table of columns is in ``batch/tasks/txt2img.py``). Any other column is
carried through to the metadata untouched (names that the metadata itself uses are refused up front). A
file that cannot be read, or lacks a required column, fails the whole job at once; a bad *row* only fails
that row, with ``field: reason`` messages, and every other row still runs.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batch.plan import sources
from batch.plan.locations import input_rules
from batch.plan.rows import BUCKET_FIELDS, RowError
from batch.plan.seeds import derive_row_seeds, effective_run_seed
# ManifestError is defined beside the readers; importers keep using this name
from batch.plan.sources import ManifestError, rechunk
from batch.spec.config import JobSpec
from batch.tasks import TASKS


@dataclass
class Plan:
    """What a job will do: one item per image to generate, one record per failed manifest row."""

    items: pa.Table  # ITEM_SCHEMA + "_batch" (GPU batch number) + carried columns, bucket-sorted within each chunk
    failed: pa.Table  # ITEM_SCHEMA + carried columns + "error"; image_index null
    carried: list[str]
    num_rows: int

    @property
    def num_ok_rows(self) -> int:
        return self.num_rows - self.failed.num_rows

    def failure_reasons(self) -> Counter:
        """Failed rows counted by :func:`failure_reason`."""
        return Counter(failure_reason(e) for e in self.failed.column("error").to_pylist())


def read_manifest(uri: str | list[str], storage_options: dict[str, Any] | None = None) -> pa.Table:
    """Read a whole manifest (a file, folder, glob or list of them, in any form of :mod:`batch.plan.sources`)
    from any fsspec URI as one table; fail fast if it cannot be read.

    Several files are unified into one schema: a column missing from a file is null for that file's rows
    (never dropped), and a column whose type differs between files fails the job with a message naming both
    files and the column (integer widths and integer/float mixes are widened, as Arrow's permissive
    promotion does). Delegates to :func:`batch.plan.sources.read_manifest`.
    """
    return sources.read_manifest(uri, storage_options)


def check_columns(table: pa.Table, task: str, reserved: set[str]) -> list[str]:
    """Check the manifest's columns against ``task``'s; return the carried (extra) ones."""
    columns, required = TASKS[task].columns, TASKS[task].required
    names = table.column_names
    missing = [c for c in required if c not in names]
    if missing:
        raise ManifestError(f"{task} manifest lacks required column(s) {missing}; it has {names}. "
                            f"{task} columns: {list(columns)}")
    if len(set(names)) != len(names):
        raise ManifestError(f"manifest has repeated column names: {names}")
    carried = [c for c in names if c not in columns]
    clash = sorted(set(carried) & reserved)
    if clash:
        raise ManifestError(
            f"manifest column(s) {clash} would overwrite metadata columns of the same name; rename them"
        )
    return carried


_FIELDS = sorted({c for t in TASKS.values() for c in t.columns})
_PROBLEM_SPLIT = re.compile(r"; (?=(?:%s): )" % "|".join(_FIELDS))


_QUOTED_PATH = re.compile(r"""(['"])[^'"]*[/\\][^'"]*\1""")


def failure_reason(error: str) -> str:
    """The stable part of an error (offending values stripped), for counting failures by reason.

    Row errors are ``field: reason, got VALUE`` joined by ``"; "``; parts are split only where a known
    field name follows, so a value that itself contains ``"; "`` stays inside its part. Quoted paths and URIs
    inside an exception's text (``[Errno 17] File exists: '/out/images/...'``) become ``'<path>'``, so one
    storage fault over many images counts as one reason.
    """
    return "; ".join(_QUOTED_PATH.sub(r"\1<path>\1", part.split(", got ")[0])
                     for part in _PROBLEM_SPLIT.split(error))


def split_problems(error: str) -> list[str]:
    """A row error's ``field: reason`` parts (the ``"; "``-joined :class:`RowError` text), split only where a
    known field name follows, as :func:`failure_reason` splits them."""
    return _PROBLEM_SPLIT.split(error)


PLAN_CHUNK_ROWS = 65536  # manifest rows per plan chunk: buckets and GPU batches never cross a chunk


def plan(table: pa.Table, spec: JobSpec, reserved: set[str],
         duplicates: dict[int, list[int]] | None = None) -> Plan:
    """Validate every row of a manifest held in memory and expand good rows into per-image items: the
    chunks of :func:`plan_chunk` (``PLAN_CHUNK_ROWS`` rows each) concatenated. ``duplicates`` (manifest row ->
    every row holding the same id) defaults to :func:`find_duplicates` over ``table``'s ids."""
    task = TASKS[spec.task]
    carried = check_columns(table, task.name, reserved)
    if duplicates is None:
        duplicates = find_duplicates(table.column("id").chunks if table.num_rows else [])
    chunks = [plan_chunk(table.slice(a, PLAN_CHUNK_ROWS), a, spec, carried, duplicates)
              for a in range(0, table.num_rows, PLAN_CHUNK_ROWS)] or [plan_chunk(table, 0, spec, carried, {})]
    return Plan(items=pa.concat_tables([c.items for c in chunks]), failed=pa.concat_tables([c.failed for c in chunks]),
                carried=carried, num_rows=table.num_rows)


def iter_plan(chunks: Iterable[pa.Table], spec: JobSpec, carried: list[str],
              duplicates: dict[int, list[int]]) -> Iterator[tuple[int, Plan]]:
    """(first manifest row, :func:`plan_chunk`) for each chunk of ``PLAN_CHUNK_ROWS`` rows of ``chunks`` (tables or
    record batches of any sizes, re-cut by :func:`batch.plan.sources.rechunk`): the streaming plan, one chunk in
    memory at a time."""
    first = 0
    for chunk in rechunk(chunks, PLAN_CHUNK_ROWS):
        yield first, plan_chunk(chunk, first, spec, carried, duplicates)
        first += chunk.num_rows


@dataclass
class ManifestScan:
    """One pass over a manifest before any row runs (:func:`scan_manifest`)."""

    rows: int
    digest: str  # SHA-256 of the rows in plan chunks (Arrow IPC stream), independent of the files' layout
    carried: list[str]
    carried_schema: pa.Schema
    duplicates: dict[int, list[int]]  # manifest row -> every row with the same id (ids occurring twice)
    columns: list[list[str]]  # [name, type] of every manifest column
    row_hashes: str  # local file of one uint64 per row (batch.plan.duplicates.hash_rows), for `extend`
    changed: list[tuple[int, Any]]  # (row, id) of rows below ``compare_rows`` that differ from the stored hashes
    changed_count: int = 0


class _Sha256Sink:
    """A write-only file object that hashes what is written (for ``pa.ipc.new_stream``)."""

    def __init__(self):
        import hashlib

        self.hash = hashlib.sha256()
        self.closed = False

    def write(self, data) -> int:
        self.hash.update(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def scan_manifest(source: Any, spec: JobSpec, reserved: set[str], compare_rows: int = 0,
                  stored_hashes: Callable[[int], np.ndarray] | None = None) -> ManifestScan:
    """Check the columns, count the rows, hash the contents and find duplicate ids, one chunk at a time
    (``source``: a :class:`batch.plan.sources.ManifestSource`). Memory: one chunk, plus spill files on local
    disk (the duplicate finder's, :mod:`batch.plan.duplicates`, and the row hashes).

    ``compare_rows``/``stored_hashes`` (``sdbatch run --extend``): the first ``compare_rows`` rows are compared
    with the row hashes a run stored (``stored_hashes(chunk number)``), and rows that differ are listed."""
    import tempfile

    from batch.plan.duplicates import DuplicateFinder, hash_rows

    carried = check_columns(source.schema.empty_table(), TASKS[spec.task].name, reserved)
    sink = _Sha256Sink()
    finder = DuplicateFinder()
    rows, changed, changed_count = 0, [], 0
    hash_file = tempfile.NamedTemporaryFile(prefix="sdbatch-rowhash-", delete=False)
    with pa.ipc.new_stream(pa.PythonFile(sink, mode="w"), source.schema) as writer, hash_file:
        for number, batch in enumerate(source.iter_batches(PLAN_CHUNK_ROWS)):
            chunk = pa.Table.from_batches([batch])
            writer.write_table(chunk)
            finder.add(chunk.column("id"))
            hashes = hash_rows(chunk)
            hashes.tofile(hash_file)
            if rows < compare_rows and stored_hashes is not None:
                old = stored_hashes(number)
                k = min(len(old), len(hashes))
                diff = np.flatnonzero(old[:k] != hashes[:k])
                if len(old) > len(hashes):  # the old run had more rows in this chunk than the manifest now has
                    diff = np.concatenate([diff, np.arange(len(hashes), len(old))])
                changed_count += len(diff)
                if len(diff):  # the ids only of a chunk that changed
                    ids = chunk.column("id").to_pylist()
                    changed += [(rows + int(i), ids[i] if i < len(ids) else None) for i in diff[:10 - len(changed)]]
            rows += chunk.num_rows
    duplicates = finder.finish(b.column("id") for b in source.iter_batches(PLAN_CHUNK_ROWS))
    return ManifestScan(rows=rows, digest=sink.hash.hexdigest(), carried=carried,
                        carried_schema=pa.schema([source.schema.field(c) for c in carried]), duplicates=duplicates,
                        columns=[[f.name, str(f.type)] for f in source.schema], row_hashes=hash_file.name,
                        changed=changed, changed_count=changed_count)


def find_duplicates(id_chunks) -> dict[int, list[int]]:
    """Manifest row -> the rows sharing its id, for every id that occurs more than once
    (:class:`batch.plan.duplicates.DuplicateFinder` over ``id_chunks``, arrays of ids in manifest order)."""
    from batch.plan.duplicates import DuplicateFinder

    finder = DuplicateFinder()
    for ids in id_chunks:
        finder.add(ids)
    return finder.finish(id_chunks)


def plan_chunk(chunk: pa.Table, first_row: int, spec: JobSpec, carried: list[str],
               duplicates: dict[int, list[int]]) -> Plan:
    """Plan one chunk of manifest rows (``first_row`` is its first row's number in the manifest); pure: no model,
    no I/O but the location rules of input images.

    1. split the rows: those Arrow kernels accept (:mod:`batch.plan.vector`) and the rest, which the task's
       ``validate_row`` checks one by one (the one source of every rule and error text); a row whose id occurs
       more than once (``duplicates``, from a pass over the whole manifest) fails every occurrence;
    2. derive the seeds rows lack (:func:`batch.plan.seeds.derive_row_seed`);
    3. expand ``num_images`` into items seeded ``row_seed + k``;
    4. sort the items by bucket (stable: then manifest row, image index), so equal-parameter images are batched
       together, and number the GPU batches (``_batch``: :func:`batch.plan.batches.assign_batches`, offset by
       the chunk), so batch composition depends only on the manifest rows of this chunk and the spec.
    """
    from batch.plan.vector import fast_rows, split_rows

    task = TASKS[spec.task]
    n = chunk.num_rows
    rules = input_rules(spec) if task.input_image and (spec.manifest or spec.allowed_input_prefixes) else None
    # 1. split
    fast = split_rows(chunk, spec)
    dup_local = [r - first_row for r in duplicates if first_row <= r < first_row + n]
    fast[dup_local] = False
    good_parts: list[pa.Table] = []
    if fast.any():
        sel = np.flatnonzero(fast)
        cols = fast_rows(chunk.take(pa.array(sel)), spec)
        good_parts.append(_effective_table(cols, first_row + sel, task.item_schema))
    slow = np.flatnonzero(~fast)
    failed: list[dict[str, Any]] = []
    failed_rows: list[int] = []
    effective: list[dict[str, Any]] = []
    if len(slow):
        rows = chunk.select([c for c in task.columns if c in chunk.column_names]).take(pa.array(slow)).to_pylist()
        for i, raw in zip(slow.tolist(), rows):
            try:
                eff = task.validate_row(raw, spec, rules)
                dup = duplicates.get(first_row + i, [])
                if len(dup) > 1:
                    raise RowError([("id", f"duplicate id, got {raw['id']!r} at manifest rows {dup[:10]}")])
            except RowError as err:
                rid = raw.get("id")
                failed.append({"id": rid if isinstance(rid, str) else None, "manifest_row": first_row + i,
                               "error": str(err), **task.failed_fields(raw)})
                failed_rows.append(i)
                continue
            effective.append({**eff, "manifest_row": first_row + i})
        if effective:
            names = [f.name for f in task.item_schema if f.name in effective[0] or f.name == "manifest_row"]
            good_parts.append(pa.Table.from_pylist(effective, schema=pa.schema([task.item_schema.field(c)
                                                                                 for c in names])))
    # 2-4. seeds, expansion, bucket order and batches
    items = _expand(good_parts, task.item_schema, spec)
    items = _sort_and_number(items, spec.batch_size, first_row)
    local = pc.subtract(items.column("manifest_row"), first_row)
    extra = chunk.select(carried)
    item_table = _with_carried(items, extra, local)
    failed_schema = task.item_schema.append(pa.field("error", pa.string()))
    failed_table = _with_carried(pa.Table.from_pylist(failed, schema=failed_schema), extra,
                                 pa.array(failed_rows, pa.int64()))
    return Plan(items=item_table, failed=failed_table, carried=carried, num_rows=n)


def _effective_table(cols: dict[str, pa.Array], rows: np.ndarray, schema: pa.Schema) -> pa.Table:
    """The kernels' effective values as a table of the item schema's row fields, with ``manifest_row``."""
    cols = dict(cols, manifest_row=pa.array(rows.astype(np.int64)))
    names = [f.name for f in schema if f.name in cols]
    return pa.table([pc.cast(cols[c], schema.field(c).type) for c in names],
                    schema=pa.schema([schema.field(c) for c in names]))


def _expand(parts: list[pa.Table], schema: pa.Schema, spec: JobSpec) -> pa.Table:
    """Good rows' effective values -> one item per image (``image_index`` k, ``seed`` = row seed + k), derived
    row seeds filled in, columns in ``schema`` order (fields a task does not set are null)."""
    if not parts:
        return schema.empty_table()
    rows = pa.concat_tables(parts, promote_options="permissive")
    seeds = rows.column("row_seed").combine_chunks()
    if seeds.null_count:
        missing = np.flatnonzero(seeds.is_null().to_numpy(zero_copy_only=False))
        ids = rows.column("id").take(pa.array(missing)).to_pylist()
        filled = pc.fill_null(seeds, 0).to_numpy().astype(np.uint64)  # (nulls would make numpy floats)
        filled[missing] = derive_row_seeds(effective_run_seed(spec), ids)
        rows = rows.set_column(rows.schema.get_field_index("row_seed"), schema.field("row_seed"),
                               pa.array(filled, pa.uint64()))
    counts = rows.column("num_images").to_numpy().astype(np.int64)
    take = np.repeat(np.arange(rows.num_rows), counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    k = np.arange(len(take)) - starts
    items = rows.take(pa.array(take))
    row_seed = items.column("row_seed").to_numpy().astype(np.uint64)
    cols = {c: items.column(c) for c in items.column_names}
    cols["image_index"] = pa.array(k.astype(np.int32))
    cols["seed"] = pa.array(row_seed + k.astype(np.uint64), pa.uint64())
    n = len(take)
    return pa.table([cols[f.name] if f.name in cols else pa.nulls(n, f.type) for f in schema], schema=schema)


def _sort_and_number(items: pa.Table, batch_size: int, first_row: int) -> pa.Table:
    """Items in bucket order (stable: manifest row, then image index) with their GPU batch numbers ``_batch``
    (runs of equal bucket key cut every ``batch_size`` items, numbered from ``first_row``'s chunk on, so
    numbers never repeat across chunks)."""
    from batch.plan.batches import assign_batches

    if items.num_rows:
        keys = [(f, "ascending") for f in BUCKET_FIELDS] + [("manifest_row", "ascending"),
                                                             ("image_index", "ascending")]
        items = items.take(pc.sort_indices(items, sort_keys=keys))
    ids = assign_batches(items, batch_size) + (first_row // PLAN_CHUNK_ROWS) * BATCH_NUMBERS_PER_CHUNK
    return items.append_column("_batch", pa.array(ids, pa.int64()))


BATCH_NUMBERS_PER_CHUNK = 1 << 32  # more batches than any chunk can hold


def _with_carried(base: pa.Table, extra: pa.Table, rows) -> pa.Table:
    taken = extra.take(rows)
    for name in extra.column_names:
        base = base.append_column(extra.schema.field(name), taken.column(name))
    return base

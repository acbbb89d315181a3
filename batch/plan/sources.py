"""Manifest sources: every accepted manifest form, opened by schema and streamed in bounded record batches.

A manifest URI (or a list of them, read in order) is any of, on any fsspec storage:

* a Parquet file (``.parquet``/``.pq``; a name without extension is sniffed for the ``PAR1`` magic);
* a folder: every file below it, recursively, in name order, skipping names starting with ``_`` or ``.``
  (writers' markers such as ``_SUCCESS``);
* a glob (``s3://bucket/jobs/*.parquet``): the matches of ``fs.glob``, in name order;
* CSV (``.csv``) or TSV (``.tsv``) with a header line, JSON Lines (``.jsonl``/``.ndjson``), each possibly
  compressed (``.gz``, ``.bz2``, ``.xz``, ``.zst``: fsspec's ``compression="infer"``);
* the cloud catalogue's batch-endpoint request file (``.json``)::

      {"input_data": {"columns": ["prompt", "seed"], "data": [["a cat", 1], ["a dog", 2]], "index": [7, 8],
                      "parameters": {"num_inference_steps": 30, "guidance_scale": 7.5}}}

  ``data`` is a list of rows (a row may be a bare value when there is one column); ``index`` becomes the
  ``id`` column (``str(index)``) when the columns have no ``id`` (no index either: the row's position);
  ``parameters`` (inside ``input_data`` or at the top level) are per-row defaults: they fill missing or null
  values of the task columns of those names, and any other name is refused.

Files are unified into one schema (:func:`unify`): a column missing from a file is null for that file's rows,
a column whose type differs between files fails with a message naming both files and the column (integer
widths and integer/float mixes are widened, as Arrow's permissive promotion does), repeated column names
are refused. CSV, JSON Lines and catalogue files give the task columns (``batch.tasks``, all tasks) fixed
types, so every block and every file agrees: strings for ``id``/``prompt``/``negative_prompt``/``scheduler``/
``image_uri``, float64 for ``guidance_scale``, int64 for the integer fields (``seed`` up to 2**63-1 survives).
Other columns take the type inferred from the file's first :data:`CHUNK_ROWS` rows (CSV: int64, else float64,
else bool, else string). A value that cannot be read as its column's type fails the manifest with the file,
the row and the column; in CSV an empty cell is null, and ``""`` is an empty string.

:meth:`ManifestSource.iter_batches` streams rows: Parquet by ``ParquetFile.iter_batches``, CSV by
``pyarrow.csv.open_csv``, JSON Lines in blocks of lines, so the driver holds one chunk, never a whole file
(the catalogue file is one JSON document and is parsed whole). Every problem is a :class:`ManifestError`.
"""

from __future__ import annotations

import csv
import glob as _glob
import io
import json
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from batch.tasks import TASKS

CHUNK_ROWS = 65536  # rows per record batch of iter_batches, and rows read to infer a CSV/JSON column's type

_STRING_COLUMNS = {"id", "prompt", "negative_prompt", "scheduler", "image_uri"}
_FLOAT_COLUMNS = {"guidance_scale"}
# the task columns' fixed types for text formats (every other task column is an integer field)
KNOWN_TYPES: dict[str, pa.DataType] = {
    c: pa.string() if c in _STRING_COLUMNS else pa.float64() if c in _FLOAT_COLUMNS else pa.int64()
    for t in TASKS.values() for c in t.columns}

_PARQUET_EXT = (".parquet", ".pq")
_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "catalogue",
            ".parquet": "parquet", ".pq": "parquet"}
_FORMS_HINT = ("manifest formats go by extension: .parquet/.pq, .csv, .tsv, .jsonl/.ndjson, .json (catalogue "
               "request file), optionally compressed (.gz, ...)")


class ManifestError(ValueError):
    """The manifest as a whole cannot be used (unreadable, missing columns, reserved names, clashing types)."""


@dataclass(frozen=True)
class ManifestFile:
    """One file of a manifest: where it is, its display name (used in every message) and how to read it."""

    fs: Any
    path: str  # in the filesystem's own form
    name: str
    format: str  # parquet, csv, tsv, jsonl, catalogue
    compression: str | None = None


class ManifestSource:
    """An opened manifest: its files and their unified schema (never rows); see the module docstring."""

    def __init__(self, files: list[ManifestFile], schema: pa.Schema):
        self._files = files
        self.schema = schema

    @property
    def files(self) -> list[str]:
        """Display names of the files, in read order."""
        return [f.name for f in self._files]

    def num_rows(self) -> int | None:
        """Rows in the manifest, from the Parquet footers; None unless every file is Parquet."""
        if any(f.format != "parquet" for f in self._files):
            return None
        return sum(_parquet_call(f, lambda pf: pf.metadata.num_rows) for f in self._files)

    def iter_batches(self, rows: int = CHUNK_ROWS) -> Iterator[pa.RecordBatch]:
        """Every manifest row, in order (files in order), as record batches of exactly ``rows`` rows (the last
        may be fewer), re-chunked across file boundaries, each conformed to :attr:`schema`. The memory held
        is bounded by ``rows`` (plus one reader block), never a whole file."""
        if not isinstance(rows, int) or rows < 1:
            raise ValueError(f"rows must be a positive integer, got {rows!r}")
        conformed = (_conform(batch, self.schema, f.name) for f in self._files for batch in _file_batches(f, rows)
                     if batch.num_rows)
        for table in rechunk(conformed, rows):
            yield _one_batch(table, self.schema)


def rechunk(batches: Iterable[pa.RecordBatch | pa.Table], rows: int) -> Iterator[pa.Table]:
    """Tables of exactly ``rows`` rows (the last may be fewer), one chunk each, from record batches or tables of
    any sizes, in order (slices and concatenation: a piece that already has ``rows`` rows is not copied)."""
    pending: list[pa.Table] = []
    held = 0
    for b in batches:
        t = pa.Table.from_batches([b]) if isinstance(b, pa.RecordBatch) else b
        while t.num_rows:
            take = min(rows - held, t.num_rows)
            pending.append(t.slice(0, take))
            held += take
            t = t.slice(take)
            if held == rows:
                yield pa.concat_tables(pending).combine_chunks()
                pending, held = [], 0
    if held:
        yield pa.concat_tables(pending).combine_chunks()


def open_manifest(uri: str | list[str], storage_options: dict | None = None) -> ManifestSource:
    """Open a manifest (a file, folder or glob URI, or a list of them): list its files and unify their schemas.

    Reads only Parquet footers and the first :data:`CHUNK_ROWS` rows of text files (to infer the types of
    columns that are not task columns; a catalogue ``.json`` file is parsed whole)."""
    uris = [uri] if isinstance(uri, str) else list(uri) if isinstance(uri, (list, tuple)) else []
    if not uris or not all(isinstance(u, str) and u.strip() for u in uris):
        raise ManifestError(f"manifest must be a URI or a non-empty list of URIs, got {uri!r}")
    files = [f for u in uris for f in _expand(u, storage_options or {})]
    return ManifestSource(files, unify([(f.name, _file_schema(f)) for f in files]))


def read_manifest(uri: str | list[str], storage_options: dict | None = None) -> pa.Table:
    """The whole manifest as one table: :func:`open_manifest` then every batch of
    :meth:`ManifestSource.iter_batches`, concatenated."""
    source = open_manifest(uri, storage_options)
    return pa.Table.from_batches(list(source.iter_batches()), schema=source.schema)


# --- listing ------------------------------------------------------------------------------------------------


def _expand(uri: str, storage_options: dict) -> list[ManifestFile]:
    """The files one manifest URI names: the file, a folder's data files, or a glob's matches."""
    import fsspec

    from batch.store.io import retrying  # transient storage errors are retried like every other read

    try:
        fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    except Exception as err:  # unknown protocol, missing driver, bad options
        raise ManifestError(f"manifest {uri}: cannot open ({err})") from None
    protocol = fsspec.core.split_protocol(uri)[0]

    def shown(p: str) -> str:
        return fs.unstrip_protocol(p) if protocol else p

    if retrying(fs.exists, path, what=f"read manifest {uri}"):
        if not fs.isdir(path):
            return [_file(fs, path, uri)]
        found = retrying(fs.find, path, what=f"list manifest {uri}")
        root = path.rstrip("/")
        files = sorted(f for f in found if not _hidden(f[len(root) + 1:]))
        if not files:
            raise ManifestError(f"manifest {uri}: folder holds no data files")
        return [_file(fs, f, f"{uri.rstrip('/')}/{f[len(root) + 1:]}") for f in files]
    if not _glob.has_magic(path):
        raise ManifestError(f"manifest {uri}: not found")
    matches = sorted(retrying(fs.glob, path, what=f"list manifest {uri}"))
    out = []
    for m in matches:
        if fs.isdir(m):  # a matched folder: its data files, as for a folder manifest
            out += [_file(fs, f, shown(f)) for f in sorted(retrying(fs.find, m, what=f"list manifest {uri}"))
                    if not _hidden(f[len(m.rstrip("/")) + 1:])]
        elif not _hidden(os.path.basename(m)):
            out.append(_file(fs, m, shown(m)))
    if not out:
        raise ManifestError(f"manifest {uri}: no data file matches the pattern")
    return out


def _hidden(relative: str) -> bool:
    return any(p.startswith(("_", ".")) for p in relative.split("/"))


def _file(fs: Any, path: str, name: str) -> ManifestFile:
    """A manifest file with its format (by extension; no extension: Parquet if it starts with ``PAR1``)."""
    from fsspec.utils import infer_compression

    compression = infer_compression(path)
    base = os.path.basename(path)
    stem = base.rsplit(".", 1)[0] if compression else base
    ext = os.path.splitext(stem)[1].lower()
    fmt = _FORMATS.get(ext)
    if fmt == "parquet" and compression:
        raise ManifestError(f"manifest {name}: a compressed Parquet file cannot be streamed; Parquet compresses "
                            "its own pages, so store it uncompressed")
    if fmt is None:
        if ext:  # unknown extension: Parquet, as manifests always were (a non-Parquet file fails as such)
            fmt = "parquet"
        else:
            with fs.open(path, "rb") as fh:
                fmt = "parquet" if fh.read(4) == b"PAR1" else ""
            if not fmt:
                raise ManifestError(f"manifest {name}: not a readable Parquet file (no PAR1 magic); {_FORMS_HINT}")
    return ManifestFile(fs=fs, path=path, name=name, format=fmt, compression=compression)


# --- schemas ------------------------------------------------------------------------------------------------


def unify(named: list[tuple[str, pa.Schema]]) -> pa.Schema:
    """One schema from the files' schemas: columns in first-seen order, clashing types named with both files.

    A null-typed column (all null in its file) takes the first concrete type; other types must unify with
    the first one seen under Arrow's permissive promotion (integer widths, integer/float), else the error
    names the column and both files."""
    if len(named) == 1:
        return named[0][1]
    seen: dict[str, tuple[str, pa.DataType]] = {}
    for name, schema in named:
        for field in schema:
            first = seen.setdefault(field.name, (name, field.type))
            if pa.types.is_null(first[1]) and not pa.types.is_null(field.type):
                seen[field.name] = (name, field.type)
                continue
            try:
                pa.unify_schemas([pa.schema([pa.field(field.name, first[1])]), pa.schema([field])],
                                 promote_options="permissive")
            except (pa.ArrowTypeError, pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise ManifestError(
                    f"manifest column {field.name!r} is {first[1]} in {first[0]} but {field.type} in {name}; "
                    "give it one type in every file") from None
    try:
        return pa.unify_schemas([s for _, s in named], promote_options="permissive")
    except (pa.ArrowTypeError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:  # not foreseen pairwise
        raise ManifestError(f"manifest files do not share a schema ({err})") from None


def _check_names(names: list[str], name: str) -> None:
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ManifestError(f"manifest {name}: repeated column name(s) {dup}; every column needs its own name")


def _file_schema(f: ManifestFile) -> pa.Schema:
    if f.format == "parquet":
        schema = _parquet_call(f, lambda pf: pf.schema_arrow)
        _check_names(schema.names, f.name)
        return schema
    if f.format in ("csv", "tsv"):
        return _csv_schema(f)
    if f.format == "jsonl":
        return _jsonl_schema(f)
    return _catalogue_table(f).schema


def _file_batches(f: ManifestFile, rows: int) -> Iterator[pa.RecordBatch]:
    if f.format == "parquet":
        return _parquet_batches(f, rows)
    if f.format in ("csv", "tsv"):
        return _csv_batches(f, rows)
    if f.format == "jsonl":
        return _jsonl_batches(f, rows)
    return iter(_catalogue_table(f).to_batches(max_chunksize=rows))


def _conform(batch: pa.RecordBatch, schema: pa.Schema, name: str) -> pa.RecordBatch:
    """``batch`` with ``schema``'s columns in order: missing ones null, narrower types widened."""
    if batch.schema.equals(schema):
        return batch
    columns = []
    for field in schema:
        i = batch.schema.get_field_index(field.name)
        if i < 0:
            columns.append(pa.nulls(batch.num_rows, field.type))
            continue
        column = batch.column(i)
        try:
            columns.append(column if column.type == field.type else column.cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as err:
            raise ManifestError(f"manifest {name}: column {field.name!r} cannot be read as {field.type}, the type "
                                f"it has in the other files ({err})") from None
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def _one_batch(table: pa.Table, schema: pa.Schema) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([c.combine_chunks() for c in table.columns], schema=schema)


# --- Parquet ------------------------------------------------------------------------------------------------


def _parquet_call(f: ManifestFile, fn):
    """``fn(ParquetFile)`` on the file's footer, storage errors retried, unreadable files named."""
    from batch.store.io import retrying

    def call():
        with f.fs.open(f.path, "rb") as fh:
            return fn(pq.ParquetFile(fh))

    try:
        return retrying(call, what=f"read manifest {f.name}")
    except (pa.ArrowInvalid, OSError) as err:
        raise ManifestError(f"manifest {f.name}: not a readable Parquet file ({err}); {_FORMS_HINT}") from None


def _parquet_batches(f: ManifestFile, rows: int) -> Iterator[pa.RecordBatch]:
    """Record batches of at most ``rows`` rows, one row group's pages at a time (no pre-buffering)."""
    try:
        with f.fs.open(f.path, "rb") as fh:
            for batch in pq.ParquetFile(fh, pre_buffer=False).iter_batches(batch_size=rows):
                yield batch
    except (pa.ArrowInvalid, OSError) as err:
        raise ManifestError(f"manifest {f.name}: not a readable Parquet file ({err})") from None


# --- CSV / TSV ----------------------------------------------------------------------------------------------


def _open_text(f: ManifestFile):
    return f.fs.open(f.path, "rb", compression=f.compression)


def _csv_header(f: ManifestFile) -> list[str]:
    delimiter = "\t" if f.format == "tsv" else ","
    try:
        with _open_text(f) as fh:
            line = next(csv.reader(io.TextIOWrapper(fh, encoding="utf-8-sig", newline=""), delimiter=delimiter),
                        None)
    except (UnicodeDecodeError, csv.Error, OSError, EOFError) as err:
        raise ManifestError(f"manifest {f.name}: cannot read the {f.format.upper()} header line ({err})") from None
    if not line:
        raise ManifestError(f"manifest {f.name}: empty file; a {f.format.upper()} manifest needs a header line")
    _check_names(line, f.name)
    return line


_CSV_BLOCK_BYTES = 1 << 20  # Arrow's default: what one read holds (a longer row grows it), whatever ``rows`` is


def _csv_raw(f: ManifestFile, names: list[str]) -> Iterator[pa.RecordBatch]:
    """The file's rows as all-string record batches (empty cell: null; ``""``: empty string)."""
    import pyarrow.csv as pcsv

    bad: list[Any] = []

    def invalid(row) -> str:  # pyarrow names the text of a malformed row, not its number: keep it for the message
        bad.append(row)
        return "error"

    read = pcsv.ReadOptions(block_size=_CSV_BLOCK_BYTES, use_threads=False, encoding="utf8")
    parse = pcsv.ParseOptions(delimiter="\t" if f.format == "tsv" else ",", newlines_in_values=True,
                              invalid_row_handler=invalid)
    convert = pcsv.ConvertOptions(column_types={n: pa.string() for n in names}, null_values=[""],
                                  strings_can_be_null=True, quoted_strings_can_be_null=False)
    done = 0
    try:
        with _open_text(f) as fh:
            reader = pcsv.open_csv(fh, read_options=read, parse_options=parse, convert_options=convert)
            for batch in reader:
                yield batch
                done += batch.num_rows
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as err:
        if bad:
            row = bad[0]
            raise ManifestError(f"manifest {f.name}: malformed {f.format.upper()} row after data row {done}: "
                                f"expected {row.expected_columns} fields, got {row.actual_columns}: "
                                f"{row.text[:200]!r}") from None
        raise ManifestError(f"manifest {f.name}: not a readable {f.format.upper()} file after data row {done} "
                            f"({err})") from None


def _infer_text_column(values: pa.Array) -> pa.DataType:
    """int64, else float64, else bool, else string: the first type every non-null value casts to."""
    present = values.drop_null()
    if len(present) == 0:
        return pa.string()
    for t in (pa.int64(), pa.float64(), pa.bool_()):
        try:
            present.cast(t)
            return t
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue
    return pa.string()


def _csv_schema(f: ManifestFile) -> pa.Schema:
    names = _csv_header(f)
    unknown = [n for n in names if n not in KNOWN_TYPES]
    types = {n: KNOWN_TYPES.get(n, pa.string()) for n in names}
    if unknown:
        sample: list[pa.RecordBatch] = []
        got = 0
        for batch in _csv_raw(f, names):
            sample.append(batch)
            got += batch.num_rows
            if got >= CHUNK_ROWS:
                break
        if sample:
            head = pa.Table.from_batches(sample).slice(0, CHUNK_ROWS)
            for n in unknown:
                types[n] = _infer_text_column(head.column(n).combine_chunks())
    return pa.schema([pa.field(n, types[n]) for n in names])


def _csv_batches(f: ManifestFile, rows: int) -> Iterator[pa.RecordBatch]:
    schema = _csv_schema(f)
    done = 0
    for raw in _csv_raw(f, schema.names):
        columns = []
        for field in schema:
            column = raw.column(field.name)
            if field.type != pa.string():
                column = _cast_text(column, field, f.name, done)
            columns.append(column)
        yield pa.RecordBatch.from_arrays(columns, schema=schema)
        done += raw.num_rows


def _cast_text(column: pa.Array, field: pa.Field, name: str, done: int) -> pa.Array:
    """A CSV string column as ``field``'s type; a value that does not convert is named with its data row."""
    try:
        return column.cast(field.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    for i, value in enumerate(column.to_pylist()):
        try:
            pa.array([value]).cast(field.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            how = "" if field.name in KNOWN_TYPES else " (its type was inferred from the first rows)"
            raise ManifestError(f"manifest {name}: data row {done + i + 1}, column {field.name!r}: cannot read "
                                f"{value!r} as {field.type}{how}") from None
    raise AssertionError("unreachable: the column cast failed but every value casts")


# --- JSON Lines ---------------------------------------------------------------------------------------------


def _jsonl_blocks(f: ManifestFile, size: int) -> Iterator[list[tuple[int, bytes]]]:
    """Blocks of up to ``size`` non-blank lines, each with its line number (1-based)."""
    try:
        with _open_text(f) as fh:
            block: list[tuple[int, bytes]] = []
            for number, line in enumerate(fh, 1):
                if number == 1 and line.startswith(b"\xef\xbb\xbf"):
                    line = line[3:]
                if not line.strip():
                    continue
                block.append((number, line))
                if len(block) == size:
                    yield block
                    block = []
            if block:
                yield block
    except (OSError, EOFError) as err:
        raise ManifestError(f"manifest {f.name}: not a readable JSON Lines file ({err})") from None


def _jsonl_objects(f: ManifestFile, block: list[tuple[int, bytes]]) -> list[tuple[int, dict]]:
    """The block's lines as objects, parsed one by one; the first malformed line is named."""
    out = []
    for number, line in block:
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise ManifestError(f"manifest {f.name}: line {number}: not UTF-8 ({err})") from None
        except json.JSONDecodeError as err:
            raise ManifestError(f"manifest {f.name}: line {number}: not valid JSON ({err.msg} at "
                                f"column {err.colno})") from None
        if not isinstance(obj, dict):
            raise ManifestError(f"manifest {f.name}: line {number}: must be a JSON object (one row), got "
                                f"{type(obj).__name__}")
        out.append((number, obj))
    return out


def _arrow_json(block: list[tuple[int, bytes]], schema: pa.Schema | None) -> pa.Table:
    """The block parsed by Arrow's JSON reader (fast; strict about types); raises on any problem."""
    import pyarrow.json as pjson

    data = b"\n".join(line.rstrip(b"\r\n") for _, line in block)
    parse = (pjson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="error") if schema is not None
             else pjson.ParseOptions())
    read = pjson.ReadOptions(use_threads=False, block_size=max(1 << 20, len(data) + 1))
    return pjson.read_json(io.BytesIO(data), read_options=read, parse_options=parse)


def _jsonl_schema(f: ManifestFile) -> pa.Schema:
    """Column order of first appearance in the first CHUNK_ROWS lines; task columns typed, others inferred
    (all-null and date-like columns as strings). Arrow parses; Python re-parses to name a problem."""
    first = next(_jsonl_blocks(f, CHUNK_ROWS), [])
    try:
        inferred = _arrow_json(first, None).schema if first else pa.schema([])
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        inferred = None
    if inferred is None:  # Python names the line or column at fault (or infers where Arrow would not)
        objects = _jsonl_objects(f, first)
        names: dict[str, None] = {}
        for _, obj in objects:
            names.update(dict.fromkeys(obj))
        inferred = pa.schema(_object_fields(list(names), [obj for _, obj in objects],
                                            f"manifest {f.name}", " in its first rows"))
    _check_names(inferred.names, f.name)
    return pa.schema([pa.field(fd.name, KNOWN_TYPES[fd.name]) if fd.name in KNOWN_TYPES
                      else pa.field(fd.name, pa.string()) if pa.types.is_null(fd.type) or pa.types.is_timestamp(fd.type)
                      else fd for fd in inferred])


def _object_fields(names: list[str], objects: list[dict], where: str, scope: str = "") -> list[pa.Field]:
    """Fields of JSON objects: the task columns' fixed types, others inferred by Arrow from ``objects``."""
    fields = []
    for n in names:
        if n in KNOWN_TYPES:
            fields.append(pa.field(n, KNOWN_TYPES[n]))
            continue
        try:
            t = pa.array([obj.get(n) for obj in objects]).type
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as err:
            raise ManifestError(f"{where}: column {n!r} mixes value types{scope} ({err}); give it one type") from None
        fields.append(pa.field(n, t))
    return fields


def _jsonl_batches(f: ManifestFile, rows: int) -> Iterator[pa.RecordBatch]:
    schema = _jsonl_schema(f)
    for block in _jsonl_blocks(f, rows):
        try:
            table = _arrow_json(block, schema).select(schema.names)
            yield from table.cast(schema).to_batches()
            continue
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, KeyError):
            pass
        objects = _jsonl_objects(f, block)  # the slow path names the line at fault
        for number, obj in objects:
            extra = [k for k in obj if schema.get_field_index(k) < 0]
            if extra:
                raise ManifestError(f"manifest {f.name}: line {number}: column(s) {extra} do not appear in the first "
                                    f"{CHUNK_ROWS} rows, which fix the file's columns; name them there (null is fine)")
        yield _typed_batch([obj for _, obj in objects], schema, f.name,
                           lambda i, objects=objects: f"line {objects[i][0]}")


def _typed_batch(rows: list[dict], schema: pa.Schema, name: str, where) -> pa.RecordBatch:
    """Rows (dicts) as a batch of ``schema``; task columns are type-checked value by value (Arrow would
    truncate 1.5 to 1 in an int64 column), others converted by Arrow; the first bad value is named."""
    columns = []
    for field in schema:
        values = [r.get(field.name) for r in rows]
        if field.name in KNOWN_TYPES:
            check = _VALUE_CHECKS[field.type]
            for i, v in enumerate(values):
                if v is not None and not check(v):
                    raise ManifestError(f"manifest {name}: {where(i)}: {field.name} must be "
                                        f"{_TYPE_WORDS[field.type]} or null, got {v!r}")
        try:
            columns.append(pa.array(values, type=field.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            for i, v in enumerate(values):
                try:
                    pa.array([v], type=field.type)
                except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as err:
                    raise ManifestError(f"manifest {name}: {where(i)}: column {field.name!r}: cannot read {v!r} as "
                                        f"{field.type}, the type inferred from the first rows ({err})") from None
            raise
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and -2**63 <= v < 2**63


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_VALUE_CHECKS = {pa.int64(): _is_int, pa.float64(): _is_number, pa.string(): lambda v: isinstance(v, str)}
_TYPE_WORDS = {pa.int64(): "an integer in [-2**63, 2**63)", pa.float64(): "a number", pa.string(): "a string"}


# --- the catalogue's batch-endpoint request file --------------------------------------------------------------


def _catalogue_table(f: ManifestFile) -> pa.Table:
    """A catalogue ``.json`` manifest file as a table: the JSON document, then :func:`catalogue_table`."""
    try:
        with _open_text(f) as fh:
            doc = json.load(io.TextIOWrapper(fh, encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise ManifestError(f"manifest {f.name}: not valid JSON ({err.msg} at line {err.lineno} column "
                            f"{err.colno})") from None
    except (UnicodeDecodeError, OSError, EOFError) as err:
        raise ManifestError(f"manifest {f.name}: not a readable JSON file ({err})") from None
    return catalogue_table(doc, f.name, "a .json manifest is a batch-endpoint request file")


CATALOGUE_FORM = ('{"input_data": {"columns": [...], "data": [[...], ...], "index": [...], '
                  '"parameters": {...}}}')


def catalogue_table(doc: Any, name: str, form: str = "the catalogue request form is") -> pa.Table:
    """``{"input_data": {"columns", "data", "index"?, "parameters"?}}`` (a parsed JSON document) as a table of
    manifest rows (see the module docstring). The one parser of this form: catalogue ``.json`` manifest files
    and the serving endpoint's ``/score`` requests (:mod:`batch.serve.protocol`) both use it, so they accept
    the same documents and fail with the same texts (:class:`ManifestError`, ``manifest <name>: ...``)."""
    where = f"manifest {name}"

    def bad(what: str) -> ManifestError:
        return ManifestError(f"{where}: {what}; {form} {CATALOGUE_FORM}")

    if not isinstance(doc, dict) or not isinstance(doc.get("input_data"), dict):
        raise bad("no input_data object")
    inp = doc["input_data"]
    unknown_keys = sorted(set(inp) - {"columns", "data", "index", "parameters"})
    if unknown_keys:
        raise bad(f"input_data has unknown key(s) {unknown_keys}")
    columns, data = inp.get("columns"), inp.get("data")
    if not isinstance(columns, list) or not columns or not all(isinstance(c, str) and c for c in columns):
        raise bad(f"input_data.columns must be a non-empty list of column names, got {columns!r}")
    _check_names(columns, name)
    if not isinstance(data, list):
        raise bad(f"input_data.data must be a list of rows, got {type(data).__name__}")
    if "parameters" in inp and "parameters" in doc:
        raise bad("parameters given both inside input_data and at the top level; give them once")
    params = inp.get("parameters", doc.get("parameters")) or {}
    if not isinstance(params, dict):
        raise bad(f"parameters must be an object of column defaults, got {type(params).__name__}")
    allowed = sorted(set(KNOWN_TYPES) - {"id"})
    for p, value in params.items():
        if p not in KNOWN_TYPES or p == "id":
            raise ManifestError(f"{where}: unknown parameter {p!r}; parameters are per-row defaults of "
                                f"the task columns {allowed}")
        if value is not None and not _VALUE_CHECKS[KNOWN_TYPES[p]](value):
            raise ManifestError(f"{where}: parameter {p} must be {_TYPE_WORDS[KNOWN_TYPES[p]]}, got "
                                f"{value!r}")
    index = inp.get("index")
    if index is not None and (not isinstance(index, list) or len(index) != len(data)):
        raise bad(f"input_data.index must be a list as long as data ({len(data)} rows), got "
                  f"{len(index) if isinstance(index, list) else type(index).__name__}")

    rows = []
    for i, row in enumerate(data):
        if len(columns) == 1 and not isinstance(row, list):
            row = [row]
        if not isinstance(row, list) or len(row) != len(columns):
            raise bad(f"input_data.data[{i}] must be a list of {len(columns)} values (one per column), got {row!r}")
        rows.append(dict(zip(columns, row)))
    names = list(columns)
    if "id" not in names:
        names.insert(0, "id")
        for i, r in enumerate(rows):
            r["id"] = str(index[i] if index is not None else i)
    for p, value in params.items():
        if p not in names:
            names.append(p)
        for r in rows:
            if r.get(p) is None:
                r[p] = value
    schema = pa.schema([pa.field(fd.name, pa.string()) if pa.types.is_null(fd.type) else fd
                        for fd in _object_fields(names, rows, where)])
    return pa.Table.from_batches([_typed_batch(rows, schema, name, lambda i: f"input_data.data[{i}]")],
                                 schema=schema) if rows else schema.empty_table()

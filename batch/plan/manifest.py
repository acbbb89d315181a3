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
from typing import Any, Callable

import pyarrow as pa

from batch.plan import sources
from batch.plan.locations import input_rules
from batch.plan.rows import RowError, bucket_key
from batch.plan.seeds import image_seed
from batch.plan.sources import ManifestError  # defined beside the readers; importers keep using this name
from batch.spec.config import JobSpec
from batch.tasks import TASKS


@dataclass
class Plan:
    """What a job will do: one item per image to generate, one record per failed manifest row."""

    items: pa.Table  # ITEM_SCHEMA + carried columns, sorted by bucket so GPU batches stay full
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


def plan(table: pa.Table, spec: JobSpec, reserved: set[str]) -> Plan:
    """Validate every row and expand good rows into per-image items (pure: no model; no I/O but the location
    rules of input images).

    1. check columns against the spec's task (fail fast), 2. find duplicate ids (every occurrence fails:
    neither is trusted), 3. validate each row (the task's ``validate_row``), 4. expand ``num_images`` into
    items with seeds ``row_seed + k``, 5. sort items by bucket (stable), so equal-parameter images are
    batched together.
    """
    task = TASKS[spec.task]
    carried = check_columns(table, task.name, reserved)
    rows = table.select([c for c in task.columns if c in table.column_names]).to_pylist()
    # input images: planning in isolation (no manifest URI, no listed prefixes) cannot judge locations; a
    # job always can, and its fetch stage checks every read again
    rules = input_rules(spec) if task.input_image and (spec.manifest or spec.allowed_input_prefixes) else None
    return expand_rows(table, rows, carried, task.item_schema, lambda raw: task.validate_row(raw, spec, rules),
                       task.failed_fields)


def expand_rows(table: pa.Table, rows: list[dict[str, Any]], carried: list[str], schema: pa.Schema,
                validate: Callable[[dict[str, Any]], dict[str, Any]],
                failed_fields: Callable[[dict[str, Any]], dict[str, Any]] = lambda raw: {}) -> Plan:
    """Steps 2-5 of :func:`plan`, shared by every task: duplicate ids fail every occurrence, ``validate``
    gives a row's effective values (or raises :class:`RowError`), good rows expand into ``num_images``
    items seeded ``row_seed + k``, items are sorted by bucket (stable), carried columns are attached.
    ``failed_fields`` adds task-specific fields to a failed row's record."""
    positions: dict[Any, list[int]] = {}
    for i, r in enumerate(rows):
        if isinstance(r.get("id"), str):
            positions.setdefault(r["id"], []).append(i)

    items: list[dict[str, Any]] = []
    item_rows: list[int] = []
    failed: list[dict[str, Any]] = []
    failed_rows: list[int] = []
    for i, raw in enumerate(rows):
        try:
            eff = validate(raw)
            dup = positions.get(raw["id"], [])
            if len(dup) > 1:
                raise RowError([("id", f"duplicate id, got {raw['id']!r} at manifest rows {dup[:10]}")])
        except RowError as err:
            rid = raw.get("id")
            failed.append({"id": rid if isinstance(rid, str) else None, "manifest_row": i, "error": str(err),
                           **failed_fields(raw)})
            failed_rows.append(i)
            continue
        for k in range(eff["num_images"]):
            items.append({**eff, "manifest_row": i, "image_index": k, "seed": image_seed(eff["row_seed"], k)})
            item_rows.append(i)

    order = sorted(range(len(items)), key=lambda j: (bucket_key(items[j]), j))
    items = [items[j] for j in order]
    item_rows = [item_rows[j] for j in order]

    extra = table.select(carried)
    item_table = _with_carried(pa.Table.from_pylist(items, schema=schema), extra, item_rows)
    failed_schema = schema.append(pa.field("error", pa.string()))
    failed_table = _with_carried(pa.Table.from_pylist(failed, schema=failed_schema), extra, failed_rows)
    return Plan(items=item_table, failed=failed_table, carried=carried, num_rows=len(rows))


def _with_carried(base: pa.Table, extra: pa.Table, rows: list[int]) -> pa.Table:
    taken = extra.take(pa.array(rows, type=pa.int64()))
    for name in extra.column_names:
        base = base.append_column(extra.schema.field(name), taken.column(name))
    return base

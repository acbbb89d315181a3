"""Manifest schema and row validation: Parquet rows in, per-image work items and failed rows out.

A txt2img manifest is a Parquet file (or folder of files) with one row per prompt:

=====================  ========  =====================================================
column                 required  meaning (missing or null takes the spec's ``defaults``)
=====================  ========  =====================================================
``id``                 yes       unique non-empty string naming the row
``prompt``             yes       non-empty text
``negative_prompt``    no        text for the unconditional branch of CFG ("" when null)
``seed``               no        integer in [0, 2**63); null derives one (see ``seeds``)
``guidance_scale``     no        finite number > 0
``num_inference_steps`` no       integer in [1, 1000]
``height``, ``width``  no        integers, multiples of 8, at most ``limits.max_side``
``num_images``         no        integer in [1, ``limits.max_images_per_row``]
``scheduler``          no        one of ``config.SCHEDULER_NAMES`` or ``model``
=====================  ========  =====================================================

Any other column is carried through to the metadata untouched (names that the metadata itself uses are
refused up front). A file that is not Parquet, or lacks a required column, fails the whole job at once;
a bad *row* only fails that row, with ``field: reason`` messages, and every other row still runs.
"""

from __future__ import annotations

import math
import re
import unicodedata
import urllib.parse
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from batch.spec.config import MAX_SEED, SCHEDULER_NAMES, JobSpec
from batch.plan.seeds import derive_row_seed, image_seed
from batch.store.schema import ITEM_SCHEMA

TXT2IMG_COLUMNS = (
    "id",
    "prompt",
    "negative_prompt",
    "seed",
    "guidance_scale",
    "num_inference_steps",
    "height",
    "width",
    "num_images",
    "scheduler",
)
REQUIRED_COLUMNS = ("id", "prompt")
MAX_ID_CHARS = 512

BUCKET_FIELDS = ("height", "width", "num_inference_steps", "guidance_scale", "scheduler")


class ManifestError(ValueError):
    """The manifest as a whole cannot be used (not Parquet, missing columns, reserved names)."""


class RowError(ValueError):
    """One row is invalid; ``problems`` lists ``(field, reason)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{f}: {r}" for f, r in problems))


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


def read_manifest(uri: str, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """Read a Parquet manifest (file or folder) from any fsspec URI; fail fast if it is not Parquet."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    except Exception as err:  # unknown protocol, missing driver, bad options
        raise ManifestError(f"manifest {uri}: cannot open ({err})") from None
    if not fs.exists(path):
        raise ManifestError(f"manifest {uri}: not found")
    from batch.store.io import retrying  # transient storage errors are retried like every other read

    try:
        return retrying(pq.read_table, path, filesystem=fs, what=f"read manifest {uri}")
    except (pa.ArrowInvalid, OSError) as err:
        raise ManifestError(f"manifest {uri}: not a readable Parquet file ({err})") from None


def check_columns(table: pa.Table, reserved: set[str]) -> list[str]:
    """Check the manifest's columns; return the carried (extra) ones."""
    names = table.column_names
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise ManifestError(
            f"manifest lacks required column(s) {missing}; it has {names}. "
            f"txt2img columns: {list(TXT2IMG_COLUMNS)}"
        )
    if len(set(names)) != len(names):
        raise ManifestError(f"manifest has repeated column names: {names}")
    carried = [c for c in names if c not in TXT2IMG_COLUMNS]
    clash = sorted(set(carried) & reserved)
    if clash:
        raise ManifestError(
            f"manifest column(s) {clash} would overwrite metadata columns of the same name; rename them"
        )
    return carried


# Characters that act as, or look like, path separators once decoded or normalised.
_SEPARATOR_LOOKALIKES = "/\\\u2215\u2044\u29f8\u29f9\u2216\ufe68\uff0f\uff3c\u2571\u2572"


def check_id(rid: Any) -> str | None:
    """Why ``rid`` cannot be a row id, or None. Ids are names, not paths.

    Refused: non-strings, empty or blank, longer than ``MAX_ID_CHARS``, control characters (NUL, newlines,
    unicode line/paragraph separators), and anything that reads as a path once URL-decoded (repeatedly)
    and NFKC-normalised: ``/``, ``\\`` or a look-alike separator, a ``.``/``..`` segment, a drive prefix.
    (Output keys never derive from the raw id anyway: see :func:`batch.store.io.image_key`.)
    """
    if not isinstance(rid, str) or not rid.strip():
        return f"must be a non-empty string, got {rid!r}"
    if len(rid) > MAX_ID_CHARS:
        return f"longer than {MAX_ID_CHARS} characters, got {len(rid)}"
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in rid):
        bad = next(c for c in rid if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp"))
        return f"contains a control or separator character U+{ord(bad):04X}, got {rid[:80]!r}"
    forms, text = [rid], rid
    for _ in range(3):  # %2F, %252F, ...
        decoded = urllib.parse.unquote(text)
        if decoded == text:
            break
        forms.append(decoded)
        text = decoded
    for form in forms + [unicodedata.normalize("NFKC", f) for f in forms]:
        if any(c in _SEPARATOR_LOOKALIKES for c in form):
            return f"must not contain path separators (plain, URL-encoded or look-alike), got {rid[:80]!r}"
        if form in (".", "..") or re.match(r"^[A-Za-z]:", form) or "\x00" in form:
            return f"must not be a path (dot segment, drive or NUL), got {rid[:80]!r}"
    return None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def begin_row(raw: dict[str, Any], spec: JobSpec) -> tuple[Callable[[str], Any], list[tuple[str, str]], dict[str, Any]]:
    """Start checking one row: ``take(field)`` (the row's value, or the spec's default where null), the
    list of problems (the ``id`` checked first) and the effective values so far (``{"id": ...}``)."""
    d = spec.defaults
    problems: list[tuple[str, str]] = []

    def take(field: str) -> Any:
        v = raw.get(field)  # null takes the default; NaN is a value and is reported where the field is checked
        return getattr(d, field) if v is None else v

    rid = raw.get("id")
    id_problem = check_id(rid)
    if id_problem:
        problems.append(("id", id_problem))
    return take, problems, {"id": rid}


def check_numbers(take: Any, ranges: list[tuple[str, int, int]], problems: list[tuple[str, str]],
                  out: dict[str, Any]) -> None:
    """Check ``guidance_scale`` (finite, > 0) and the integer fields ``(field, lo, hi)`` (height and width
    also multiples of 8) of one row; ``take(field)`` gives the row's value or the default."""
    g = take("guidance_scale")
    if not _is_number(g) or not math.isfinite(g) or g <= 0:
        problems.append(("guidance_scale", f"must be a finite number > 0, got {g!r}"))
    out["guidance_scale"] = float(g) if _is_number(g) else None
    for field, lo, hi in ranges:
        v = take(field)
        if not _is_int(v):
            if isinstance(v, float) and math.isfinite(v) and v.is_integer():
                v = int(v)  # a float column holding whole numbers is fine
            else:
                problems.append((field, f"must be an integer, got {v!r}"))
                out[field] = None
                continue
        if not lo <= v <= hi:
            problems.append((field, f"must be in [{lo}, {hi}], got {v}"))
        elif field in ("height", "width") and v % 8:
            problems.append((field, f"must be a multiple of 8, got {v}"))
        out[field] = v


def check_scheduler_and_seed(raw: dict[str, Any], take: Any, spec: JobSpec, problems: list[tuple[str, str]],
                             out: dict[str, Any]) -> None:
    """Check the row's scheduler name and seed; a missing seed is derived from the run seed and the id
    (``batch.plan.seeds``), so ``out["id"]`` must be set first."""
    sched = take("scheduler")
    if sched not in ("model",) + SCHEDULER_NAMES:
        problems.append(("scheduler", f"must be one of {['model', *SCHEDULER_NAMES]}, got {sched!r}"))
    out["scheduler"] = sched

    rid, seed = out["id"], raw.get("seed")
    if seed is None:
        out["seed_source"] = "derived"
        out["row_seed"] = derive_row_seed(spec.seed, rid) if isinstance(rid, str) else None
    elif _is_int(seed) and 0 <= seed < MAX_SEED:
        out["seed_source"], out["row_seed"] = "manifest", seed
    elif isinstance(seed, float) and seed.is_integer() and 0 <= seed < 2**53:  # a float column, exact
        out["seed_source"], out["row_seed"] = "manifest", int(seed)
    else:
        problems.append(("seed", f"must be an integer in [0, 2**63) (whole floats below 2**53 accepted), got {seed!r}"))
        out["seed_source"], out["row_seed"] = "manifest", None


def validate_row(raw: dict[str, Any], spec: JobSpec) -> dict[str, Any]:
    """Effective parameters of one manifest row, or :class:`RowError` listing every bad field."""
    lim = spec.limits
    # 1. Identity and text.
    take, problems, out = begin_row(raw, spec)
    prompt = raw.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        problems.append(("prompt", f"missing or empty, got {prompt!r}"))
    elif len(prompt) > lim.max_prompt_chars:
        problems.append(("prompt", f"longer than limits.max_prompt_chars={lim.max_prompt_chars}, got {len(prompt)}"))
    out["prompt"] = prompt

    neg = take("negative_prompt")
    if neg is not None and not isinstance(neg, str):
        problems.append(("negative_prompt", f"must be a string or null, got {type(neg).__name__}"))
    out["negative_prompt"] = neg

    # 2. Numbers, scheduler and seed (shared with the image tasks).
    check_numbers(take, [("num_inference_steps", 1, 1000), ("num_images", 1, lim.max_images_per_row),
                         ("height", 8, lim.max_side), ("width", 8, lim.max_side)], problems, out)
    check_scheduler_and_seed(raw, take, spec, problems, out)

    if problems:
        raise RowError(problems)
    return out


_PROBLEM_SPLIT = re.compile(r"; (?=(?:%s): )" % "|".join(TXT2IMG_COLUMNS + ("image_uri", "noise_level")))


def failure_reason(error: str) -> str:
    """The stable part of an error (offending values stripped), for counting failures by reason.

    Row errors are ``field: reason, got VALUE`` joined by ``"; "``; parts are split only where a known
    field name follows, so a value that itself contains ``"; "`` stays inside its part.
    """
    return "; ".join(part.split(", got ")[0] for part in _PROBLEM_SPLIT.split(error))


def bucket_key(item: dict[str, Any]) -> tuple:
    """Items with equal keys can share one sampler call (same shape, steps, guidance and scheduler)."""
    return tuple(item[f] for f in BUCKET_FIELDS)


def plan(table: pa.Table, spec: JobSpec, reserved: set[str]) -> Plan:
    """Validate every row and expand good rows into per-image items (pure: no I/O, no model).

    1. check columns (fail fast), 2. find duplicate ids (every occurrence fails: neither is trusted),
    3. validate each row, 4. expand ``num_images`` into items with seeds ``row_seed + k``,
    5. sort items by bucket (stable), so equal-parameter images are batched together.

    Image tasks (``spec.task`` variation/upscale) are planned by :func:`batch.plan.image_manifest.plan_images`.
    """
    if spec.task != "txt2img":
        from batch.plan.image_manifest import plan_images

        return plan_images(table, spec, reserved)
    carried = check_columns(table, reserved)
    rows = table.select([c for c in TXT2IMG_COLUMNS if c in table.column_names]).to_pylist()

    return expand_rows(table, rows, carried, ITEM_SCHEMA, lambda raw: validate_row(raw, spec))


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

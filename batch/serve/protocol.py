"""The serving endpoint's requests and responses (pure: no Ray, no model, no I/O).

A request becomes manifest rows, and the rows take the batch job's own planning path, so a served image is
the image the batch job makes for the same row and spec:

1. parse: ``POST /generate`` takes one plain JSON object of txt2img manifest columns (:func:`parse_plain`);
   ``POST /score`` takes the catalogue's ``{"input_data": {"columns", "data", "index", "parameters"}}``
   (:func:`parse_catalogue`, the parser of catalogue ``.json`` manifest files:
   :func:`batch.plan.sources.catalogue_table`). Only the task's columns are accepted: nothing a request says
   names a file, a URI or a model, so nothing it says reaches the filesystem;
2. plan: :func:`batch.plan.manifest.plan_chunk` validates every row (same ``field: reason`` texts), derives
   missing seeds from (spec seed, id) and expands ``num_images`` (:func:`plan_request`); a bad row is a
   :class:`RequestError` 400, more images than ``serve.max_images_per_request`` a 413;
3. batch: a replica's collected requests are sorted by the batch job's bucket key and cut by
   :func:`batch.plan.batches.assign_batches` with the spec's ``batch_size`` (:func:`collect_batch`); the
   sampler makes one call per GPU batch; :func:`split_batch` hands each request its rows back, each image
   encoded by the batch writer's encoder (:func:`batch.store.formats.encode_row`);
4. respond: :func:`plain_response` (``{"image", "seed", "metadata"}``) or :func:`catalogue_response`
   (``[{"prompt", "generated_image", "nsfw_content_detected"}]``).

A plain request without ``id`` gets a generated one (``req-<32 hex>``); its seed, derived from it, is returned,
so ``{"seed": <that>}`` reproduces the image. A catalogue request without ids or ``index`` names its rows by
position (``"0"``, ``"1"``, ...), exactly as a catalogue manifest file does.
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from batch.plan.batches import assign_batches
from batch.plan.manifest import ManifestError, check_columns, plan_chunk, split_problems
from batch.plan.rows import BUCKET_FIELDS
from batch.plan.sources import catalogue_table
from batch.spec.base import SpecError
from batch.store.formats import OutputFormat, encode_row
from batch.store.schema import METADATA_SCHEMA, NSFW_ERROR, RESERVED_COLUMNS
from batch.tasks import TASKS

SERVED_TASKS = ("txt2img",)
MAX_BODY_BYTES = 1 << 20  # a request body larger than this is refused (413) before it is parsed
REQUEST = "request"  # where a plain request's problems are reported ("request: prompt: ...")


class RequestError(Exception):
    """A request the endpoint refuses: HTTP ``status`` with ``{"error": ..., "errors": [...]}``."""

    def __init__(self, status: int, error: str, errors: list[str] | None = None):
        super().__init__(error)
        self.status, self.error, self.errors = status, error, errors if errors is not None else [error]

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "errors": self.errors}


def check_servable(spec: Any) -> None:
    """Refuse, at startup, a spec the endpoint cannot serve: only txt2img (the image tasks read input images
    by URI, which a request may never name)."""
    if spec.task not in SERVED_TASKS:
        raise SpecError(f"sdbatch serve serves task txt2img only; this spec's task is {spec.task!r} (its rows "
                        "name input images by URI, and a request may not name files or URIs): use sdbatch run")


def plain_columns(spec: Any) -> list[str]:
    """The keys a plain request may hold: the task's manifest columns but ``num_images`` (one image)."""
    return [c for c in TASKS[spec.task].columns if c != "num_images"]


@dataclass
class ServeRequest:
    """A planned request: its items (one per image, in request order) and its form."""

    items: pa.Table  # the task's item schema: validated, seeded, in (manifest_row, image_index) order
    form: str  # "plain" or "catalogue"

    @property
    def images(self) -> int:
        return self.items.num_rows


def _manifest_problem(err: ManifestError, where_prefix: str) -> RequestError:
    """A :class:`ManifestError` of the request's rows as a 400 (its text without the ``manifest request:``
    prefix)."""
    part = str(err).removeprefix(f"manifest {REQUEST}: ")
    if where_prefix:  # a plain request is one row: its position is no news
        part = f"{where_prefix}{part.removeprefix('input_data.data[0]: ')}"
    return RequestError(400, part)


def parse_plain(body: Any, spec: Any) -> pa.Table:
    """One plain request (a JSON object of manifest columns) as a one-row manifest table of one image; a
    missing or null ``id`` becomes ``req-<32 hex>``."""
    allowed = plain_columns(spec)
    if not isinstance(body, dict):
        raise RequestError(400, f"{REQUEST}: must be a JSON object of {allowed}, got {type(body).__name__}")
    unknown = [k for k in body if k not in allowed]
    if unknown:
        errors = [f"{REQUEST}: {k}: unknown field; allowed: {', '.join(allowed)}"
                  + ("; for several images use POST /score" if k == "num_images" else "") for k in unknown]
        raise RequestError(400, "; ".join(errors), errors)
    row = dict(body)
    if row.get("id") is None:
        row["id"] = f"req-{uuid.uuid4().hex}"
    row["num_images"] = 1  # one image, whatever the spec's defaults.num_images says
    try:
        return catalogue_table({"input_data": {"columns": list(row), "data": [list(row.values())]}}, REQUEST)
    except ManifestError as err:
        raise _manifest_problem(err, f"{REQUEST}: ") from None


def parse_catalogue(body: Any, spec: Any) -> pa.Table:
    """A catalogue request (``{"input_data": {...}}``) as a manifest table, by the catalogue file parser;
    columns other than the task's are refused (a request carries nothing through)."""
    if isinstance(body, dict) and isinstance(body.get("input_data"), dict):
        data = body["input_data"].get("data")
        limit = spec.serve.max_images_per_request
        if isinstance(data, list) and len(data) > limit:  # before parsing a large body
            raise RequestError(413, f"{REQUEST}: {len(data)} rows, more than serve.max_images_per_request={limit}")
    try:
        table = catalogue_table(body, REQUEST)
    except ManifestError as err:
        raise _manifest_problem(err, "") from None
    columns = TASKS[spec.task].columns
    unknown = [c for c in table.column_names if c not in columns]
    if unknown:
        error = (f"input_data.columns: unknown column(s) {unknown}; the served columns are {list(columns)} "
                 "(a request carries no other columns)")
        raise RequestError(400, error)
    return table


def plan_request(table: pa.Table, spec: Any, form: str) -> ServeRequest:
    """Plan a request's manifest rows as the batch job plans a chunk (:func:`batch.plan.manifest.plan_chunk`):
    any failed row makes the request a 400 naming every row's problems; more images than
    ``serve.max_images_per_request`` a 413."""
    task = TASKS[spec.task]
    try:
        carried = check_columns(table, task.name, RESERVED_COLUMNS)
    except ManifestError as err:
        raise RequestError(400, f"{REQUEST}: {err}") from None
    if carried:  # parse_* refuse them first; kept as a guard
        raise RequestError(400, f"{REQUEST}: unknown column(s) {carried}")
    planned = plan_chunk(table, 0, spec, [], _duplicates(table.column("id").to_pylist()))
    if planned.failed.num_rows:
        where = (lambda r: REQUEST) if form == "plain" else (lambda r: f"input_data.data[{r}]")
        errors = [f"{where(row)}: {part}"
                  for row, error in zip(planned.failed.column("manifest_row").to_pylist(),
                                        planned.failed.column("error").to_pylist())
                  for part in split_problems(error)]
        raise RequestError(400, "; ".join(errors), errors)
    items = planned.items
    limit = spec.serve.max_images_per_request
    if items.num_rows > limit:
        raise RequestError(413, f"{REQUEST}: {items.num_rows} images, more than serve.max_images_per_request={limit}")
    if items.num_rows == 0:
        raise RequestError(400, f"{REQUEST}: no rows")
    order = pc.sort_indices(items, sort_keys=[("manifest_row", "ascending"), ("image_index", "ascending")])
    items = items.take(order).drop_columns(["_batch"])
    return ServeRequest(items=items, form=form)


def _duplicates(ids: list) -> dict[int, list[int]]:
    """Row -> every row holding the same id, for ids occurring more than once: what
    :func:`batch.plan.manifest.find_duplicates` gives, in memory (a request has few rows; the manifest finder
    spills to local files, and nothing a request says may reach the filesystem)."""
    rows: dict[Any, list[int]] = {}
    for i, rid in enumerate(ids):
        rows.setdefault(rid, []).append(i)
    return {i: group for group in rows.values() if len(group) > 1 for i in group}


# --- a replica's batch -----------------------------------------------------------------------------------------

REQUEST_COL, POS_COL = "_request", "_pos"


def collect_batch(requests: list[pa.Table], batch_size: int) -> pa.Table:
    """The items of a replica's collected requests as one sampler input: tagged with their request and
    position, sorted by the batch job's bucket key (stable: then request, then position) and numbered into
    GPU batches (``_batch``) by :func:`batch.plan.batches.assign_batches` with the spec's ``batch_size``:
    compatible images of different requests share a sampler call, incompatible ones never do."""
    tagged = [t.append_column(REQUEST_COL, pa.array([k] * t.num_rows, pa.int32()))
               .append_column(POS_COL, pa.array(range(t.num_rows), pa.int32())) for k, t in enumerate(requests)]
    items = pa.concat_tables(tagged)
    keys = [(f, "ascending") for f in BUCKET_FIELDS] + [(REQUEST_COL, "ascending"), (POS_COL, "ascending")]
    items = items.take(pc.sort_indices(items, sort_keys=keys))
    return items.append_column("_batch", pa.array(assign_batches(items, batch_size), pa.int64()))


def split_batch(batch_in: pa.Table, out: pa.Table, n_requests: int, fmt: OutputFormat) -> list[list[dict]]:
    """The sampler's output rows handed back per request, in request order: each a metadata row (the
    :data:`batch.store.schema.METADATA_SCHEMA` columns, ``sha256``/``file_size`` of the encoded image and
    ``batch_images``: images in the sampler call that made it) with the encoded image under ``_image`` (None when
    it failed or the safety policy dropped it)."""
    batch_ids = batch_in.column("_batch").to_pylist()
    sizes = Counter(batch_ids)  # images per sampler call
    results: list[list[tuple[int, dict]]] = [[] for _ in range(n_requests)]
    for b, row in zip(batch_ids, out.to_pylist()):
        image = encode_row(row, fmt) if row["status"] == "ok" and row.get("_pixels") is not None else None
        meta = {name: row.get(name) for name in METADATA_SCHEMA.names}
        if image is not None:
            meta["sha256"], meta["file_size"] = hashlib.sha256(image).hexdigest(), len(image)  # as write_block
        meta["batch_images"] = sizes[b]
        meta["_image"] = image
        results[row[REQUEST_COL]].append((row[POS_COL], meta))
    return [[m for _, m in sorted(r, key=lambda t: t[0])] for r in results]


# --- responses -------------------------------------------------------------------------------------------------


def _b64(data: bytes | None) -> str | None:
    return base64.b64encode(data).decode("ascii") if data is not None else None


def _failures(rows: list[dict], where) -> RequestError | None:
    """A 500 when a sampler call failed (an image the safety policy dropped is not a failure: its image is
    null and its row says why)."""
    errors = [f"{where(i)}: {r['error']}" for i, r in enumerate(rows)
              if r["status"] != "ok" and r.get("error") != NSFW_ERROR]
    return RequestError(500, "; ".join(errors), errors) if errors else None


def _public(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k != "_image"}


def plain_response(rows: list[dict]) -> dict[str, Any]:
    """``{"image": <base64>, "seed": int, "metadata": {...}}`` of a plain request's one image; raises a 500
    :class:`RequestError` when its sampler call failed."""
    problem = _failures(rows, lambda i: REQUEST)
    if problem:
        raise problem
    (meta,) = rows
    return {"image": _b64(meta["_image"]), "seed": meta["seed"], "metadata": _public(meta)}


def catalogue_response(rows: list[dict]) -> list[dict[str, Any]]:
    """The catalogue's response: one ``{"prompt", "generated_image", "nsfw_content_detected"}`` per image, in
    request order (rows, then each row's images); raises a 500 :class:`RequestError` when a sampler call
    failed."""
    problem = _failures(rows, lambda i: f"input_data.data[{rows[i]['manifest_row']}]")
    if problem:
        raise problem
    return [{"prompt": r["prompt"], "generated_image": _b64(r["_image"]), "nsfw_content_detected": r["nsfw"]}
            for r in rows]

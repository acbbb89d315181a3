"""Manifests of the image tasks (``variation``, ``upscale``): columns, per-row validation and planning.

A variation manifest has one row per input image (no prompt):

=======================  ========  ====================================================================
column                   required  meaning (missing or null takes the spec's ``defaults``)
=======================  ========  ====================================================================
``id``                   yes       unique non-empty string naming the row
``image_uri``            yes       fsspec URI of the input image (path, ``s3://``, ``gs://``, ``memory://``)
``seed``                 no        integer in [0, 2**63); null derives one (see ``seeds``)
``guidance_scale``       no        finite number > 0 (default 3)
``num_inference_steps``  no        integer in [1, 1000] (default 50)
``height``, ``width``    no        output size: multiples of 8, at most ``limits.max_side`` (default 512)
``num_images``           no        integer in [1, ``limits.max_images_per_row``]
``scheduler``            no        one of ``config.SCHEDULER_NAMES`` or ``model``
=======================  ========  ====================================================================

An upscale manifest has ``id``, ``image_uri`` and optionally ``prompt`` (null: ""), ``negative_prompt``,
``noise_level`` (integer in [0, 350], default 20), ``guidance_scale`` (default 9),
``num_inference_steps`` (default 75), ``seed``, ``num_images``, ``scheduler``; the output is four times
the input, so there is no ``height``/``width`` column (the items' ``height``/``width`` are filled in by
the sampler once the input has been read).

Planning reuses the text-to-image machinery (seeds, duplicate ids, carried columns, bucket sort): items
have ``ITEM_SCHEMA`` plus :data:`IMAGE_ITEM_FIELDS`. Whether an image can be read is only known in the
fetch stage; a bad image fails its row there, with its reason, and the job goes on.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from batch.spec.config import JobSpec
from batch.plan.locations import InputLocationError, check_input_uri, input_rules
from batch.store.schema import IMAGE_ITEM_SCHEMA
from batch.plan.manifest import (
    ManifestError,
    Plan,
    RowError,
    begin_row,
    check_numbers,
    check_scheduler_and_seed,
    expand_rows,
)

TASK_COLUMNS = {
    "variation": ("id", "image_uri", "seed", "guidance_scale", "num_inference_steps", "height", "width",
                  "num_images", "scheduler"),
    "upscale": ("id", "image_uri", "prompt", "negative_prompt", "noise_level", "seed", "guidance_scale",
                "num_inference_steps", "num_images", "scheduler"),
}
TASK_REQUIRED = {"variation": ("id", "image_uri"), "upscale": ("id", "image_uri")}
MAX_URI_CHARS = 4096


def check_image_columns(table: pa.Table, task: str, reserved: set[str]) -> list[str]:
    """Check an image manifest's columns; return the carried (extra) ones."""
    names = table.column_names
    missing = [c for c in TASK_REQUIRED[task] if c not in names]
    if missing:
        raise ManifestError(f"{task} manifest lacks required column(s) {missing}; it has {names}. "
                            f"{task} columns: {list(TASK_COLUMNS[task])}")
    if len(set(names)) != len(names):
        raise ManifestError(f"manifest has repeated column names: {names}")
    carried = [c for c in names if c not in TASK_COLUMNS[task]]
    clash = sorted(set(carried) & reserved)
    if clash:
        raise ManifestError(f"manifest column(s) {clash} would overwrite metadata columns of the same name; rename them")
    return carried


def validate_image_row(raw: dict[str, Any], spec: JobSpec,
                       rules: tuple[list[str], str | None] | None = None) -> dict[str, Any]:
    """Effective parameters of one variation/upscale row, or :class:`RowError` listing every bad field.

    ``rules``: (allowed prefixes, manifest folder) from :func:`batch.plan.locations.input_rules`; when given, an
    ``image_uri`` outside the allowed locations fails the row, and a good one becomes its resolved location.
    """
    task, d, lim = spec.task, spec.defaults, spec.limits
    # 1. identity and input
    take, problems, out = begin_row(raw, spec)
    out = {"task": task, **out}
    uri = raw.get("image_uri")
    if not isinstance(uri, str) or not uri.strip():
        problems.append(("image_uri", f"missing or empty, got {uri!r}"))
    elif len(uri) > MAX_URI_CHARS or "\x00" in uri:
        problems.append(("image_uri", f"longer than {MAX_URI_CHARS} characters or contains a NUL byte, got {uri[:80]!r}"))
    elif rules is not None:  # allowed input locations; the item then carries the resolved location
        try:
            uri = check_input_uri(uri, *rules)
        except InputLocationError as err:
            problems.append(("image_uri", str(err)))
    out["image_uri"] = uri

    # 2. text (upscale only)
    if task == "upscale":
        for field in ("prompt", "negative_prompt"):
            v = raw.get(field) if field == "prompt" else take(field)
            if v is not None and not isinstance(v, str):
                problems.append((field, f"must be a string or null, got {type(v).__name__}"))
            elif v is not None and len(v) > lim.max_prompt_chars:
                problems.append((field, f"longer than limits.max_prompt_chars={lim.max_prompt_chars}, got {len(v)}"))
            out[field] = "" if field == "prompt" and v is None else v
        out["tile_size"], out["tile_overlap"] = d.tile_size, d.tile_overlap
    else:
        out["prompt"], out["negative_prompt"], out["preprocessing"] = None, None, d.preprocessing

    # 3. numbers, scheduler and seed (as for txt2img)
    ranges = [("num_inference_steps", 1, 1000), ("num_images", 1, lim.max_images_per_row)]
    ranges += [("height", 8, lim.max_side), ("width", 8, lim.max_side)] if task == "variation" else [("noise_level", 0, 350)]
    check_numbers(take, ranges, problems, out)
    if task == "upscale":
        out["height"] = out["width"] = None  # 4x the input: known once the image is read
    check_scheduler_and_seed(raw, take, spec, problems, out)

    if problems:
        raise RowError(problems)
    return out


def plan_images(table: pa.Table, spec: JobSpec, reserved: set[str]) -> Plan:
    """:func:`batch.plan.manifest.plan` for the image tasks (same steps: columns, duplicate ids, rows, items
    with seeds ``row_seed + k``, stable bucket sort: :func:`batch.plan.manifest.expand_rows`)."""
    task = spec.task
    if task not in TASK_COLUMNS:
        raise ManifestError(f"task {task!r} has no image manifest")
    carried = check_image_columns(table, task, reserved)
    rows = table.select([c for c in TASK_COLUMNS[task] if c in table.column_names]).to_pylist()
    # planning in isolation (no manifest URI, no listed prefixes) cannot judge locations; a job always can,
    # and its fetch stage checks every read again
    rules = input_rules(spec) if spec.manifest or spec.allowed_input_prefixes else None

    def failed_fields(raw: dict[str, Any]) -> dict[str, Any]:
        uri = raw.get("image_uri")
        return {"task": task, "image_uri": uri if isinstance(uri, str) else None}

    return expand_rows(table, rows, carried, IMAGE_ITEM_SCHEMA, lambda raw: validate_image_row(raw, spec, rules),
                       failed_fields)

"""What a task is: the one declaration (:class:`Task`) each task module fills in and the registry lists.

A task says how a manifest row becomes work (its columns, per-row defaults and row checks), how a GPU batch
of its items becomes images (:attr:`Task.sample`, a thin adapter over the pure functions in
``batch.sampling``), and how its model is stored (the diffusers pipeline class and weighted components,
and its tiny random-weight preset). Every other module asks the registry (``batch.tasks.TASKS``) instead
of branching on the task's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from batch.plan.locations import InputLocationError, check_input_uri
from batch.plan.rows import begin_row
from batch.spec.base import SamplingDefaults
from batch.store.schema import IMAGE_ITEM_SCHEMA

# sample(model, rows, new_scheduler, opts, batch_size, rescued) -> images (uint8 HxWx3 array or list of them)
SampleFn = Callable[[Any, list[dict], Callable[[], Any], Any, int, list[bool]], Any]


def no_row_error(model: Any, row: dict) -> str | None:
    return None


def no_extra_columns(model: Any, rows: list[dict]) -> dict[str, list]:
    return {}


def no_failed_fields(raw: dict) -> dict:
    return {}


def row_size(row: dict) -> tuple[int, int]:
    """An item's output (height, width) as planned: the row's own ``height`` and ``width``."""
    return int(row["height"]), int(row["width"])


@dataclass(frozen=True)
class ModelLayout:
    """How a task's model is stored: the diffusers pipeline class its weights load with (and the
    ``from_pretrained`` extras that leave out what sdbatch does not use), its weighted components, and the
    tiny random-weight preset (``tiny_components(prediction_type) -> pipeline components``)."""

    pipeline_class: str
    pipeline_kwargs: dict[str, Any]
    weight_components: tuple[str, ...]
    tiny_components: Callable[[str], dict]


@dataclass(frozen=True)
class Task:
    """Everything sdbatch knows about one task, declared once (see the module docstring)."""

    name: str
    # 1. the manifest: columns read (others are carried into the metadata), required ones, per-row defaults
    defaults: type[SamplingDefaults]
    columns: tuple[str, ...]
    required: tuple[str, ...]
    item_schema: pa.Schema
    # validate_row(raw, spec, rules) -> effective values, or raises batch.plan.rows.RowError; ``rules`` are the
    # allowed input locations (batch.plan.locations.input_rules) for tasks that read input images
    validate_row: Callable[[dict, Any, Any], dict]
    # 2. the sampler: the item columns it reads, one GPU batch -> images, per-row checks that need the model
    read_rows: Callable[[pa.Table], list[dict]]
    sample: SampleFn
    # 3. the model: how its weights are stored and its tiny preset
    model: ModelLayout
    # optional parts
    input_image: bool = False  # items name an input image (``image_uri``), fetched in a CPU stage first
    row_error: Callable[[Any, dict], str | None] = no_row_error
    extra_columns: Callable[[Any, list[dict]], dict[str, list]] = no_extra_columns
    failed_fields: Callable[[dict], dict] = no_failed_fields  # task fields of a failed row's record
    # (height, width) of an item's output image from its sampler row; what the dry run (model: none) makes
    output_size: Callable[[dict], tuple[int, int]] = row_size


def input_pixels(rows: list[dict]) -> list[np.ndarray]:
    """The fetched input images of image-task items (``_input`` raw RGB bytes + ``input_height/width``)."""
    return [np.frombuffer(r["_input"], dtype=np.uint8).reshape(r["input_height"], r["input_width"], 3)
            for r in rows]


def image_task_rows(batch: pa.Table) -> list[dict]:
    """The image tasks' rows: every column but the internal ones, with the fetched ``_input`` pixels."""
    return batch.drop_columns([c for c in batch.column_names if c.startswith("_") and c != "_input"]).to_pylist()


MAX_URI_CHARS = 4096


def begin_image_row(raw: dict[str, Any], spec: Any, rules: Any) -> tuple[Callable[[str], Any], list, dict]:
    """:func:`batch.plan.rows.begin_row` for the image tasks, plus the ``image_uri`` check.

    ``rules``: (allowed prefixes, manifest folder) from :func:`batch.plan.locations.input_rules`; when given, an
    ``image_uri`` outside the allowed locations fails the row, and a good one becomes its resolved location.
    """
    take, problems, out = begin_row(raw, spec)
    out = {"task": spec.task, **out}
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
    return take, problems, out


def image_failed_fields(task: str) -> Callable[[dict], dict]:
    """A failed image-task row's record keeps its task and input URI (when it is a string)."""
    def fields(raw: dict) -> dict:
        uri = raw.get("image_uri")
        return {"task": task, "image_uri": uri if isinstance(uri, str) else None}
    return fields


def image_task(name: str, **parts: Any) -> Task:
    """A task whose rows name an input image (``image_uri``): what every such task shares (the required
    columns, the image item schema, the fetch stage, the sampler's row reading, the failed-row record),
    plus the task's own ``parts`` (see :class:`Task`)."""
    return Task(name=name, required=("id", "image_uri"), item_schema=IMAGE_ITEM_SCHEMA, input_image=True,
                read_rows=image_task_rows, failed_fields=image_failed_fields(name), **parts)

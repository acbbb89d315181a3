"""The metadata schema: one row per image (or failed manifest row), as every stage and reader sees it.

Dependency-free (pyarrow only), so every layer can import it: the plan builds items of ``ITEM_SCHEMA``,
the stages add ``RESULT_FIELDS``, the commit protocol writes ``METADATA_SCHEMA`` parts.
"""

from __future__ import annotations

import pyarrow as pa

# One work item per image: the effective value of every parameter that decides its pixels.
ITEM_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("manifest_row", pa.int64()),
        ("image_index", pa.int32()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("guidance_scale", pa.float64()),
        ("num_inference_steps", pa.int32()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("num_images", pa.int32()),
        ("scheduler", pa.string()),
        ("row_seed", pa.uint64()),
        ("seed", pa.uint64()),
        ("seed_source", pa.string()),
    ]
)


# Item columns added for the image tasks (null for txt2img); also metadata columns (see storage).
IMAGE_ITEM_FIELDS = [
    ("task", pa.string()),
    ("image_uri", pa.string()),  # the input URI
    ("noise_level", pa.int32()),  # upscale
    ("preprocessing", pa.string()),  # variation: "card" or "pipeline"
    ("tile_size", pa.int32()),  # upscale
    ("tile_overlap", pa.int32()),  # upscale
]


# Facts about the input image, recorded by the fetch stage.
INPUT_FIELDS = [
    ("input_sha256", pa.string()),
    ("input_width", pa.int32()),
    ("input_height", pa.int32()),
    ("input_mode", pa.string()),  # Pillow mode of the file before normalisation (RGBA, I;16, CMYK, ...)
]


IMAGE_ITEM_SCHEMA = pa.schema(list(ITEM_SCHEMA) + [pa.field(n, t) for n, t in IMAGE_ITEM_FIELDS])


RESULT_FIELDS = [
    ("status", pa.string()),  # "ok", "failed", or "skipped" (deduplicated: uri is an earlier run's image)
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
    ("sampled_at", pa.float64()),  # unix time when the image's sampler call finished (throughput over time)
    ("t_write_s", pa.float64()),
    ("optimizations", pa.string()),  # JSON: the speed switches the sampler ran with (batch/models/speed.py)
    ("vae_redecoded_fp32", pa.bool_()),  # an fp16/bf16 decode gave NaN/black and was redone in fp32
    ("warnings", pa.string()),  # e.g. "prompt: truncated to 77 tokens (had 2391)"; null when none
    ("run_id", pa.string()),
    ("attempt", pa.string()),  # the driver attempt that committed the row; the latest attempt wins
    ("member", pa.string()),  # shard formats: the image's tar member / Parquet key inside the shard at uri
    ("nsfw", pa.bool_()),  # safety checker verdict; null when no checker ran
    ("reused_from", pa.string()),  # status skipped: "<earlier output prefix> run <run_id>" the image comes from
    # the checker that gave ``nsfw`` (spec safety_checker): its location (or the model id for the model's own)
    # and resolved revision (hub commit or local-<fingerprint>); null when none ran
    ("safety_checker", pa.string()),
    ("safety_checker_revision", pa.string()),
]


METADATA_SCHEMA = pa.schema(list(ITEM_SCHEMA) + [pa.field(n, t) for n, t in RESULT_FIELDS]
                            + [pa.field(n, t) for n, t in IMAGE_ITEM_FIELDS + INPUT_FIELDS])  # image tasks; null for txt2img


RESERVED_COLUMNS = set(METADATA_SCHEMA.names) | {"_pixels", "_png", "_input", "_puts", "_uri_key"}


# Status of an image not generated because an earlier run (spec ``dedup_against``) already holds it: its row
# names the earlier image (``uri``, ``member``, ``sha256``, ``reused_from``). It counts as done, like "ok".
SKIPPED = "skipped"
DONE_STATUSES = ("ok", SKIPPED)


# The error of an image the safety checker dropped (safety_policy: drop); retry-failed leaves it.
NSFW_ERROR = "nsfw: image flagged by the safety checker (safety_policy=drop)"


def set_column(table: pa.Table, name: str, values: list, type_: pa.DataType) -> pa.Table:
    """``table`` with column ``name`` replaced (or appended) by ``values`` of type ``type_``."""
    arr = pa.array(values, type=type_)
    i = table.schema.get_field_index(name)
    if i >= 0:
        return table.set_column(i, pa.field(name, type_), arr)
    return table.append_column(pa.field(name, type_), arr)


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

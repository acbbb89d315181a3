"""Task ``txt2img``: prompts to images (SD 1.x/2.x text-to-image, diffusers' ``StableDiffusionPipeline``).

A manifest row is one prompt:

=====================  ========  =====================================================
column                 required  meaning (missing or null takes the spec's ``defaults``)
=====================  ========  =====================================================
``id``                 yes       unique non-empty string naming the row
``prompt``             yes       non-empty text
``negative_prompt``    no        text for the unconditional branch of CFG ("" when null)
``seed``               no        integer in [0, 2**63); null derives one (see ``batch.plan.seeds``)
``guidance_scale``     no        finite number > 0
``num_inference_steps`` no       integer in [1, 1000]
``height``, ``width``  no        integers, multiples of 8, at most ``limits.max_side``
``num_images``         no        integer in [1, ``limits.max_images_per_row``]
``scheduler``          no        one of ``batch.spec.base.SCHEDULER_NAMES`` or ``model``
=====================  ========  =====================================================
"""

from __future__ import annotations

from typing import Any, Literal

import pyarrow as pa
from pydantic import Field

from batch.plan.rows import begin_row, bucket_key, finish_row
from batch.spec.base import SamplingDefaults
from batch.store.schema import ITEM_SCHEMA
from batch.tasks.base import ModelLayout, Task

COLUMNS = ("id", "prompt", "negative_prompt", "seed", "guidance_scale", "num_inference_steps", "height", "width",
           "num_images", "scheduler")
SAMPLER_INPUTS = ["prompt", "negative_prompt", "seed", "height", "width", "num_inference_steps",
                  "guidance_scale", "scheduler"]


class Txt2ImgDefaults(SamplingDefaults):
    """Per-row values used where a manifest row leaves a column missing or null."""

    task: Literal["txt2img"] = Field("txt2img", exclude=True)
    negative_prompt: str | None = None
    height: int = Field(512, ge=8, multiple_of=8)
    width: int = Field(512, ge=8, multiple_of=8)


def validate_row(raw: dict[str, Any], spec: Any, rules: Any = None) -> dict[str, Any]:
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
    return finish_row(raw, take, spec, problems, out, int_ranges(lim))


def int_ranges(lim: Any) -> list[tuple[str, int, int]]:
    """The integer fields of a txt2img row and their allowed ranges under ``limits`` (also read by the
    vectorised checks, :mod:`batch.plan.vector`)."""
    return [("num_inference_steps", 1, 1000), ("num_images", 1, lim.max_images_per_row),
            ("height", 8, lim.max_side), ("width", 8, lim.max_side)]


def read_rows(batch: pa.Table) -> list[dict]:
    return batch.select(SAMPLER_INPUTS).to_pylist()


def sample(model, rows, new_scheduler, opts, batch_size, rescued):
    """One GPU batch (one bucket: shape, steps, guidance, scheduler) through :func:`batch.sampling.txt2img.txt2img`."""
    # the sampler's code loads in the sampler actors; the spec and the planner (every CLI command) import
    # this module only for its rows and defaults, so torch/diffusers are imported here, not at the top
    from batch.sampling import txt2img as sampling

    h, w, steps, g, _ = bucket_key(rows[0])
    return sampling.txt2img(model, new_scheduler(), [r["prompt"] for r in rows],
                            [r["negative_prompt"] for r in rows], [r["seed"] for r in rows],
                            sampling.SamplingParams(height=h, width=w, num_inference_steps=steps, guidance_scale=g),
                            nan_fallback=opts.nan_fallback, rescued=rescued, pinned=opts.pinned_memory)


def extra_columns(model, rows):
    # texts longer than the encoder's window are cut (as diffusers does); say so per row
    from batch.sampling.txt2img import truncation_warnings

    return {"warnings": [truncation_warnings(model.tokenizer, {"prompt": r["prompt"],
                                                               "negative_prompt": r["negative_prompt"]})
                         for r in rows]}


def tiny(prediction_type: str) -> dict:
    """The tiny txt2img preset's components (:func:`batch.models.tiny.tiny_components`)."""
    from batch.models.tiny import tiny_components

    return tiny_components(prediction_type)


TASK = Task(
    name="txt2img", defaults=Txt2ImgDefaults, columns=COLUMNS, required=("id", "prompt"), item_schema=ITEM_SCHEMA,
    validate_row=validate_row, read_rows=read_rows, sample=sample, extra_columns=extra_columns,
    model=ModelLayout("StableDiffusionPipeline", dict(feature_extractor=None, requires_safety_checker=False),
                      weight_components=("unet", "vae", "text_encoder"), tiny_components=tiny),
)

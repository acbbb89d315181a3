"""Task ``upscale``: the text-guided x4 latent upscaler (stabilityai/stable-diffusion-x4-upscaler).

A manifest row names a low-resolution input image (``id``, ``image_uri``; optional ``prompt``,
``negative_prompt``, ``noise_level`` in [0, 350] (noise added to the input through the model's low-res
schedule), ``seed``, ``guidance_scale``, ``num_inference_steps``, ``num_images``, ``scheduler``). The output
is 4x the input; inputs larger than ``defaults.tile_size`` are upscaled in blended tiles
(:mod:`batch.sampling.image`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from batch.plan.rows import finish_row
from batch.spec.base import SamplingDefaults
from batch.tasks.base import ModelLayout, begin_image_row, image_task, input_pixels

COLUMNS = ("id", "image_uri", "prompt", "negative_prompt", "noise_level", "seed", "guidance_scale",
           "num_inference_steps", "num_images", "scheduler")


class UpscaleDefaults(SamplingDefaults):
    """Per-row defaults of an x4 upscaling job (``task: upscale``).

    Inputs larger than ``tile_size`` (low-res pixels; the x4 upscaler was trained on 128 px crops) are
    upscaled tile by tile: tiles of ``tile_size`` overlap by ``tile_overlap`` pixels and are blended with
    linear ramps across the overlap (see ``batch.sampling.image``); memory is bounded by ``batch_size``
    tiles whatever the input size.
    """

    task: Literal["upscale"] = Field("upscale", exclude=True)
    negative_prompt: str | None = None
    noise_level: int = Field(20, ge=0, le=350)
    guidance_scale: float = Field(9.0, gt=0)
    num_inference_steps: int = Field(75, ge=1, le=1000)
    tile_size: int = Field(128, ge=16, multiple_of=8)
    tile_overlap: int = Field(32, ge=0)

    @model_validator(mode="after")
    def _overlap_below_tile(self) -> "UpscaleDefaults":
        if self.tile_overlap >= self.tile_size:
            raise ValueError(f"tile_overlap ({self.tile_overlap}) must be smaller than tile_size ({self.tile_size})")
        return self


def validate_row(raw: dict[str, Any], spec: Any, rules: Any = None) -> dict[str, Any]:
    """Effective parameters of one upscale row, or :class:`RowError` listing every bad field."""
    d, lim = spec.defaults, spec.limits
    take, problems, out = begin_image_row(raw, spec, rules)  # 1. identity and input
    # 2. text
    for field in ("prompt", "negative_prompt"):
        v = raw.get(field) if field == "prompt" else take(field)
        if v is not None and not isinstance(v, str):
            problems.append((field, f"must be a string or null, got {type(v).__name__}"))
        elif v is not None and len(v) > lim.max_prompt_chars:
            problems.append((field, f"longer than limits.max_prompt_chars={lim.max_prompt_chars}, got {len(v)}"))
        out[field] = "" if field == "prompt" and v is None else v
    out["tile_size"], out["tile_overlap"] = d.tile_size, d.tile_overlap
    out["height"] = out["width"] = None  # 4x the input: known once the image is read
    # 3. numbers, scheduler and seed (as for txt2img)
    return finish_row(raw, take, spec, problems, out, [
        ("num_inference_steps", 1, 1000), ("num_images", 1, lim.max_images_per_row), ("noise_level", 0, 350)])


def row_error(model, row):
    limit = model.max_noise_level if model.max_noise_level is not None else 350
    if row["noise_level"] > limit:
        return f"noise_level: above the model's max_noise_level={limit}, got {row['noise_level']}"
    return None


def output_size(row):
    """4x the fetched input (the x4 upscaler's output size), for the dry run (``model: none``)."""
    return 4 * int(row["input_height"]), 4 * int(row["input_width"])


def sample(model, rows, new_scheduler, opts, batch_size, rescued):
    """One GPU batch of inputs through :func:`batch.sampling.image.upscale`; at most ``batch_size`` tiles go
    through the UNet at once."""
    # the sampler's code loads in the sampler actors; the spec and the planner (every CLI command) import
    # this module only for its rows and defaults, so torch/diffusers are imported here, not at the top
    from batch.sampling.image import UpscaleRequest, upscale

    r0 = rows[0]
    requests = [UpscaleRequest(image=img, prompt=r["prompt"] or "", negative_prompt=r["negative_prompt"],
                               noise_level=int(r["noise_level"]), seed=int(r["seed"]))
                for r, img in zip(rows, input_pixels(rows))]
    return upscale(model, new_scheduler, requests, num_inference_steps=r0["num_inference_steps"],
                   guidance_scale=r0["guidance_scale"], tile_size=r0["tile_size"],
                   tile_overlap=r0["tile_overlap"], tiles_per_call=batch_size,
                   nan_fallback=opts.nan_fallback, rescued=rescued)


def tiny(prediction_type: str) -> dict:
    """The tiny x4 upscaler preset's components (v-prediction, as the real model)."""
    from batch.models.tiny import tiny_upscale_components

    return tiny_upscale_components()


TASK = image_task(
    "upscale", defaults=UpscaleDefaults, columns=COLUMNS, validate_row=validate_row, sample=sample,
    row_error=row_error,  # the model's max_noise_level
    output_size=output_size,
    model=ModelLayout("StableDiffusionUpscalePipeline", dict(feature_extractor=None, watermarker=None),
                      weight_components=("unet", "vae", "text_encoder"),
                      tiny_components=tiny),
)

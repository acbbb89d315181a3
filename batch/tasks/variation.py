"""Task ``variation``: image variations from CLIP image embeddings (lambdalabs/sd-image-variations-diffusers).

A manifest row names an input image (``id``, ``image_uri``; optional ``seed``, ``guidance_scale``,
``num_inference_steps``, ``height``, ``width``, ``num_images``, ``scheduler``); there is no prompt. The
model card's preprocessing (224x224 bicubic *without* antialiasing, CLIP mean/std) is the default
(``defaults.preprocessing: card``); see :mod:`batch.sampling.image`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from batch.plan.rows import finish_row
from batch.spec.base import SamplingDefaults
from batch.tasks.base import ModelLayout, begin_image_row, image_task, input_pixels

COLUMNS = ("id", "image_uri", "seed", "guidance_scale", "num_inference_steps", "height", "width", "num_images",
           "scheduler")


class VariationDefaults(SamplingDefaults):
    """Per-row defaults of an image-variation job (``task: variation``).

    ``preprocessing`` picks how an input image becomes the CLIP image encoder's 224x224 input: ``card``
    (the model card's recipe: float tensor, resize to 224x224 bicubic *without* antialiasing via
    ``torch.nn.functional.interpolate``, CLIP mean/std) or ``pipeline`` (the model's own
    ``CLIPImageProcessor``: PIL bicubic resize of the short side, centre crop, same mean/std).
    """

    task: Literal["variation"] = Field("variation", exclude=True)
    guidance_scale: float = Field(3.0, gt=0)  # the model card's example
    height: int = Field(512, ge=8, multiple_of=8)
    width: int = Field(512, ge=8, multiple_of=8)
    preprocessing: Literal["card", "pipeline"] = "card"


def validate_row(raw: dict[str, Any], spec: Any, rules: Any = None) -> dict[str, Any]:
    """Effective parameters of one variation row, or :class:`RowError` listing every bad field."""
    lim = spec.limits
    take, problems, out = begin_image_row(raw, spec, rules)  # 1. identity and input
    out["prompt"], out["negative_prompt"], out["preprocessing"] = None, None, spec.defaults.preprocessing
    # 2. numbers, scheduler and seed (as for txt2img)
    return finish_row(raw, take, spec, problems, out, [
        ("num_inference_steps", 1, 1000), ("num_images", 1, lim.max_images_per_row),
        ("height", 8, lim.max_side), ("width", 8, lim.max_side)])


def sample(model, rows, new_scheduler, opts, batch_size, rescued):
    """One GPU batch (same output size, steps, guidance, scheduler) through :func:`batch.sampling.image.variation`."""
    # the sampler's code loads in the sampler actors; the spec and the planner (every CLI command) import
    # this module only for its rows and defaults, so torch/diffusers are imported here, not at the top
    from batch.sampling.image import preprocess_for_variation, variation
    from batch.sampling.txt2img import SamplingParams

    how = {r["preprocessing"] for r in rows}
    if len(how) != 1:
        raise ValueError(f"one GPU batch mixes preprocessing modes {sorted(how)}")
    r0 = rows[0]
    pixel_values = preprocess_for_variation(model, input_pixels(rows), how.pop())
    return list(variation(model, new_scheduler(), pixel_values, [r["seed"] for r in rows],
                          SamplingParams(height=r0["height"], width=r0["width"],
                                         num_inference_steps=r0["num_inference_steps"],
                                         guidance_scale=r0["guidance_scale"]),
                          nan_fallback=opts.nan_fallback, rescued=rescued))


def tiny(prediction_type: str) -> dict:
    """The tiny variation preset's components (epsilon, as the real model)."""
    from batch.models.tiny import tiny_variation_components

    return tiny_variation_components()


TASK = image_task(
    "variation", defaults=VariationDefaults, columns=COLUMNS, validate_row=validate_row, sample=sample,
    model=ModelLayout("StableDiffusionImageVariationPipeline", dict(requires_safety_checker=False),
                      weight_components=("unet", "vae", "image_encoder"),
                      tiny_components=tiny),
)

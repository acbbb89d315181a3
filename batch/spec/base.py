"""What every part of a job spec shares: the strict base model, scheduler names, seed range, limits, speed switches.

Dependency-free (pydantic only), so the task modules (``batch.tasks``) can declare their per-row defaults on
it and :mod:`batch.spec.config` can assemble the whole spec from them without an import circle.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEDULER_NAMES = ("pndm", "plms", "ddim", "euler", "euler_a", "dpmpp_2m", "lms")
SchedulerName = Literal["model", "pndm", "plms", "ddim", "euler", "euler_a", "dpmpp_2m", "lms"]
MAX_SEED = 2**63  # seeds live in [0, 2**63); seed + image index then always fits a uint64


class SpecError(ValueError):
    """A job spec that cannot be used; the message names the field and what is allowed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SamplingDefaults(_Strict):
    """What every task's per-row defaults share; each task (``batch.tasks``) sets its own guidance and step
    defaults. ``task`` is the discriminator of ``JobSpec.defaults``: it is always the spec's own ``task``
    (filled in from it, never written by hand) and is left out of dumps, so ``run.json`` is unchanged."""

    guidance_scale: float = Field(7.5, gt=0)
    num_inference_steps: int = Field(50, ge=1, le=1000)
    num_images: int = Field(1, ge=1)
    scheduler: SchedulerName = "model"

    @field_validator("guidance_scale")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v


class Limits(_Strict):
    """Bounds a manifest row may not exceed (each violation fails that row only)."""

    max_images_per_row: int = Field(16, ge=1)
    max_side: int = Field(2048, ge=8)
    max_prompt_chars: int = Field(10_000, ge=1)
    # Input images (variation, upscale): more pixels than this fails the row before decoding
    # (decompression-bomb guard); 16 Mpx = 4096 x 4096.
    max_input_pixels: int = Field(16_777_216, ge=1)
    # Input images: a stored object larger than this fails its row from its size alone, before any byte is
    # read (a 2-3 GiB file used to be read whole only to fail decoding); 128 MiB holds any 16 Mpx PNG/JPEG/TIFF.
    max_input_bytes: int = Field(128 * 1024 * 1024, ge=1)
    # ... and a read that has not finished after this many seconds fails its row (checked between chunks).
    input_read_timeout_s: float = Field(60.0, gt=0)
    # Classifier-free guidance eps_u + g * (eps_c - eps_u) (Ho & Salimans 2022): the model cards use 1.5-8 and
    # common UIs cap g at 30; far above, fp16 activations overflow (65504) and float32 ones lose every digit of
    # eps_u, so the result is NaN or a flat image. Rows above this fail validation.
    max_guidance_scale: float = Field(100.0, gt=0)


class Optimizations(_Strict):
    """Speed switches (``batch/models/speed.py``). Defaults keep outputs bit-identical to the plain path."""

    attention: Literal["sdpa", "math"] = "sdpa"  # sdpa: PyTorch scaled_dot_product_attention (diffusers' default)
    channels_last: bool = False  # UNet/VAE convolutions in NHWC memory layout (faster on tensor cores)
    fuse_qkv: bool = False  # one matmul for the q/k/v projections of self-attention
    compile: bool = False  # torch.compile the UNet (first batch of each shape pays the compile cost)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    cudnn_benchmark: bool = False  # let cuDNN time its convolution algorithms per shape (process-wide; GPU only)
    vae_dtype: Literal["model", "float32"] = "model"  # float32: decode in fp32 always (SD2.1/x4 fp16 safety)
    nan_fallback: bool = True  # fp16/bf16 decodes with NaN/inf or all-black output are re-decoded in fp32
    # compile_mode "reduce-overhead" is the CUDA graphs switch (one graph per bucket shape; CUDA only)
    compile_vae: bool = False  # torch.compile the VAE decoder too (same compile_mode)
    pinned_memory: bool = False  # txt2img: quantise decoded images on the device, copy out via pinned memory (CUDA)
    # torch.compiler cache artifacts (local path or fsspec URI of a folder): each actor loads them before
    # compiling and saves them after a call that compiled something new, so later actors start warm
    compile_cache: str | None = None

    def cuda_only(self) -> str | None:
        """Why these switches need a CUDA device (an error message naming the field), or None."""
        if self.pinned_memory:
            return "optimizations.pinned_memory: pinned host memory needs a CUDA device"
        if (self.compile or self.compile_vae) and self.compile_mode == "reduce-overhead":
            return "optimizations.compile_mode: reduce-overhead means CUDA graphs, which need a CUDA device (use default)"
        return None

    @model_validator(mode="after")
    def _cache_needs_compile(self) -> "Optimizations":
        if self.compile_cache and not (self.compile or self.compile_vae):
            raise ValueError("compile_cache: set compile or compile_vae too (without them nothing is compiled)")
        return self

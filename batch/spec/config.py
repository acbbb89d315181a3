"""Typed job spec: what to run, on which model, with which defaults, where to write.

A spec is YAML (``configs/*.yaml``) validated by pydantic with ``extra="forbid"``: a misspelt or unknown
key, a wrong type or a value outside the allowed set fails loudly with the field's dotted name and what
is allowed. Command-line flags override spec values through :func:`apply_overrides`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SCHEDULER_NAMES = ("pndm", "plms", "ddim", "euler", "euler_a", "dpmpp_2m", "lms")
SchedulerName = Literal["model", "pndm", "plms", "ddim", "euler", "euler_a", "dpmpp_2m", "lms"]
MAX_SEED = 2**63  # seeds live in [0, 2**63); seed + image index then always fits a uint64


class SpecError(ValueError):
    """A job spec that cannot be used; the message names the field and what is allowed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class _SamplingDefaults(_Strict):
    """What every task's per-row defaults share; each task sets its own guidance and step defaults."""

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


class Txt2ImgDefaults(_SamplingDefaults):
    """Per-row values used where a manifest row leaves a column missing or null."""

    negative_prompt: str | None = None
    height: int = Field(512, ge=8, multiple_of=8)
    width: int = Field(512, ge=8, multiple_of=8)


class VariationDefaults(_SamplingDefaults):
    """Per-row defaults of an image-variation job (``task: variation``).

    ``preprocessing`` picks how an input image becomes the CLIP image encoder's 224x224 input: ``card``
    (the model card's recipe: float tensor, resize to 224x224 bicubic *without* antialiasing via
    ``torch.nn.functional.interpolate``, CLIP mean/std) or ``pipeline`` (the model's own
    ``CLIPImageProcessor``: PIL bicubic resize of the short side, centre crop, same mean/std).
    """

    guidance_scale: float = Field(3.0, gt=0)  # the model card's example
    height: int = Field(512, ge=8, multiple_of=8)
    width: int = Field(512, ge=8, multiple_of=8)
    preprocessing: Literal["card", "pipeline"] = "card"


class UpscaleDefaults(_SamplingDefaults):
    """Per-row defaults of an x4 upscaling job (``task: upscale``).

    Inputs larger than ``tile_size`` (low-res pixels; the x4 upscaler was trained on 128 px crops) are
    upscaled tile by tile: tiles of ``tile_size`` overlap by ``tile_overlap`` pixels and are blended with
    linear ramps across the overlap (see ``batch.sampling.image``); memory is bounded by ``batch_size``
    tiles whatever the input size.
    """

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


DEFAULTS_FOR_TASK: dict[str, type[_Strict]] = {
    "txt2img": Txt2ImgDefaults,
    "variation": VariationDefaults,
    "upscale": UpscaleDefaults,
}


class Limits(_Strict):
    """Bounds a manifest row may not exceed (each violation fails that row only)."""

    max_images_per_row: int = Field(16, ge=1)
    max_side: int = Field(2048, ge=8)
    max_prompt_chars: int = Field(10_000, ge=1)
    # Input images (variation, upscale): more pixels than this fails the row before decoding
    # (decompression-bomb guard); 16 Mpx = 4096 x 4096.
    max_input_pixels: int = Field(16_777_216, ge=1)


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


class JobSpec(_Strict):
    """One batch job. See ``configs/`` for annotated examples and README "Job spec" for every field."""

    task: Literal["txt2img", "variation", "upscale"] = "txt2img"

    # Model: the built-in ``tiny`` preset, a local diffusers folder, or a hub id ("org/name").
    model: str = "tiny"
    revision: str | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # auto: float16 on cuda, float32 on cpu
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when the Ray cluster has GPUs
    variant: str | None = None  # weight file variant, e.g. "fp16" (diffusion_pytorch_model.fp16.safetensors)
    allow_pickle: bool = False  # load pickled .bin/.ckpt weights; off by default (safetensors only)

    # The defaults class follows ``task`` (``DEFAULTS_FOR_TASK``); fields of another task are refused.
    defaults: Txt2ImgDefaults | VariationDefaults | UpscaleDefaults = Field(default_factory=Txt2ImgDefaults,
                                                                            validate_default=True)
    limits: Limits = Field(default_factory=Limits)
    optimizations: Optimizations = Field(default_factory=Optimizations)

    # Inputs and outputs (fsspec URIs: local paths, file://, s3://, gs://, memory://, ...).
    manifest: str | None = None
    output: str | None = None
    storage_options: dict[str, Any] = Field(default_factory=dict)  # passed to fsspec for manifest and output
    # Where image URIs in a manifest may point (URI prefixes); empty: only the manifest's own folder.
    allowed_input_prefixes: list[str] = Field(default_factory=list)

    # Compute.
    batch_size: int = Field(4, ge=1)  # images per sampler call
    actors: int | Literal["auto"] = "auto"  # sampler replicas; auto: one per GPU (cuda), 1 (cpu)
    gpus_per_actor: float | None = Field(None, ge=0)  # None: 1 on cuda, 0 on cpu
    cpus_per_actor: float | None = Field(None, gt=0)  # None: chosen so CPU stages always keep a CPU free
    writer_cpus: float = Field(0.25, gt=0)  # CPU per encode/write actor
    # Wait (seconds) for every sampler actor to load its model before handing out work, so blocks spread
    # over all of them; 0 starts work on the first ready actor. Raise it for clusters that autoscale GPUs.
    wait_for_actors_s: int = Field(900, ge=0)
    ray_address: str | None = None  # None: $RAY_ADDRESS, else an embedded local Ray

    # Identity, seeding and verdict.
    run_id: str | None = None  # default: UTC timestamp + random suffix
    seed: int = Field(0, ge=0, lt=MAX_SEED)  # run seed: rows without a seed derive theirs from (seed, id)
    max_failed_fraction: float = Field(0.0, ge=0, le=1)  # exit non-zero above this fraction of failed rows
    commit_every: int = Field(64, ge=1)  # commit a metadata part once this many rows are waiting ...
    commit_seconds: float = Field(30.0, gt=0)  # ... or once the oldest waiting row is this old
    storage_retries: int = Field(6, ge=1)  # tries per storage operation on transient errors (backoff)
    progress: bool = True

    # Output format (img2dataset conventions; see batch/store/formats.py). JPEG and lossy WebP change pixels,
    # which shifts FID: keep png (or lossless webp) for evaluation runs.
    output_format: Literal["files", "webdataset", "parquet"] = "files"
    image_format: Literal["png", "webp", "jpeg"] = "png"
    webp_lossless: bool = True
    jpeg_quality: int = Field(95, ge=1, le=100)  # also the quality of lossy webp

    # Safety checker (runs only when the model folder has safety_checker/ + feature_extractor/):
    # flag = keep the image and set metadata nsfw; blackout = zero its pixels (diffusers); drop = fail the row.
    safety_policy: Literal["flag", "blackout", "drop"] = "flag"

    @field_validator("defaults", mode="wrap")
    @classmethod
    def _defaults_for_task(cls, v: Any, handler: Any, info: Any) -> Any:
        """Validate ``defaults`` against the class of the spec's ``task`` (errors keep dotted fields)."""
        kind = DEFAULTS_FOR_TASK.get(info.data.get("task", "txt2img"), Txt2ImgDefaults)
        if isinstance(v, BaseModel):
            v = v.model_dump(exclude_unset=True) if not isinstance(v, kind) else v
        return v if isinstance(v, kind) else kind.model_validate(v if v is not None else {})

    @model_validator(mode="after")
    def _cpu_requests_no_gpus(self) -> "JobSpec":
        if self.device == "cpu" and self.gpus_per_actor:
            raise ValueError(f"device: cpu with gpus_per_actor: {self.gpus_per_actor:g}: a CPU run requests no "
                             "GPUs from Ray; set gpus_per_actor: 0 (or leave it unset), or device: cuda "
                             "(the --device cpu flag clears gpus_per_actor)")
        return self

    @field_validator("actors")
    @classmethod
    def _positive_actors(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be >= 1 or 'auto'")
        return v


def _format_errors(err: ValidationError, source: str, task: str = "txt2img") -> str:
    lines = [f"invalid job spec ({source}):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = f"unknown field; allowed here: {', '.join(sorted(_allowed_at(e['loc'], task)))}"
        got = e.get("input")
        if not e["loc"]:  # a rule across fields: its message names them
            lines.append(f"  {msg.removeprefix('Value error, ')}")
        else:
            lines.append(f"  {field}: {msg} (got {got!r})" if e["type"] != "extra_forbidden" else f"  {field}: {msg}")
    return "\n".join(lines)


def _allowed_at(loc: tuple, task: str = "txt2img") -> list[str]:
    model: type[BaseModel] = JobSpec
    for part in loc[:-1]:
        ann = model.model_fields[str(part)].annotation
        if model is JobSpec and part == "defaults":
            ann = DEFAULTS_FOR_TASK.get(task, Txt2ImgDefaults)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
    return list(model.model_fields)


def parse_spec(data: dict[str, Any], source: str = "<dict>") -> JobSpec:
    """Validate a spec dict; raise :class:`SpecError` naming every bad field."""
    if not isinstance(data, dict):
        raise SpecError(f"invalid job spec ({source}): expected a mapping at the top level, got {type(data).__name__}")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        task = data.get("task") if data.get("task") in DEFAULTS_FOR_TASK else "txt2img"
        raise SpecError(_format_errors(err, source, task)) from None


def load_spec(path: str | Path | None, overrides: dict[str, Any] | None = None) -> JobSpec:
    """Load a YAML spec (or the defaults when ``path`` is None) and apply dotted-key overrides."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            data = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise SpecError(f"job spec not found: {path}") from None
        except yaml.YAMLError as err:
            raise SpecError(f"job spec {path} is not valid YAML: {err}") from None
    if data is None:  # an empty file is the all-defaults spec
        data = {}
    if not isinstance(data, dict):
        raise SpecError(f"invalid job spec ({source}): expected a mapping at the top level, got {type(data).__name__}")
    return parse_spec(apply_overrides(data, overrides or {}), source)


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``data`` with ``{"a.b": value}`` overrides set (a None value sets null)."""
    out = yaml.safe_load(yaml.safe_dump(data)) if data else {}
    for key, value in overrides.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SpecError(f"cannot override {key}: {part} is not a mapping")
        node[parts[-1]] = value
    return out


def parse_set_option(text: str) -> tuple[str, Any]:
    """Parse a ``--set key.path=value`` option; the value is read as YAML (numbers, booleans, null)."""
    if "=" not in text:
        raise SpecError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)

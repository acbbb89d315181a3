"""The evaluation spec (``configs/eval-pareto-*.yaml``): models, guidance scales, prompts, and the job spec
each model's generation runs with."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from batch.metrics.settings import ClipSettings, KidSettings, StatsSpec
from batch.spec.base import MAX_SEED, SchedulerName, SpecError, _Strict
from batch.spec.config import JobSpec, apply_overrides, parse_spec

DEFAULT_SCALES = (1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)
# Fields an evaluation sets itself; ``generation`` may not override them.
_EVAL_OWNED = {"task", "model", "revision", "variant", "manifest", "output", "defaults", "run_id", "seed",
               "storage_options", "ray_address", "progress"}


class EvalModel(_Strict):
    """One model of the sweep."""

    name: str = Field(min_length=1, max_length=64)  # label in plots/tables; slug for output keys
    model: str  # "tiny", a local diffusers folder, or a hub id
    revision: str | None = None
    variant: str | None = None
    scheduler: SchedulerName = "plms"  # model cards: PLMS for v1, DDIM for v2

    @field_validator("name")
    @classmethod
    def _slug_safe(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError("must be letters, digits, '.', '_' or '-' (it names an output folder)")
        return v


class EvalSpec(StatsSpec):
    """A Pareto evaluation (``configs/eval-pareto-*.yaml``); unknown keys are errors. Its FID, feature,
    storage and Ray settings are :class:`StatsSpec`'s."""

    models: list[EvalModel] = Field(min_length=1)
    guidance_scales: list[float] = Field(default_factory=lambda: list(DEFAULT_SCALES), min_length=1)
    num_prompts: int = Field(10_000, ge=2)
    seed: int = Field(0, ge=0, lt=MAX_SEED)  # prompt sample and per-prompt image seeds
    num_inference_steps: int = Field(50, ge=1, le=1000)
    height: int = Field(512, ge=8, multiple_of=8)
    width: int = Field(512, ge=8, multiple_of=8)
    negative_prompt: str | None = None
    clip: ClipSettings = Field(default_factory=ClipSettings)
    kid: KidSettings = Field(default_factory=KidSettings)
    generation: dict[str, Any] = Field(default_factory=dict)  # job-spec fields: dtype, device, batch_size, ...

    @field_validator("guidance_scales")
    @classmethod
    def _scales(cls, v: list[float]) -> list[float]:
        if any(not math.isfinite(g) or g <= 0 for g in v):
            raise ValueError("every scale must be a finite number > 0")
        if len(set(v)) != len(v):
            raise ValueError("scales must be distinct")
        return v

    @model_validator(mode="after")
    def _check(self) -> "EvalSpec":
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"models: names must be distinct, got {names}")
        owned = sorted(set(self.generation) & _EVAL_OWNED)
        if owned:
            raise ValueError(f"generation: {owned} are set by the evaluation itself")
        job_spec(self, self.models[0], "manifest", "output")  # validates generation.* against JobSpec
        return self


def job_spec(spec: EvalSpec, m: EvalModel, manifest: str, output: str) -> JobSpec:
    """The ordinary job spec that generates model ``m``'s images (errors name ``generation.<field>``)."""
    data = {**spec.generation, "task": "txt2img", "model": m.model, "revision": m.revision, "variant": m.variant,
            "manifest": manifest, "output": output, "seed": spec.seed, "storage_options": spec.storage_options,
            "ray_address": spec.ray_address, "progress": spec.progress,
            "defaults": {"height": spec.height, "width": spec.width, "num_inference_steps": spec.num_inference_steps,
                         "scheduler": m.scheduler, "negative_prompt": spec.negative_prompt}}
    try:
        return parse_spec(data, "generation")
    except SpecError as err:
        raise ValueError(str(err).replace("\n  ", "\n  generation.")) from None


def load_eval_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> EvalSpec:
    """Load and validate an evaluation YAML; :class:`SpecError` names every bad field."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise SpecError(f"evaluation spec not found: {path}") from None
    except yaml.YAMLError as err:
        raise SpecError(f"evaluation spec {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise SpecError(f"invalid evaluation spec ({path}): expected a mapping at the top level")
    try:
        return EvalSpec.model_validate(apply_overrides(data, overrides or {}))
    except ValidationError as err:
        lines = [f"invalid evaluation spec ({path}):"]
        for e in err.errors():
            field = ".".join(str(p) for p in e["loc"]) or "<root>"
            lines.append(f"  {field}: {e['msg']}")
        raise SpecError("\n".join(lines)) from None

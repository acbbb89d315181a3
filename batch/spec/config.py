"""Typed job spec: what to run, on which model, with which defaults, where to write.

A spec is YAML (``configs/*.yaml``) validated by pydantic with ``extra="forbid"``: a misspelt or unknown
key, a wrong type or a value outside the allowed set fails loudly with the field's dotted name and what
is allowed. Command-line flags override spec values through :func:`apply_overrides`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from batch.spec.base import MAX_SEED, Limits, Optimizations, SpecError, _Strict
from batch.tasks import TASKS

TaskName = Literal[tuple(TASKS)]  # type: ignore[valid-type]
# ``defaults`` is the defaults class of the spec's ``task`` (a union discriminated on ``task``, which
# :meth:`JobSpec._task_into_defaults` copies from the spec into ``defaults`` before validation)
TaskDefaults = Annotated[Union[tuple(t.defaults for t in TASKS.values())], Field(discriminator="task")]


class ActorRange(_Strict):
    """An elastic sampler pool: ``min`` actors to start with (work starts once they are up), growing to
    ``max`` while nodes join; ``max`` unset: as many as the cluster's maximum size fits (see
    :func:`batch.run.pipeline.resolve_resources`)."""

    min: int = Field(1, ge=1)
    max: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> "ActorRange":
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max ({self.max}) is below min ({self.min})")
        return self


class ReplicaRange(ActorRange):
    """Serve autoscaling bounds of the sampler deployment (``serve.replicas: {min, max}``): Ray Serve starts
    ``min`` replicas and adds replicas up to ``max`` while requests queue (``autoscaling_config``). Unlike a
    batch job's pool, ``max`` is required: Serve needs it, and there is no cluster maximum to read at deploy."""

    max: int = Field(..., ge=1)


class ServeSettings(_Strict):
    """``sdbatch serve`` (the real-time endpoint, :mod:`batch.serve`): how many sampler replicas, how requests
    are batched and bounded, where it listens. The batch job ignores this section."""

    # sampler replicas (each holds one model; one GPU each on cuda): a number, or {min, max} for autoscaling
    replicas: int | ReplicaRange = 1
    # images a replica collects into one batch before splitting it into sampler calls of at most batch_size
    # images of one bucket (the batch job's rule); a request is never split: a larger one is a batch alone
    max_batch_size: int = Field(8, ge=1)
    batch_wait_ms: float = Field(20.0, ge=0)  # how long a replica waits for more requests to fill a batch
    max_images_per_request: int = Field(8, ge=1)  # more: HTTP 413
    max_queued_images: int = Field(64, ge=1)  # images accepted and not yet answered; more: HTTP 429
    host: str = "127.0.0.1"  # the HTTP proxy's address (sdbatch serve --host); 0.0.0.0 to listen on every interface
    port: int = Field(8000, ge=1, le=65535)  # sdbatch serve --port

    @field_validator("replicas")
    @classmethod
    def _positive_replicas(cls, v: int | ReplicaRange) -> int | ReplicaRange:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be >= 1, or {min, max}")
        return v

    @model_validator(mode="after")
    def _limits_fit(self) -> "ServeSettings":
        if self.max_images_per_request > self.max_queued_images:
            raise ValueError(f"max_images_per_request ({self.max_images_per_request}) is above max_queued_images "
                             f"({self.max_queued_images}): such a request could never be queued")
        return self


class JobSpec(_Strict):
    """One batch job. See ``configs/`` for annotated examples and README "Job spec" for every field."""

    task: TaskName = "txt2img"  # one of batch.tasks.TASKS

    # Model: the built-in ``tiny`` preset, a local diffusers folder, or a hub id ("org/name").
    model: str = "tiny"
    revision: str | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # auto: float16 on cuda, float32 on cpu
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when the Ray cluster has GPUs
    variant: str | None = None  # weight file variant, e.g. "fp16" (diffusion_pytorch_model.fp16.safetensors)
    allow_pickle: bool = False  # load pickled .bin/.ckpt weights; off by default (safetensors only)

    # The defaults class follows ``task`` (``batch.tasks.TASKS[task].defaults``); fields of another task are refused.
    defaults: TaskDefaults = Field(default_factory=dict, validate_default=True)
    limits: Limits = Field(default_factory=Limits)
    optimizations: Optimizations = Field(default_factory=Optimizations)

    # Inputs and outputs (fsspec URIs: local paths, file://, s3://, gs://, memory://, ...).
    # A manifest: a file, folder or glob URI, or a list of them read in order (README "Manifest forms").
    manifest: str | list[str] | None = None
    output: str | None = None
    storage_options: dict[str, Any] = Field(default_factory=dict)  # passed to fsspec for manifest and output
    # Where image URIs in a manifest may point (URI prefixes); empty: only the manifest's own folder.
    allowed_input_prefixes: list[str] = Field(default_factory=list)
    # Absolute local paths that every node of the cluster sees (a shared mount such as NFS or a CSI volume);
    # on a cluster, a manifest or output on a local path is refused unless it lies under one of these.
    shared_paths: list[str] = Field(default_factory=list)

    # Compute.
    batch_size: int = Field(4, ge=1)  # images per sampler call
    # sampler replicas: a number (fixed pool), {min, max} (elastic pool), or auto: on cuda an elastic pool from
    # one actor per GPU present to one per GPU the cluster can grow to (autoscaler config), on cpu 1
    actors: int | Literal["auto"] | ActorRange = "auto"
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
    # Fresh seeds per scheduled day: the run seed becomes SHA-256 of (seed, date) (batch/plan/seeds.py), so each
    # day draws new samples of the same prompts and a rerun of one day the same ones. Needs ``date``.
    seed_per_day: bool = False
    date: str | None = None  # the run's day, YYYY-MM-DD (--date); recorded in run.json, never read from the clock
    # Deduplication across runs: earlier run prefixes (or base prefixes whose child folders are runs, such as
    # a nightly's BASE/ holding dt=YYYY-MM-DD/); an image whose key (model, revision, effective parameters,
    # prompts, seed, input) matches an earlier ok image is not generated again but recorded with status
    # "skipped" and the earlier image's uri (batch/plan/dedup.py).
    dedup_against: list[str] = Field(default_factory=list)
    max_failed_fraction: float = Field(0.0, ge=0, le=1)  # exit non-zero above this fraction of failed rows
    commit_every: int = Field(64, ge=1)  # commit a metadata part once this many rows are waiting ...
    commit_seconds: float = Field(30.0, gt=0)  # ... or once the oldest waiting row is this old
    # manifest rows the driver plans and hands to the pipeline at a time (rounded up to whole plan chunks of
    # 65,536): more rows, fewer pool restarts (each wave is one Ray Data execution: actors load the model again)
    # and more driver memory (measured: 138 bytes an image in the items table, 45-character prompts); batch
    # composition does not depend on it
    wave_rows: int = Field(1_048_576, ge=1)
    storage_retries: int = Field(6, ge=1)  # tries per storage operation on transient errors (backoff)
    progress: bool = True

    # Output format (img2dataset conventions; see batch/store/formats.py). JPEG and lossy WebP change pixels,
    # which shifts FID: keep png (or lossless webp) for evaluation runs.
    output_format: Literal["files", "webdataset", "parquet"] = "files"
    image_format: Literal["png", "webp", "jpeg"] = "png"
    webp_lossless: bool = True
    jpeg_quality: int = Field(95, ge=1, le=100)  # also the quality of lossy webp
    # webdataset/parquet: at most this many images per shard (the encode/write stage is handed this many
    # images at a time); None: one shard per block the pipeline hands the writers (a few GPU batches)
    images_per_shard: int | None = Field(None, ge=1)

    # Safety checker (batch/models/safety.py), loaded with any task and model; the dry run (model: none) loads none.
    # "model": the model's own if its folder ships safety_checker/ + feature_extractor/ (SD v1), else none (SD 2.x,
    # tiny); "none": off; or where one is: a hub id (e.g. CompVis/stable-diffusion-safety-checker, the standalone
    # SD v1 checker) or a local folder, either a standalone checker (config.json + weights +
    # preprocessor_config.json) or a diffusers model folder. Safetensors only unless allow_pickle.
    safety_checker: str = "model"
    safety_checker_revision: str | None = None  # hub ids only: branch, tag or commit (the commit is recorded)
    # flag = keep the image and set metadata nsfw; blackout = zero its pixels (diffusers); drop = fail the row.
    safety_policy: Literal["flag", "blackout", "drop"] = "flag"

    # The real-time endpoint (sdbatch serve, batch/serve/): replicas, request batching and limits, address.
    serve: ServeSettings = Field(default_factory=ServeSettings)

    @model_validator(mode="before")
    @classmethod
    def _task_into_defaults(cls, data: Any) -> Any:
        """``defaults`` is validated by the spec's task's class: give it the discriminator, ``task``."""
        if not isinstance(data, dict):
            return data
        task = data.get("task", "txt2img")
        defaults = data.get("defaults")
        if isinstance(defaults, BaseModel):  # e.g. model_copy(update=...) or a defaults object
            defaults = defaults.model_dump(exclude_unset=True)
        if defaults is None:
            defaults = {}
        if isinstance(defaults, dict) and task in TASKS:
            data = {**data, "defaults": {**defaults, "task": task}}
        return data

    @model_validator(mode="after")
    def _cpu_requests_no_gpus(self) -> "JobSpec":
        if self.device == "cpu" and self.gpus_per_actor:
            raise ValueError(f"device: cpu with gpus_per_actor: {self.gpus_per_actor:g}: a CPU run requests no "
                             "GPUs from Ray; set gpus_per_actor: 0 (or leave it unset), or device: cuda "
                             "(the --device cpu flag clears gpus_per_actor)")
        if self.images_per_shard is not None and self.output_format == "files":
            raise ValueError(f"images_per_shard: {self.images_per_shard} applies to the shard formats; "
                             "set output_format: webdataset or parquet, or leave images_per_shard unset")
        if self.device == "cpu" and self.optimizations.cuda_only():  # refused up front, not in every actor
            raise ValueError(f"{self.optimizations.cuda_only()}, and device is cpu")
        return self

    @field_validator("safety_checker")
    @classmethod
    def _checker_location(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be 'model', 'none', a hub id like 'org/name', or a local folder")
        return v

    @model_validator(mode="after")
    def _checker_revision_needs_location(self) -> "JobSpec":
        if self.safety_checker_revision is not None and self.safety_checker in ("model", "none"):
            raise ValueError(f"safety_checker_revision: {self.safety_checker_revision!r} applies to a hub id in "
                             f"safety_checker, which is {self.safety_checker!r} (the model's own follows revision)")
        return self

    @field_validator("manifest")
    @classmethod
    def _manifest_uris(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list):
            if not v or not all(u.strip() for u in v):
                raise ValueError("a list of manifests must hold at least one URI, and no empty ones")
            return v[0] if len(v) == 1 else v
        return v

    @field_validator("date", mode="before")
    @classmethod
    def _iso_day(cls, v: Any) -> Any:
        import datetime as dt
        import re

        if isinstance(v, dt.date) and not isinstance(v, dt.datetime):  # YAML reads an unquoted 2026-01-01 as a date
            return v.isoformat()
        if not isinstance(v, str):
            return v  # None, or a wrong type pydantic names
        try:
            if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", v):
                raise ValueError
            dt.date.fromisoformat(v)
        except ValueError:
            raise ValueError("must be a day YYYY-MM-DD") from None
        return v

    @field_validator("actors")
    @classmethod
    def _positive_actors(cls, v: int | str | ActorRange) -> int | str | ActorRange:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be >= 1 or 'auto'")
        return v


def _user_loc(loc: tuple) -> tuple:
    """An error's location as the user wrote it: ``defaults.<task>.height`` (the union's tag) -> ``defaults.height``."""
    if len(loc) >= 2 and loc[0] == "defaults" and loc[1] in TASKS:
        return (loc[0],) + tuple(loc[2:])
    return tuple(loc)


def _format_errors(err: ValidationError, source: str, task: str = "txt2img") -> str:
    lines = [f"invalid job spec ({source}):"]
    for e in err.errors():
        if e["type"] == "union_tag_not_found":  # no valid task: reported at ``task`` itself
            continue
        e = {**e, "loc": _user_loc(e["loc"])}
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
            ann = TASKS[task].defaults
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
    # the defaults' discriminator is the spec's own ``task``, never written inside ``defaults``
    return [f for f in model.model_fields if not (model is not JobSpec and f == "task")]


def parse_spec(data: dict[str, Any], source: str = "<dict>") -> JobSpec:
    """Validate a spec dict; raise :class:`SpecError` naming every bad field."""
    if not isinstance(data, dict):
        raise SpecError(f"invalid job spec ({source}): expected a mapping at the top level, got {type(data).__name__}")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        task = data.get("task") if data.get("task") in TASKS else "txt2img"
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

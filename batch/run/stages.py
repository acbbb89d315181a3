"""The job's stages as plain Python: the sampler (a stateful class) and the encode/write stage, with their settings.

``pipeline`` wires these into Ray; here they take and return ``pyarrow.Table`` batches and know nothing
of Ray, so they run (and are tested) in-process too. The sampler never encodes or uploads; the writer
never touches the model. Each is configured by one settings object built once from the spec
(:class:`SamplerSettings`, :class:`WriterSettings`).
"""

from __future__ import annotations

import gc
import json
import sys
import time
import traceback
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from batch.models.devices import torch_device, worker_id
from batch.models.load import load_model, make_scheduler, scheduler_class_name
from batch.models.safety import apply_policy
from batch.models.speed import CompileCache, apply_optimizations
from batch.plan.batches import PACKED, assign_batches, unpack_batches
from batch.sampling.dryrun import dry_run_images
from batch.spec.base import Optimizations
from batch.store.formats import OutputFormat, write_block
from batch.store.io import error_text
from batch.store.schema import METADATA_SCHEMA, NSFW_ERROR
from batch.store.schema import set_column as _set_column
from batch.tasks import TASKS


@dataclass(frozen=True)
class SamplerSettings:
    """Everything a sampler replica needs, built once from the spec (:meth:`from_spec`)."""

    task: str = "txt2img"
    model: str = "tiny"
    revision: str | None = None
    dtype: str = "auto"
    device: str = "cpu"
    batch_size: int = 4  # images (upscale: tiles) per sampler call
    allow_pickle: bool = False
    variant: str | None = None
    num_threads: int | None = None  # torch threads of a CPU actor; None: leave torch's choice
    optimizations: Optimizations = field(default_factory=Optimizations)
    safety_policy: str = "flag"
    safety_checker: str = "model"  # the model's own, "none", or a hub id / folder (batch.models.weights)
    safety_checker_revision: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)  # for optimizations.compile_cache

    @classmethod
    def from_spec(cls, spec: Any, device: str, num_threads: int | None = None) -> "SamplerSettings":
        return cls(task=spec.task, model=spec.model, revision=spec.revision, dtype=spec.dtype, device=device,
                   batch_size=spec.batch_size, allow_pickle=spec.allow_pickle, variant=spec.variant,
                   num_threads=num_threads, optimizations=spec.optimizations, safety_policy=spec.safety_policy,
                   safety_checker=spec.safety_checker, safety_checker_revision=spec.safety_checker_revision,
                   storage_options=spec.storage_options)


@dataclass(frozen=True)
class WriterSettings:
    """Where and how the encode/write stage stores images, built once from the spec (:meth:`from_spec`)."""

    output: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    upload: bool = True  # False: return the objects (``_puts``) for the driver to write (process-local fs)
    retries: int | None = None  # tries per storage operation on transient errors
    fmt: OutputFormat = field(default_factory=OutputFormat)

    @classmethod
    def from_spec(cls, spec: Any, upload: bool = True) -> "WriterSettings":
        return cls(output=spec.output, storage_options=spec.storage_options, upload=upload,
                   retries=spec.storage_retries, fmt=OutputFormat.from_spec(spec))


@dataclass
class ItemResult:
    """What the sampler decides for one item (one metadata row's sampler columns)."""

    height: int | None
    width: int | None
    status: str = "ok"
    error: str | None = None
    pixels: bytes | None = None  # raw uint8 HxWx3, encoded by the writer stage
    scheduler_config: str | None = None  # JSON: the exact config the call's scheduler was built from
    t_sample_s: float = 0.0
    sampled_at: float | None = None
    vae_redecoded_fp32: bool | None = None
    nsfw: bool | None = None  # null: the model has no safety checker

    def fail(self, error: str) -> None:
        self.status, self.error = "failed", error


def with_sampler_columns(batch: pa.Table, model: Any, worker: str, optimized_json: str, rows: list[dict],
                         results: list[ItemResult], extra: dict[str, list]) -> pa.Table:
    """``batch`` plus what a sampler adds: the effective ``scheduler``, each item's result (``_pixels``,
    status, error, timings, ...), the task's ``extra`` columns and the model's identity (same for every row)."""
    n = len(rows)
    out = _set_column(batch, "scheduler", [r["scheduler"] for r in rows], pa.string())
    per_item = {
        "height": [r.height for r in results], "width": [r.width for r in results],
        "_pixels": [r.pixels for r in results], "status": [r.status for r in results],
        "error": [r.error for r in results], "scheduler_config": [r.scheduler_config for r in results],
        "t_sample_s": [r.t_sample_s for r in results], "sampled_at": [r.sampled_at for r in results],
        "vae_redecoded_fp32": [r.vae_redecoded_fp32 for r in results], "nsfw": [r.nsfw for r in results],
    }
    identity = {
        "model": [model.model_id] * n,
        "model_revision": [model.revision] * n,
        "prediction_type": [model.prediction_type] * n,
        "scheduler_class": ["none" if model.dry_run else scheduler_class_name(r["scheduler"]) for r in rows],
        "dtype": [str(model.dtype).replace("torch.", "")] * n,
        "device": [str(model.device)] * n,
        "worker": [worker] * n,
        "optimizations": [optimized_json] * n,
        # which checker gave ``nsfw`` (null: none ran)
        "safety_checker": [getattr(model.safety_checker, "source", None)] * n,
        "safety_checker_revision": [getattr(model.safety_checker, "revision", None)] * n,
    }
    for name, values in {**per_item, **extra, **identity}.items():
        type_ = pa.binary() if name == "_pixels" else METADATA_SCHEMA.field(name).type
        out = _set_column(out, name, values, type_)
    return out


FLAT_IMAGE_ERROR = ("image: flat output, every pixel the same (NaN/inf during sampling, or a saturated "
                    "guidance_scale/dtype)")


def flat_image_error(image: np.ndarray) -> str | None:
    """Why a generated uint8 image must not be stored as ``ok``, or None: a flat image (every value equal) is
    what a NaN/inf decode becomes (``batch.sampling.txt2img.flatten_nonfinite``) and what saturated guidance
    gives; no diffusion sample of a real prompt is flat."""
    image = np.asarray(image)
    if image.size and image.min() == image.max():
        return f"{FLAT_IMAGE_ERROR}, got {int(image.flat[0])}"
    return None


def is_out_of_memory(err: BaseException) -> bool:
    """Whether a sampler call failed for lack of accelerator memory: ``torch.OutOfMemoryError`` (CUDA's
    allocator), or a ``RuntimeError`` saying "out of memory" (older torch, cuDNN/cuBLAS workspaces, MPS)."""
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    if oom_types and isinstance(err, oom_types):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def release_memory(device: str) -> None:
    """Hand cached allocator blocks back after an out-of-memory error, before a smaller retry."""
    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


class Sampler:
    """GPU stage: ``__init__`` loads one model replica, ``__call__(batch)`` generates a block's images.

    ``batch`` holds items, or whole GPU batches packed one per row (:func:`batch.plan.batches.pack_batches`,
    what the Ray pipeline sends). Items are split into sampler calls by their ``_batch`` column
    (:func:`batch.plan.batches.assign_batches`; computed here when absent): at most ``batch_size`` images
    sharing a bucket (shape, steps, guidance, scheduler). A call that raises marks only its own images
    failed; the rest go on. Items that arrive failed (an image that could not be fetched) pass through
    untouched. A call that runs out of accelerator memory is split in halves and retried, down to single
    images (:meth:`_sample_call`). An image that came out flat (NaN/inf, saturated) fails with
    :data:`FLAT_IMAGE_ERROR`, never ``ok``. The task (``batch.tasks``) says how to read its rows and how to
    sample one GPU batch. With ``model: none`` (the dry run, :mod:`batch.models.dryrun`) nothing is loaded or
    optimised and each image is :func:`batch.sampling.dryrun.dry_run_image` of its seed at the task's output
    size; everything around the call (batches, results, metadata columns) is unchanged.
    """

    def __init__(self, settings: SamplerSettings):
        if settings.num_threads:
            torch.set_num_threads(settings.num_threads)
        self.settings = settings
        self.task = TASKS[settings.task]
        self.model = load_model(settings.model, revision=settings.revision, dtype=settings.dtype,
                                device=torch_device(settings.device), allow_pickle=settings.allow_pickle,
                                variant=settings.variant, task=settings.task,
                                safety_checker=settings.safety_checker,
                                safety_checker_revision=settings.safety_checker_revision)
        self.opts = settings.optimizations
        self.compile_cache = None  # loaded before anything compiles; saved after calls that compiled
        if self.model.dry_run:  # nothing to optimise or compile
            self.optimized: dict[str, Any] = {"dry_run": True}
        else:
            if self.opts.compile_cache:
                self.compile_cache = CompileCache(self.opts.compile_cache, self.model.device,
                                                  settings.storage_options)
                cache_info = self.compile_cache.load()
            self.optimized = apply_optimizations(self.model, self.opts)
            if self.compile_cache is not None:
                self.optimized["compile_cache"] = cache_info
        self.optimized_json = json.dumps(self.optimized, sort_keys=True, default=str)
        self.worker = worker_id()

    def _safety(self, images: Any, results: list[ItemResult]) -> tuple[Any, list[bool]]:
        """``batch.models.safety`` policy (flag, blackout or drop): the images to keep and whether each is kept;
        each result's ``nsfw`` is the checker's verdict."""
        m, policy = self.model, self.settings.safety_policy
        if m.safety_checker is None:
            return images, [True] * len(results)
        if isinstance(images, np.ndarray):  # one shape: one checker call
            flags = m.safety_checker(images)
            images, keep = apply_policy(images, flags, policy)
        else:  # outputs of one batch may differ in size (upscales): one by one
            flags, keep, kept_images = [], [], []
            for img in images:
                flag = m.safety_checker(img[None])
                kept, ok = apply_policy(img[None], flag, policy)
                flags.append(flag[0])
                keep.append(ok[0])
                kept_images.append(kept[0])
            images = kept_images
        for res, flag in zip(results, flags):
            res.nsfw = flag
        return images, keep

    def _scheduler_json(self, name: str) -> str | None:
        """The JSON config a fresh scheduler ``name`` is built from (metadata); None in a dry run."""
        m = self.model
        if m.dry_run:
            return None
        return json.dumps(dict(make_scheduler(name, m.scheduler_config).config), sort_keys=True, default=str)

    def _generate(self, rows: list[dict], rescued: list[bool]) -> Any:
        """One GPU batch's images: the task's sampler with a fresh scheduler, or the dry-run pixels."""
        m, name = self.model, rows[0]["scheduler"]
        if m.dry_run:
            return dry_run_images([r["seed"] for r in rows], [self.task.output_size(r) for r in rows])
        return self.task.sample(m, rows, lambda: make_scheduler(name, m.scheduler_config), self.opts,
                                self.settings.batch_size, rescued)

    def _sample_call(self, rows: list[dict], results: list[ItemResult]) -> None:
        """One GPU batch: a fresh scheduler, the task's sampler, the safety policy; fills ``results``.

        Out of memory is a row-level event (:func:`is_out_of_memory`): the batch is split in halves and each
        half sampled on its own, down to single images; only an image that runs out of memory alone fails.
        Every image still comes from its own row's seed and parameters, so a split batch gives the same
        images as the whole batch would, within the batch-invariance tolerance of the kernels (on CPU fp32
        <= 1/255 per pixel, ``ENVIRONMENT.md``).
        """
        oom: str | None = None
        try:
            # a fresh scheduler per call (schedulers keep per-run state); its config is metadata
            cfg = self._scheduler_json(rows[0]["scheduler"])
            t0 = time.perf_counter()
            rescued: list[bool] = []
            images = self._generate(rows, rescued)
            flat = [flat_image_error(img) for img in images]  # before the safety policy (blackout is flat on purpose)
            images, keep = self._safety(images, results)
            dt = (time.perf_counter() - t0) / len(rows)
            done_at = time.time()
        except Exception as err:  # failures are data: this call's images fail, the job goes on
            if not is_out_of_memory(err):
                traceback.print_exc()
                for res in results:
                    res.fail(error_text(err))
                return
            oom = error_text(err)  # split outside the handler: the traceback's frames hold the batch's tensors
        if oom is not None:
            release_memory(self.settings.device)
            if len(rows) == 1:
                print(f"sampler: out of memory on a single image: {oom}", file=sys.stderr)
                results[0].fail(f"out of memory alone (batch 1): {oom}")
                return
            half = len(rows) // 2
            print(f"sampler: out of memory at batch {len(rows)}; retrying as {half} + {len(rows) - half}",
                  file=sys.stderr)
            self._sample_call(rows[:half], results[:half])
            self._sample_call(rows[half:], results[half:])
            return
        # raw pixels travel to the CPU stage; encoding happens there, not here
        for j, res in enumerate(results):
            res.t_sample_s, res.scheduler_config, res.sampled_at = dt, cfg, done_at
            res.vae_redecoded_fp32 = rescued[j] if rescued else None
            if flat[j]:
                res.fail(flat[j])
                continue
            if not keep[j]:
                res.fail(NSFW_ERROR)
                continue
            res.pixels = np.ascontiguousarray(images[j]).tobytes()
            res.height, res.width = int(images[j].shape[0]), int(images[j].shape[1])

    def __call__(self, batch: pa.Table) -> pa.Table:
        # 1. the items and their GPU batch numbers
        if PACKED in batch.column_names:  # whole GPU batches packed one per row (the Ray pipeline's input)
            batch = unpack_batches(batch)
        if "_batch" in batch.column_names:
            batch_ids = batch.column("_batch").to_pylist()
            batch = batch.drop_columns(["_batch"])
        else:
            batch_ids = assign_batches(batch, self.settings.batch_size).tolist()
        rows = self.task.read_rows(batch)
        for r in rows:
            if r["scheduler"] == "model":
                r["scheduler"] = self.model.default_scheduler
        # 2. one result per item: failed on arrival, failed by a check only the model can make, or to sample
        results = [ItemResult(height=r["height"], width=r["width"], status=r.get("status") or "ok",
                              error=r.get("error")) for r in rows]
        for r, res in zip(rows, results):
            problem = self.task.row_error(self.model, r) if res.status == "ok" else None
            if problem:
                res.fail(problem)
        # 3. one sampler call per GPU batch (consecutive items with one batch number share a bucket)
        for _, group in groupby(range(len(rows)), key=lambda i: batch_ids[i]):
            chunk = [i for i in group if results[i].status == "ok"]
            if chunk:
                self._sample_call([rows[i] for i in chunk], [results[i] for i in chunk])
        if self.compile_cache is not None:
            self.compile_cache.save_if_new()
        # 4. the metadata columns; the fetched input pixels stay behind
        out = batch.drop_columns(["_input"]) if "_input" in batch.column_names else batch
        extra = {} if self.model.dry_run else self.task.extra_columns(self.model, rows)  # no tokenizer in a dry run
        return with_sampler_columns(out, self.model, self.worker, self.optimized_json, rows, results, extra)


class EncodeWriter:
    """The encode/write stage as a long-lived worker: ``__call__`` is :func:`encode_and_write` with the
    settings given at construction. A pool of these keeps one warm process per writer instead of starting
    (and importing into) a fresh worker for each block, which cost seconds of CPU per block."""

    def __init__(self, settings: WriterSettings):
        self.settings = settings

    def __call__(self, batch: pa.Table) -> pa.Table:
        return encode_and_write(batch, self.settings)


def encode_and_write(batch: pa.Table, settings: WriterSettings) -> pa.Table:
    """CPU stage: encode each generated image, hash it and write it under the output prefix.

    The container (image files, WebDataset tar or Parquet shard) and the encoding (PNG, WebP, JPEG) are
    the spec's; see :mod:`batch.store.formats`. Each object is written whole before its row leaves this stage,
    and only the driver commits rows, so no committed row ever points at a partial object; transient storage
    errors are retried (``retries`` tries). With ``upload=False`` (process-local filesystems such as
    ``memory://``) the objects are returned in a ``_puts`` column for the driver to write instead.
    """
    s = settings
    return write_block(batch, s.output, s.storage_options, s.upload, s.fmt, retries=s.retries)

"""The job's stages as plain Python: a stateful sampler class and a CPU encode/write function.

``pipeline`` wires these into Ray; here they take and return ``pyarrow.Table`` batches and know nothing
of Ray, so they run (and are tested) in-process too. The sampler never encodes or uploads; the writer
never touches the model.
"""

from __future__ import annotations

import json
import time
import traceback
from itertools import groupby
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch

from batch.models.devices import torch_device, worker_id
from batch.plan.manifest import BUCKET_FIELDS, bucket_key
from batch.spec.config import Optimizations
from batch.models.load import load_model, make_scheduler, scheduler_class_name
from batch.store.schema import NSFW_ERROR
from batch.models.safety import apply_policy
from batch.sampling.txt2img import SamplingParams, truncation_warnings, txt2img
from batch.models.speed import apply_optimizations
from batch.store.schema import METADATA_SCHEMA
from batch.store.io import error_text
from batch.store.schema import set_column as _set_column

_SAMPLER_INPUTS = ["prompt", "negative_prompt", "seed", "height", "width", "num_inference_steps",
                   "guidance_scale", "scheduler"]


def assign_batches(items: pa.Table, batch_size: int) -> list[int]:
    """GPU batch number of each item: runs of equal bucket key, cut every ``batch_size`` items.

    Computed from the (bucket-sorted) items alone, so which images share a sampler call depends only
    on the manifest, the spec's defaults and ``batch_size``, never on blocks, actors or timing.
    """
    rows = items.select(list(BUCKET_FIELDS)).to_pylist()
    ids: list[int] = []
    batch, run_start = -1, 0
    for i, row in enumerate(rows):
        new_run = i == 0 or bucket_key(row) != bucket_key(rows[i - 1])
        if new_run:
            run_start = i
        if new_run or (i - run_start) % batch_size == 0:
            batch += 1
        ids.append(batch)
    return ids


PACKED = "_gpu_batch"  # one Ray row per GPU batch: list<struct> of the batch's items


def pack_batches(items: pa.Table) -> pa.Table:
    """One row per GPU batch (``_batch``, consecutive): a ``_gpu_batch`` list of the batch's item structs.

    Ray Data needs an integer ``batch_size`` when GPUs are requested, and with one it merges and slices
    blocks into calls of exactly that many rows. Packing makes a Ray row a whole GPU batch, so whatever
    Ray merges or slices, a sampler call only ever receives whole batches (``batch_size=1``: one each).
    """
    ids = items.column("_batch").to_pylist()
    starts = [i for i in range(len(ids)) if i == 0 or ids[i] != ids[i - 1]]
    offsets = pa.array(starts + [len(ids)], pa.int32())
    structs = items.combine_chunks().to_struct_array().combine_chunks()
    return pa.table({PACKED: pa.ListArray.from_arrays(offsets, structs)})


def unpack_batches(packed: pa.Table) -> pa.Table:
    """The items of packed GPU batches (:func:`pack_batches`), in order, ``_batch`` included."""
    lists = packed.column(PACKED).combine_chunks()
    return pa.Table.from_struct_array(lists.flatten())


def with_sampler_columns(batch: pa.Table, model: Any, worker: str, optimized_json: str, rows: list[dict],
                         per_image: dict[str, list]) -> pa.Table:
    """``batch`` plus what a sampler adds: the effective ``scheduler``, the ``per_image`` outputs
    (``_pixels``, status, error, timings, ...) and the model's identity (same for every row)."""
    n = len(rows)
    out = _set_column(batch, "scheduler", [r["scheduler"] for r in rows], pa.string())
    identity = {
        "model": [model.model_id] * n,
        "model_revision": [model.revision] * n,
        "prediction_type": [model.prediction_type] * n,
        "scheduler_class": [scheduler_class_name(r["scheduler"]) for r in rows],
        "dtype": [str(model.dtype).replace("torch.", "")] * n,
        "device": [str(model.device)] * n,
        "worker": [worker] * n,
        "optimizations": [optimized_json] * n,
    }
    for name, values in {**per_image, **identity}.items():
        type_ = pa.binary() if name == "_pixels" else METADATA_SCHEMA.field(name).type
        out = _set_column(out, name, values, type_)
    return out


class Sampler:
    """GPU stage: ``__init__`` loads one model replica, ``__call__(batch)`` generates a block's images.

    ``batch`` holds items, or whole GPU batches packed one per row (:func:`pack_batches`, what the Ray
    pipeline sends). Items are split into sampler calls by its ``_batch`` column (see :func:`assign_batches`; computed
    here when absent): at most ``batch_size`` images sharing a bucket (shape, steps, guidance,
    scheduler). A call that raises marks only its own images failed; the rest go on. Items that arrive
    failed (an image that could not be fetched) pass through untouched. Each task says how to read its
    rows (:meth:`_rows`) and how to sample one GPU batch (:meth:`_sample`).
    """

    task = "txt2img"

    def __init__(self, model: str, revision: str | None, dtype: str, device: str, batch_size: int,
                 allow_pickle: bool = False, variant: str | None = None, num_threads: int | None = None,
                 optimizations: dict[str, Any] | None = None, safety_policy: str = "flag"):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.batch_size = batch_size
        self.model = load_model(model, revision=revision, dtype=dtype, device=torch_device(device),
                                allow_pickle=allow_pickle, variant=variant, task=self.task)
        self.opts = Optimizations.model_validate(optimizations or {})
        self.optimized = apply_optimizations(self.model, self.opts)
        self.optimized_json = json.dumps(self.optimized, sort_keys=True, default=str)
        self.worker = worker_id()
        self.safety_policy = safety_policy

    # -- what each task defines ---------------------------------------------------------------------------
    def _rows(self, batch: pa.Table) -> list[dict]:
        """The block's items as dicts (the columns the sampler reads)."""
        raise NotImplementedError

    def _row_error(self, row: dict) -> str | None:
        """A per-item problem only the loaded model can see (e.g. a noise level above its maximum)."""
        return None

    def _sample(self, rows: list[dict], new_scheduler: Callable[[], Any], rescued: list[bool]) -> Any:
        """Images (uint8 HxWx3) of one GPU batch; may append one fp32-re-decode flag per image to ``rescued``."""
        raise NotImplementedError

    def _extra_columns(self, rows: list[dict]) -> dict[str, list]:
        return {}

    # -- the shared loop ----------------------------------------------------------------------------------
    def _safety(self, images: Any, chunk: list[int], nsfw: list[bool | None]) -> tuple[Any, list[bool]]:
        """``batch.models.safety`` policy (flag, blackout or drop): the images to keep and whether each is kept."""
        m = self.model
        if m.safety_checker is None:
            return images, [True] * len(chunk)
        if isinstance(images, np.ndarray):  # one shape: one checker call
            flags = m.safety_checker(images)
            images, keep = apply_policy(images, flags, self.safety_policy)
        else:  # outputs of one batch may differ in size (upscales): one by one
            flags, keep, kept_images = [], [], []
            for img in images:
                flag = m.safety_checker(img[None])
                kept, ok = apply_policy(img[None], flag, self.safety_policy)
                flags.append(flag[0])
                keep.append(ok[0])
                kept_images.append(kept[0])
            images = kept_images
        for j, i in enumerate(chunk):
            nsfw[i] = flags[j]
        return images, keep

    def __call__(self, batch: pa.Table) -> pa.Table:
        m = self.model
        if PACKED in batch.column_names:  # whole GPU batches packed one per row (the Ray pipeline's input)
            batch = unpack_batches(batch)
        if "_batch" in batch.column_names:
            batch_ids = batch.column("_batch").to_pylist()
            batch = batch.drop_columns(["_batch"])
        else:
            batch_ids = assign_batches(batch, self.batch_size)
        rows = self._rows(batch)
        for r in rows:
            if r["scheduler"] == "model":
                r["scheduler"] = m.default_scheduler
        n = len(rows)
        pixels: list[bytes | None] = [None] * n
        status = [r.get("status") or "ok" for r in rows]
        error = [r.get("error") for r in rows]
        t_sample, sched_cfg = [0.0] * n, [None] * n
        redecoded: list[bool | None] = [None] * n
        sampled_at: list[float | None] = [None] * n
        nsfw: list[bool | None] = [None] * n  # null: the model has no safety checker
        height, width = [r["height"] for r in rows], [r["width"] for r in rows]
        for i, r in enumerate(rows):
            problem = self._row_error(r) if status[i] == "ok" else None
            if problem:
                status[i], error[i] = "failed", problem

        # 1. one sampler call per GPU batch (consecutive items with one batch number share a bucket)
        for _, group in groupby(range(n), key=lambda i: batch_ids[i]):
            chunk = [i for i in group if status[i] == "ok"]
            if not chunk:
                continue
            name = rows[chunk[0]]["scheduler"]
            try:
                # 2. a fresh scheduler per call (schedulers keep per-run state); its config is metadata
                cfg = json.dumps(dict(make_scheduler(name, m.scheduler_config).config), sort_keys=True, default=str)
                t0 = time.perf_counter()
                rescued: list[bool] = []
                images = self._sample([rows[i] for i in chunk], lambda: make_scheduler(name, m.scheduler_config),
                                      rescued)
                images, keep = self._safety(images, chunk, nsfw)
                dt = (time.perf_counter() - t0) / len(chunk)
                done_at = time.time()
            except Exception as err:  # failures are data: this call's images fail, the job goes on
                traceback.print_exc()
                for i in chunk:
                    status[i], error[i] = "failed", error_text(err)
                continue
            # 3. raw pixels travel to the CPU stage; encoding happens there, not here
            for j, i in enumerate(chunk):
                t_sample[i], sched_cfg[i], sampled_at[i] = dt, cfg, done_at
                redecoded[i] = rescued[j] if rescued else None
                if not keep[j]:
                    status[i], error[i] = "failed", NSFW_ERROR
                    continue
                pixels[i] = np.ascontiguousarray(images[j]).tobytes()
                height[i], width[i] = int(images[j].shape[0]), int(images[j].shape[1])

        out = batch.drop_columns(["_input"]) if "_input" in batch.column_names else batch
        return with_sampler_columns(out, m, self.worker, self.optimized_json, rows, {
            "height": height, "width": width, "_pixels": pixels, "status": status, "error": error,
            "scheduler_config": sched_cfg, "t_sample_s": t_sample, "sampled_at": sampled_at,
            "vae_redecoded_fp32": redecoded, "nsfw": nsfw, **self._extra_columns(rows)})


class Txt2ImgSampler(Sampler):
    """GPU stage of ``task: txt2img`` (:func:`batch.sampling.txt2img.txt2img`, diffusers' ``StableDiffusionPipeline``
    math); the images of one GPU batch share a bucket (shape, steps, guidance, scheduler)."""

    task = "txt2img"

    def _rows(self, batch: pa.Table) -> list[dict]:
        return batch.select(_SAMPLER_INPUTS).to_pylist()

    def _sample(self, rows, new_scheduler, rescued):
        h, w, steps, g, _ = bucket_key(rows[0])
        return txt2img(self.model, new_scheduler(), [r["prompt"] for r in rows],
                       [r["negative_prompt"] for r in rows], [r["seed"] for r in rows],
                       SamplingParams(height=h, width=w, num_inference_steps=steps, guidance_scale=g),
                       nan_fallback=self.opts.nan_fallback, rescued=rescued)

    def _extra_columns(self, rows):
        # texts longer than the encoder's window are cut (as diffusers does); say so per row
        return {"warnings": [truncation_warnings(self.model.tokenizer, {"prompt": r["prompt"],
                                                                         "negative_prompt": r["negative_prompt"]})
                             for r in rows]}


class EncodeWriter:
    """The encode/write stage as a long-lived worker: ``__call__`` is :func:`encode_and_write` with the
    settings given at construction. A pool of these keeps one warm process per writer instead of starting
    (and importing into) a fresh worker for each block, which cost seconds of CPU per block."""

    def __init__(self, **settings: Any):
        self.settings = settings

    def __call__(self, batch: pa.Table) -> pa.Table:
        return encode_and_write(batch, **self.settings)


def encode_and_write(batch: pa.Table, output: str, storage_options: dict[str, Any], upload: bool = True,
                     retries: int | None = None, output_format: str = "files", image_format: str = "png",
                     webp_lossless: bool = True, jpeg_quality: int = 95) -> pa.Table:
    """CPU stage: encode each generated image, hash it and write it under the output prefix.

    The container (image files, WebDataset tar or Parquet shard) and the encoding (PNG, WebP, JPEG) are
    the spec's; see :mod:`batch.store.formats`. Each object is written whole before its row leaves this stage,
    and only the driver commits rows, so no committed row ever points at a partial object; transient storage
    errors are retried (``retries`` tries). With ``upload=False`` (process-local filesystems such as
    ``memory://``) the objects are returned in a ``_puts`` column for the driver to write instead.
    """
    from batch.store.formats import OutputFormat, write_block

    fmt = OutputFormat(output_format, image_format, webp_lossless, jpeg_quality)
    return write_block(batch, output, storage_options, upload, fmt, retries=retries)

"""Stages of the image tasks as plain Python (``pipeline`` wires them into Ray; no Ray here).

    items -> fetch_inputs (CPU task) -> VariationSampler | UpscaleSampler (GPU actor) -> encode_and_write

:func:`fetch_inputs` reads and normalises each item's ``image_uri`` (:func:`batch.images.fetch_image`)
and passes raw RGB pixels on in an ``_input`` column; an image that cannot be used marks its item
``failed`` with ``image_uri: <reason>``. The samplers never read storage: they skip failed items (passed
through untouched) and return raw ``_pixels`` plus the metadata columns of ``Txt2ImgSampler``; the upscale
sampler also sets each item's ``height``/``width`` to its real output size (4x the input).
"""

from __future__ import annotations

import json
import os
import socket
import time
import traceback
from itertools import groupby
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch

from batch.config import Optimizations
from batch.images import ImageError, fetch_image
from batch.models import load_model, make_scheduler
from batch.safety import NSFW_ERROR, apply_policy
from batch.sampling import SamplingParams
from batch.speed import apply_optimizations
from batch.stages import _error_text, _set_column, assign_batches, with_sampler_columns


def fetch_inputs(batch: pa.Table, storage_options: dict[str, Any], max_pixels: int,
                 allowed: list[str] | None = None) -> pa.Table:
    """CPU stage: fetch each item's input image once per distinct URI in the batch; add ``_input`` (raw
    uint8 RGB bytes), ``input_sha256``/``input_width``/``input_height``/``input_mode``, ``status``, ``error``."""
    uris = batch.column("image_uri").to_pylist()
    cache: dict[str, tuple[bytes | None, dict[str, Any], str | None]] = {}
    for uri in dict.fromkeys(uris):
        try:
            rgb, info = fetch_image(uri, storage_options, max_pixels, allowed)
            cache[uri] = (np.ascontiguousarray(rgb).tobytes(), info, None)
        except ImageError as err:
            cache[uri] = (None, {}, f"image_uri: {err}")
        except Exception as err:  # anything unexpected still fails only this image
            cache[uri] = (None, {}, f"image_uri: {_error_text(err)}")
    cols: dict[str, list] = {k: [] for k in ("_input", "input_sha256", "input_width", "input_height", "input_mode",
                                             "status", "error")}
    for uri in uris:
        data, info, err = cache[uri]
        cols["_input"].append(data)
        for k in ("input_sha256", "input_width", "input_height", "input_mode"):
            cols[k].append(info.get(k))
        cols["status"].append("ok" if err is None else "failed")
        cols["error"].append(err)
    out = batch
    for name, type_ in (("_input", pa.binary()), ("input_sha256", pa.string()), ("input_width", pa.int32()),
                        ("input_height", pa.int32()), ("input_mode", pa.string()), ("status", pa.string()),
                        ("error", pa.string())):
        out = _set_column(out, name, cols[name], type_)
    return out


class _ImageSampler:
    """Shared shape of the image samplers: load in ``__init__``, split a block into GPU batches by
    ``_batch``, run :meth:`_sample` on each batch's ok items, attach the metadata columns."""

    task = ""

    def __init__(self, model: str, revision: str | None, dtype: str, device: str, batch_size: int,
                 allow_pickle: bool = False, variant: str | None = None, num_threads: int | None = None,
                 optimizations: dict[str, Any] | None = None, safety_policy: str = "flag"):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.batch_size = batch_size
        self.model = load_model(model, revision=revision, dtype=dtype, device=device, allow_pickle=allow_pickle,
                                variant=variant, task=self.task)
        self.safety_policy = safety_policy
        self.opts = Optimizations.model_validate(optimizations or {})
        self.optimized_json = json.dumps(apply_optimizations(self.model, self.opts), sort_keys=True, default=str)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def _row_error(self, row: dict) -> str | None:
        return None

    def _sample(self, rows: list[dict], inputs: list[np.ndarray], scheduler_name: str,
                new_scheduler: Callable[[], Any], rescued: list[bool]) -> list[np.ndarray]:
        """Images of one GPU batch; may append one fp32-re-decode flag per image to ``rescued``."""
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> pa.Table:
        m = self.model
        if "_batch" in batch.column_names:
            batch_ids = batch.column("_batch").to_pylist()
            batch = batch.drop_columns(["_batch"])
        else:
            batch_ids = assign_batches(batch, self.batch_size)
        rows = batch.drop_columns([c for c in batch.column_names if c.startswith("_") and c != "_input"]).to_pylist()
        n = len(rows)
        for r in rows:
            if r["scheduler"] == "model":
                r["scheduler"] = m.default_scheduler
        pixels: list[bytes | None] = [None] * n
        status = [r.get("status") or "ok" for r in rows]
        error = [r.get("error") for r in rows]
        t_sample, sched_cfg = [0.0] * n, [None] * n
        redecoded: list[bool | None] = [None] * n
        sampled_at: list[float | None] = [None] * n
        nsfw: list[bool | None] = [None] * n  # null: the model has no safety checker
        height, width = [r["height"] for r in rows], [r["width"] for r in rows]
        for i, r in enumerate(rows):  # per-row checks that need the model
            problem = self._row_error(r) if status[i] == "ok" else None
            if problem:
                status[i], error[i] = "failed", problem

        for _, group in groupby(range(n), key=lambda i: batch_ids[i]):
            chunk = [i for i in group if status[i] == "ok"]  # failed fetches pass through untouched
            if not chunk:
                continue
            name = rows[chunk[0]]["scheduler"]
            try:
                inputs = [np.frombuffer(rows[i]["_input"], dtype=np.uint8).reshape(rows[i]["input_height"],
                                                                                     rows[i]["input_width"], 3)
                          for i in chunk]
                cfg = json.dumps(dict(make_scheduler(name, m.scheduler_config).config), sort_keys=True, default=str)
                t0 = time.perf_counter()
                rescued: list[bool] = []
                images = self._sample([rows[i] for i in chunk], inputs, name,
                                      lambda: make_scheduler(name, m.scheduler_config), rescued)
                keep = [True] * len(chunk)
                if m.safety_checker is not None:  # batch.safety: flag, blackout or drop, as for txt2img
                    keep = []
                    for j, i in enumerate(chunk):  # one by one: upscales in one batch may differ in size
                        flag = m.safety_checker(images[j][None])
                        kept, ok = apply_policy(images[j][None], flag, self.safety_policy)
                        images[j], nsfw[i] = kept[0], flag[0]
                        keep.append(ok[0])
                dt = (time.perf_counter() - t0) / len(chunk)
                done_at = time.time()
            except Exception as err:  # failures are data: this call's images fail, the job goes on
                traceback.print_exc()
                for i in chunk:
                    status[i], error[i] = "failed", _error_text(err)
                continue
            for j, i in enumerate(chunk):
                if not keep[j]:
                    status[i], error[i] = "failed", NSFW_ERROR
                    continue
                pixels[i] = np.ascontiguousarray(images[j]).tobytes()
                height[i], width[i] = int(images[j].shape[0]), int(images[j].shape[1])
                t_sample[i], sched_cfg[i] = dt, cfg
                sampled_at[i] = done_at
                redecoded[i] = rescued[j] if rescued else None

        out = batch.drop_columns(["_input"]) if "_input" in batch.column_names else batch
        return with_sampler_columns(out, m, self.worker, self.optimized_json, rows, {
            "height": height, "width": width, "_pixels": pixels, "status": status, "error": error,
            "scheduler_config": sched_cfg, "t_sample_s": t_sample, "sampled_at": sampled_at,
            "vae_redecoded_fp32": redecoded, "nsfw": nsfw})


class VariationSampler(_ImageSampler):
    """GPU stage of ``task: variation`` (``StableDiffusionImageVariationPipeline`` math, see
    ``batch.image_sampling``); the items of one GPU batch share output size, steps, guidance, scheduler."""

    task = "variation"

    def _sample(self, rows, inputs, scheduler_name, new_scheduler, rescued):
        from batch.image_sampling import preprocess_for_variation, variation

        how = {r["preprocessing"] for r in rows}
        if len(how) != 1:
            raise ValueError(f"one GPU batch mixes preprocessing modes {sorted(how)}")
        r0 = rows[0]
        pixel_values = preprocess_for_variation(self.model, inputs, how.pop())
        return list(variation(self.model, new_scheduler(), pixel_values, [r["seed"] for r in rows],
                              SamplingParams(height=r0["height"], width=r0["width"],
                                             num_inference_steps=r0["num_inference_steps"],
                                             guidance_scale=r0["guidance_scale"]),
                              nan_fallback=self.opts.nan_fallback, rescued=rescued))


class UpscaleSampler(_ImageSampler):
    """GPU stage of ``task: upscale`` (``StableDiffusionUpscalePipeline`` math, tiled beyond
    ``tile_size``; see ``batch.image_sampling``). At most ``batch_size`` tiles go through the UNet at once."""

    task = "upscale"

    def _row_error(self, row):
        limit = self.model.max_noise_level if self.model.max_noise_level is not None else 350
        if row["noise_level"] > limit:
            return f"noise_level: above the model's max_noise_level={limit}, got {row['noise_level']}"
        return None

    def _sample(self, rows, inputs, scheduler_name, new_scheduler, rescued):
        from batch.image_sampling import UpscaleRequest, upscale

        m, r0 = self.model, rows[0]
        requests = [UpscaleRequest(image=img, prompt=r["prompt"] or "", negative_prompt=r["negative_prompt"],
                                   noise_level=int(r["noise_level"]), seed=int(r["seed"]))
                    for r, img in zip(rows, inputs)]
        return upscale(m, new_scheduler, requests, num_inference_steps=r0["num_inference_steps"],
                       guidance_scale=r0["guidance_scale"], tile_size=r0["tile_size"],
                       tile_overlap=r0["tile_overlap"], tiles_per_call=self.batch_size)


SAMPLER_FOR_TASK = {"variation": VariationSampler, "upscale": UpscaleSampler}

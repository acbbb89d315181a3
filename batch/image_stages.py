"""Stages of the image tasks as plain Python (``pipeline`` wires them into Ray; no Ray here).

    items -> fetch_inputs (CPU task) -> VariationSampler | UpscaleSampler (GPU actor) -> encode_and_write

:func:`fetch_inputs` reads and normalises each item's ``image_uri`` (:func:`batch.images.fetch_image`)
and passes raw RGB pixels on in an ``_input`` column; an image that cannot be used marks its item
``failed`` with ``image_uri: <reason>``. The samplers never read storage: they skip failed items (passed
through untouched) and return raw ``_pixels`` plus the metadata columns (the shared loop of
:class:`batch.stages.Sampler`); the upscale sampler also sets each item's ``height``/``width`` to its real output size (4x the input).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from batch.images import ImageError, fetch_image
from batch.sampling import SamplingParams
from batch.stages import Sampler
from batch.storage import error_text
from batch.storage import set_column as _set_column


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
            cache[uri] = (None, {}, f"image_uri: {error_text(err)}")
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


class _ImageSampler(Sampler):
    """The image tasks' rows: every column but the internal ones, with the fetched ``_input`` pixels
    (decoded per GPU batch by :meth:`_inputs`)."""

    def _rows(self, batch: pa.Table) -> list[dict]:
        return batch.drop_columns([c for c in batch.column_names if c.startswith("_") and c != "_input"]).to_pylist()

    @staticmethod
    def _inputs(rows: list[dict]) -> list[np.ndarray]:
        return [np.frombuffer(r["_input"], dtype=np.uint8).reshape(r["input_height"], r["input_width"], 3)
                for r in rows]


class VariationSampler(_ImageSampler):
    """GPU stage of ``task: variation`` (``StableDiffusionImageVariationPipeline`` math, see
    ``batch.image_sampling``); the items of one GPU batch share output size, steps, guidance, scheduler."""

    task = "variation"

    def _sample(self, rows, new_scheduler, rescued):
        from batch.image_sampling import preprocess_for_variation, variation

        how = {r["preprocessing"] for r in rows}
        if len(how) != 1:
            raise ValueError(f"one GPU batch mixes preprocessing modes {sorted(how)}")
        r0 = rows[0]
        pixel_values = preprocess_for_variation(self.model, self._inputs(rows), how.pop())
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

    def _sample(self, rows, new_scheduler, rescued):
        from batch.image_sampling import UpscaleRequest, upscale

        m, r0 = self.model, rows[0]
        requests = [UpscaleRequest(image=img, prompt=r["prompt"] or "", negative_prompt=r["negative_prompt"],
                                   noise_level=int(r["noise_level"]), seed=int(r["seed"]))
                    for r, img in zip(rows, self._inputs(rows))]
        return upscale(m, new_scheduler, requests, num_inference_steps=r0["num_inference_steps"],
                       guidance_scale=r0["guidance_scale"], tile_size=r0["tile_size"],
                       tile_overlap=r0["tile_overlap"], tiles_per_call=self.batch_size,
                       nan_fallback=self.opts.nan_fallback, rescued=rescued)


SAMPLER_FOR_TASK = {"variation": VariationSampler, "upscale": UpscaleSampler}

"""COCO 2017 captions: reading the annotation file, the seeded prompt sample, and the generation manifest."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

from batch.plan.seeds import derive_row_seed
from batch.spec.base import SpecError


def read_coco_captions(uri: str, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """The caption annotations of a COCO ``captions_*.json`` (``{"images": [...], "annotations": [{"id",
    "image_id", "caption"}, ...]}``) as a table (annotation_id, image_id, file_name, caption), sorted by
    annotation id; captions are whitespace-normalised (COCO has stray newlines and trailing spaces)."""
    import fsspec

    try:
        with fsspec.open(uri, "rb", **(storage_options or {})) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise SpecError(f"COCO captions file not found: {uri}") from None
    except json.JSONDecodeError as err:
        raise SpecError(f"COCO captions file {uri} is not JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise SpecError(f"{uri} is not a COCO captions file: no 'annotations' list")
    files = {im.get("id"): im.get("file_name") for im in data.get("images") or [] if isinstance(im, dict)}
    rows = []
    for k, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or not isinstance(a.get("caption"), str) or a.get("id") is None:
            raise SpecError(f"{uri}: annotations[{k}] needs an 'id' and a 'caption' string")
        caption = " ".join(a["caption"].split())
        if caption:
            rows.append({"annotation_id": int(a["id"]), "image_id": int(a.get("image_id", -1)),
                         "file_name": files.get(a.get("image_id")), "caption": caption})
    rows.sort(key=lambda r: r["annotation_id"])
    if len({r["annotation_id"] for r in rows}) != len(rows):
        raise SpecError(f"{uri}: annotation ids are not unique")
    return pa.Table.from_pylist(rows, schema=pa.schema([("annotation_id", pa.int64()), ("image_id", pa.int64()),
                                                        ("file_name", pa.string()), ("caption", pa.string())]))


def sample_prompts(captions: pa.Table, n: int, seed: int) -> pa.Table:
    """A documented, reproducible sample of ``n`` captions, each with its own image seed.

    1. the caption annotations sorted by annotation id (:func:`read_coco_captions`);
    2. the first ``n`` of ``numpy.random.default_rng(seed).permutation(len)`` (PCG64): ``n`` distinct
       annotations (an image may contribute several of its captions, as in the model cards' "10,000 random
       COCO2017 validation prompts"), in the drawn order; so a smaller sample (``--limit``) is exactly the
       head of a larger one with the same seed, prompts and image seeds alike;
    3. each prompt's image seed is ``derive_row_seed(seed, "coco-<annotation_id>")`` (:mod:`batch.plan.seeds`),
       the same at every guidance scale and for every model: scales and models are compared paired.
    """
    if n > captions.num_rows:
        raise SpecError(f"num_prompts={n} but the captions file has only {captions.num_rows} captions")
    idx = np.random.default_rng(seed).permutation(captions.num_rows)[:n]
    out = captions.take(pa.array(idx))
    seeds = [derive_row_seed(seed, f"coco-{a}") for a in out.column("annotation_id").to_pylist()]
    return out.append_column("seed", pa.array(seeds, pa.int64()))


def build_manifest(prompts: pa.Table, scales: list[float], model_name: str) -> pa.Table:
    """One manifest row per (prompt, scale): ``id`` = ``coco-<annotation_id>-g<scale>``, the prompt's seed,
    ``guidance_scale``; the COCO ids and the model name ride along as carried columns."""
    rows = []
    for p in prompts.to_pylist():
        for g in scales:
            rows.append({"id": f"coco-{p['annotation_id']}-g{g:g}", "prompt": p["caption"], "seed": p["seed"],
                         "guidance_scale": float(g), "coco_annotation_id": p["annotation_id"],
                         "coco_image_id": p["image_id"], "eval_model": model_name})
    return pa.Table.from_pylist(rows, schema=pa.schema([
        ("id", pa.string()), ("prompt", pa.string()), ("seed", pa.int64()), ("guidance_scale", pa.float64()),
        ("coco_annotation_id", pa.int64()), ("coco_image_id", pa.int64()), ("eval_model", pa.string())]))

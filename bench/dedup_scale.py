"""Deduplication cost (issue 15, 4b): building the index over N earlier images and splitting N work items.

Writes an earlier run of N ok images (txt2img metadata rows with realistic prompts, seeds and URIs) in parts
of ``--rows-per-part`` (250,000 is what ``sdbatch compact`` leaves), then times, in this process:

* ``build``: :meth:`batch.plan.dedup.DedupIndex.build` (list and read the key columns of every part, hash,
  sort), with the index's bytes and the process's resident memory before and after;
* ``split``: :meth:`DedupIndex.split` of N work items, of which ``--new`` fraction are new prompts (generated)
  and the rest equal to earlier images (skipped: read back the parts holding them, verify, copy uri/sha256).

    PYTHONPATH=. .venv/bin/python bench/dedup_scale.py [--rows 1000000] [--rows-per-part 250000] [--new 0.1]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

import numpy as np
import pyarrow as pa
from common import emit

from batch.models.tiny import TINY_REVISION
from batch.plan.dedup import DedupIndex, find_sources
from batch.store.commit import RUN_RECORD, part_key
from batch.store.io import open_output
from batch.store.schema import ITEM_SCHEMA, conform


def items(start: int, stop: int, new_from: int) -> pa.Table:
    """Work items ``start..stop`` (one image per row); rows from ``new_from`` on have a prompt never seen."""
    k = np.arange(start, stop)
    prompts = [f"a photograph of object {i} on a table, soft light, 35mm" if i < new_from else f"a new prompt {i}"
               for i in k]
    n = len(k)
    return pa.table({
        "id": [f"row-{i:08d}" for i in k], "manifest_row": pa.array(k, pa.int64()),
        "image_index": pa.array(np.zeros(n, np.int32)), "prompt": prompts,
        "negative_prompt": pa.nulls(n, pa.string()), "guidance_scale": pa.array(np.full(n, 7.5)),
        "num_inference_steps": pa.array(np.full(n, 50, np.int32)), "height": pa.array(np.full(n, 512, np.int32)),
        "width": pa.array(np.full(n, 512, np.int32)), "num_images": pa.array(np.ones(n, np.int32)),
        "scheduler": ["pndm"] * n, "row_seed": pa.array(k.astype(np.uint64) * 7919),
        "seed": pa.array(k.astype(np.uint64) * 7919), "seed_source": ["derived"] * n,
    }).cast(ITEM_SCHEMA)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """The process's resident memory now (Linux /proc)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rows-per-part", type=int, default=250_000)
    ap.add_argument("--new", type=float, default=0.1, help="fraction of the work items that are new")
    args = ap.parse_args()
    n, per = args.rows, args.rows_per_part

    with tempfile.TemporaryDirectory() as tmp:
        out = open_output(f"{tmp}/earlier")
        out.put_json(RUN_RECORD, {"run_id": "earlier"})
        attempt = "20260101T000000000000Z-bench0"
        t0 = time.perf_counter()
        for p, start in enumerate(range(0, n, per)):
            t = items(start, min(n, start + per), new_from=n)
            m = t.num_rows
            t = t.append_column("status", pa.array(["ok"] * m)).append_column(
                "uri", pa.array([f"s3://bucket/earlier/images/row-{i:08d}-0123456789abcdef/0.png"
                                 for i in range(start, start + m)])).append_column(
                "sha256", pa.array(["0" * 64] * m)).append_column(
                "model", pa.array(["CompVis/stable-diffusion-v1-4"] * m)).append_column(
                "model_revision", pa.array([TINY_REVISION] * m)).append_column("attempt", pa.array([attempt] * m))
            out.put_parquet(part_key(attempt, p), conform(t, pa.schema([])))
        write_s = time.perf_counter() - t0
        work = items(0, n, new_from=int(n * (1 - args.new)))

        rss0 = rss_mb()
        t0 = time.perf_counter()
        index = DedupIndex.build(find_sources([f"{tmp}/earlier"]), "txt2img")
        build_s = time.perf_counter() - t0
        rss_build = rss_mb()
        t0 = time.perf_counter()
        todo, skipped = index.split(work, "CompVis/stable-diffusion-v1-4", TINY_REVISION, "pndm")
        split_s = time.perf_counter() - t0
        expected_new = n - int(n * (1 - args.new))
        assert todo.num_rows == expected_new and skipped.num_rows == n - expected_new, (todo.num_rows, skipped.num_rows)
        emit({"bench": "dedup_scale", "earlier_images": n, "rows_per_part": per, "work_items": n,
              "new_fraction": args.new, "index_bytes": index.nbytes, "index_bytes_per_image": index.nbytes / n,
              "build_s": round(build_s, 2), "build_us_per_row": round(build_s / n * 1e6, 2),
              "rss_before_mb": round(rss0, 1), "rss_after_build_mb": round(rss_build, 1),
              "split_s": round(split_s, 2), "split_us_per_item": round(split_s / n * 1e6, 2),
              "rss_after_split_mb": round(rss_mb(), 1), "peak_rss_mb": round(peak_rss_mb(), 1),
              "write_parts_s": round(write_s, 2)})


if __name__ == "__main__":
    main()

"""Resume scan: time to decide what is done in an output holding N committed metadata rows.

Writes N rows in parts of ``--rows-per-part`` (as a long run with ``commit_every`` would), then times what
a resuming driver does before generating anything: list and read every part, keep the latest record per
image (:func:`batch.store.commit.latest_rows`), and select the missing work from a plan of N + 1,000 items
(:func:`batch.store.commit.select_work`). Then the same after ``compact``.

    .venv/bin/python bench/resume_scan.py [--rows 100000] [--rows-per-part 256] [--output DIR_OR_URI]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import pyarrow as pa
from common import emit

from batch.store.commit import select_work
from batch.store.schema import ITEM_SCHEMA
from batch.plan.manifest import Plan
from batch.store.commit import compact, latest_rows, metadata_parts, part_key, read_parts
from batch.store.schema import conform
from batch.store.io import open_output


def scan(out, plan: Plan) -> tuple[float, int]:
    t0 = time.perf_counter()
    committed = latest_rows(read_parts(out))
    items, _ = select_work(plan, committed, "run")
    return time.perf_counter() - t0, items.num_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--rows-per-part", type=int, default=256)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out = open_output(args.output or f"{tmp}/run")
        n, per = args.rows, args.rows_per_part
        attempt = "20260101T000000000000Z-bench0"
        t0 = time.perf_counter()
        for p, start in enumerate(range(0, n, per)):
            k = range(start, min(n, start + per))
            table = pa.table({"id": [f"row-{i:07d}" for i in k], "manifest_row": pa.array(k, pa.int64()),
                              "image_index": pa.array([0] * len(k), pa.int32()), "status": ["ok"] * len(k),
                              "prompt": [f"a prompt of ordinary length, number {i}" for i in k],
                              "uri": [f"s3://bucket/run/images/row-{i:07d}-0123456789abcdef/0.png" for i in k],
                              "sha256": ["0" * 64] * len(k), "attempt": [attempt] * len(k)})
            out.put_parquet(part_key(attempt, p), conform(table, pa.schema([])))
        write_s = time.perf_counter() - t0
        total = n + 1000
        plan_items = pa.Table.from_pylist(
            [{"id": f"row-{i:07d}", "manifest_row": i, "image_index": 0} for i in range(total)], schema=ITEM_SCHEMA)
        plan = Plan(items=plan_items, failed=pa.Table.from_pylist([], schema=ITEM_SCHEMA.append(
            pa.field("error", pa.string()))), carried=[], num_rows=total)
        parts = len(metadata_parts(out))
        scan_s, todo = scan(out, plan)
        assert todo == 1000, todo
        compact(out)
        compact_parts = len(metadata_parts(out))
        scan_compact_s, todo = scan(out, plan)
        assert todo == 1000, todo
        emit({"bench": "resume_scan", "rows": n, "parts": parts, "scan_s": round(scan_s, 3),
              "parts_after_compact": compact_parts, "scan_after_compact_s": round(scan_compact_s, 3),
              "write_parts_s": round(write_s, 2), "storage": args.output or "local tmp"})


if __name__ == "__main__":
    main()

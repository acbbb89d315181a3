"""Resume decision at scale: seconds and peak RSS to decide what is done in an output of N committed rows.

Writes N metadata records (``--rows``, default 10M) in parts of ``--rows-per-part`` (250,000, what
``compact`` leaves; a long uncompacted run has more, smaller parts), 1% of them failed, then in a child process
(its own peak RSS) does what a resuming driver does (:class:`batch.store.done.DoneIndex`):

1. ``read``: every part's key columns, latest record per key;
2. ``select``: the work left in a plan of N + 65,536 items, chunk by chunk (65,536 items per chunk);
3. ``tally``: the run's counts (failure reasons read back for the failed records).

    .venv/bin/python bench/resume_scale.py [--rows 10000000] [--dir /tmp/resume-scale]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write_parts(d: Path, rows: int, per_part: int) -> None:
    """Committed parts of ``rows`` single-image records (manifest rows 0..rows-1), 1% failed."""
    meta = d / "metadata"
    meta.mkdir(parents=True, exist_ok=True)
    for n, start in enumerate(range(0, rows, per_part)):
        k = min(per_part, rows - start)
        r = np.arange(start, start + k, dtype=np.int64)
        failed = (r % 100) == 7
        t = pa.table({"manifest_row": r, "image_index": np.zeros(k, np.int32), "num_images": np.ones(k, np.int32),
                      "status": np.where(failed, "failed", "ok"),
                      "error": pa.array(np.where(failed, "RuntimeError: boom", None).tolist(), pa.string()),
                      "vae_redecoded_fp32": np.zeros(k, bool),
                      "attempt": ["20261202T000000000000Z-aaaaaa"] * k})
        pq.write_table(t, meta / f"part-20261202T000000000000Z-aaaaaa-{n:06d}.parquet")
    (d / "run.json").write_text(json.dumps({"rows": rows}))


def child(d: str, rows: int) -> None:
    from batch.store.done import DoneIndex
    from batch.store.io import open_output

    out = open_output(d)
    t0 = time.perf_counter()
    index = DoneIndex.read(out)
    t1 = time.perf_counter()
    todo = 0
    chunk = 65536
    for start in range(0, rows + chunk, chunk):
        r = pa.array(np.arange(start, start + chunk, dtype=np.int64))
        items = pa.table({"manifest_row": r, "image_index": pa.array(np.zeros(chunk, np.int32))})
        kept, _ = index.select(items, pa.table({"manifest_row": pa.array([], pa.int64())}), "run")
        todo += kept.num_rows
    t2 = time.perf_counter()
    counts = index.tally(out, rows, rows + chunk)
    t3 = time.perf_counter()
    print(json.dumps({"rows": rows, "records": index.records, "read_s": round(t1 - t0, 2),
                      "select_s": round(t2 - t1, 2), "tally_s": round(t3 - t2, 2), "items_left": todo,
                      "rows_failed": counts["rows_failed"],
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--rows-per-part", type=int, default=250_000)
    ap.add_argument("--dir", default="/tmp/resume-scale")
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.rows)
    from common import emit

    d = Path(args.dir) / f"out-{args.rows}-{args.rows_per_part}"
    if not (d / "run.json").exists():
        t = time.perf_counter()
        write_parts(d, args.rows, args.rows_per_part)
        print(f"wrote {args.rows} records in {time.perf_counter() - t:.0f}s", file=sys.stderr)
    out = subprocess.run([sys.executable, __file__, "--child", str(d), "--rows", str(args.rows)], capture_output=True,
                         text=True, check=True, env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(r, file=sys.stderr)
    emit({"bench": "resume_scale", "rows_per_part": args.rows_per_part, **r})


if __name__ == "__main__":
    main()

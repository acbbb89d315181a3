"""Plan and validate manifests of 1M, 10M (100M) rows: rows/s and the driver's peak RSS.

For each size a child process (so each peak RSS is its own) does what a driver does before and while it
feeds the pipeline, with no model and no Ray:

1. ``scan``: :func:`batch.plan.sources.open_manifest` + :func:`batch.plan.manifest.scan_manifest` (columns,
   digest, row count, duplicate ids: one pass, one chunk in memory);
2. ``plan``: :func:`batch.plan.manifest.iter_plan` over every chunk (vectorised validation, derived seeds,
   expansion, bucket sort, GPU batch numbers), dropping each chunk's plan as the job's waves do.

The manifest is ``id, prompt, guidance_scale`` (the issue's shape; seeds derived from ids), written once per
size in row groups of 65,536 under ``--dir``. Sizes whose file would not fit ``--dir`` are skipped.

    .venv/bin/python bench/plan_scale.py [--rows 1000000 10000000] [--dir /tmp/plan-scale] [--bad 0.001]
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


def write_manifest(path: Path, rows: int, bad: float, seeded: bool = False) -> None:
    """``rows`` rows: ids ``row-N``, prompts of ~40 chars, guidance in 1..9; a ``bad`` fraction of rows with a
    NaN guidance (to exercise the per-row path), one duplicated id pair; ``seeded``: a ``seed`` column too
    (no seed derivation)."""
    rng = np.random.default_rng(0)
    words = np.array(["a", "photo", "of", "cat", "dog", "castle", "in", "the", "rain", "at", "dusk", "oil"])
    fields = [("id", pa.string()), ("prompt", pa.string()), ("guidance_scale", pa.float64())]
    with pq.ParquetWriter(path, pa.schema(fields + ([("seed", pa.int64())] if seeded else []))) as w:
        for start in range(0, rows, 65536):
            n = min(65536, rows - start)
            ids = [f"row-{i}" for i in range(start, start + n)]
            if start == 0 and n > 2:
                ids[1] = ids[0]
            picks = rng.integers(0, len(words), size=(n, 7))
            prompts = [" ".join(words[p]) + f" {start + i}" for i, p in enumerate(picks)]
            g = rng.integers(1, 10, size=n).astype(float)
            g[rng.random(n) < bad] = np.nan
            cols = {"id": ids, "prompt": prompts, "guidance_scale": g}
            if seeded:
                cols["seed"] = np.arange(start, start + n, dtype=np.int64)
            w.write_table(pa.table(cols))


def child(path: str) -> None:
    """Scan and plan one manifest; print one JSON line."""
    from batch.plan.manifest import iter_plan, scan_manifest
    from batch.plan.sources import open_manifest
    from batch.spec.config import parse_spec
    from batch.store.schema import RESERVED_COLUMNS

    spec = parse_spec({"manifest": path})
    t0, c0 = time.perf_counter(), time.process_time()
    source = open_manifest(path)
    scan = scan_manifest(source, spec, RESERVED_COLUMNS)
    t1 = time.perf_counter()
    items = failed = 0
    for _, p in iter_plan(source.iter_batches(), spec, scan.carried, scan.duplicates):
        items += p.items.num_rows
        failed += p.failed.num_rows
    t2, c2 = time.perf_counter(), time.process_time()
    print(json.dumps({"rows": scan.rows, "items": items, "failed_rows": failed, "scan_s": round(t1 - t0, 2),
                      "plan_s": round(t2 - t1, 2), "total_s": round(t2 - t0, 2), "cpu_s": round(c2 - c0, 2),
                      "rows_per_s": round(scan.rows / (t2 - t0)), "rows_per_cpu_s": round(scan.rows / (c2 - c0)),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--dir", default="/tmp/plan-scale")
    ap.add_argument("--bad", type=float, default=0.001)
    ap.add_argument("--seeded", action="store_true", help="manifests with a seed column (no derivation)")
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        return child(args.child)
    from common import emit, environment  # imports torch: never in the measured child

    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    results = []
    for rows in args.rows:
        path = d / f"manifest-{rows}{'-seeded' if args.seeded else ''}.parquet"
        if not path.exists():
            free = os.statvfs(d).f_bavail * os.statvfs(d).f_frsize
            if rows * 60 > free:  # ~45 bytes a row compressed, with margin
                print(f"skip {rows}: ~{rows * 60 / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free", file=sys.stderr)
                continue
            t = time.perf_counter()
            write_manifest(path, rows, args.bad, args.seeded)
            print(f"wrote {path} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.0f}s", file=sys.stderr)
        out = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True, text=True,
                             check=True, env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
        r = dict(json.loads(out.stdout.strip().splitlines()[-1]), seeds="manifest" if args.seeded else "derived")
        print(r, file=sys.stderr)
        results.append(r)
    emit({"bench": "plan_scale", "environment": environment(), "results": results})


if __name__ == "__main__":
    main()

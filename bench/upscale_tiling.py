"""Tiled x4 upscaling keeps memory bounded: peak RSS and time for growing inputs on the tiny upscaler.

    python bench/upscale_tiling.py [--sides 128 256 512] [--steps 2] [--tile 128] [--overlap 32] [--out DIR]

Each input side runs in a fresh subprocess (so ru_maxrss is that run's peak) through
``batch.sampling.image.upscale`` with ``tiles_per_call`` 4; prints one line per side and writes
``upscale_tiling.json`` and ``upscale_tiling.png`` (peak RSS vs output side) under ``--out``.
The tiny model's weights are random, so this measures memory and time, not quality.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import numpy as np
from batch.sampling.image import UpscaleRequest, upscale
from batch.models.load import load_model, make_scheduler
side, steps, tile, overlap = map(int, sys.argv[1:5])
m = load_model("tiny", task="upscale")
y, x = np.mgrid[0:side, 0:side] / side
img = np.stack([60 + 120 * x, 60 + 120 * y, 200 - 100 * x * y], -1).round().astype(np.uint8)
t0 = time.perf_counter()
out = upscale(m, lambda: make_scheduler("ddim", m.scheduler_config), [UpscaleRequest(img, "", None, 20, 0)],
              num_inference_steps=steps, guidance_scale=1.0, tile_size=tile, tile_overlap=overlap, tiles_per_call=4)[0]
print(json.dumps({"side": side, "output": list(out.shape), "seconds": time.perf_counter() - t0,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sides", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--overlap", type=int, default=32)
    ap.add_argument("--out", default="build/bench")
    args = ap.parse_args()
    root = Path(__file__).resolve().parent.parent
    results = []
    for side in args.sides:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(side), str(args.steps), str(args.tile), str(args.overlap)],
                              cwd=root, capture_output=True, text=True, check=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"input {side}x{side} -> {r['output'][0]}x{r['output'][1]}: {r['seconds']:.1f} s, "
              f"peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "upscale_tiling.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    try:
        import matplotlib
    except ImportError:  # optional: the numbers above are the result; the plot is a convenience
        print("matplotlib not installed: no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["output"][0] for r in results], [r["peak_rss_mib"] for r in results], "o-")
    ax.set_xlabel("output side (px)")
    ax.set_ylabel("peak RSS (MiB)")
    ax.set_title(f"tiled x4 upscale, tile {args.tile}, overlap {args.overlap}")
    fig.tight_layout()
    fig.savefig(out / "upscale_tiling.png", dpi=120)
    print(f"wrote {out / 'upscale_tiling.json'} and {out / 'upscale_tiling.png'}")


if __name__ == "__main__":
    main()

"""Write a demo manifest for the image tasks plus the small input images it points to.

    python examples/make_image_manifest.py OUT_DIR --task variation|upscale

Writes OUT_DIR/inputs/*.png (a smooth RGB image, an RGBA cut-out, a 16-bit grayscale and, for upscale,
a 48x48 image that is upscaled tile by tile) and OUT_DIR/<task>.parquet referencing them by path.
"""

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def smooth(h: int, w: int, seed: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    r = np.random.default_rng(seed).uniform(1, 6, size=3)
    chans = [127 + 100 * np.sin(x * r[0] + y), 127 + 100 * np.cos(y * r[1] + x), 127 + 100 * np.sin((x + y) * r[2])]
    return np.stack(chans, -1).round().astype(np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--task", choices=["variation", "upscale"], required=True)
    args = ap.parse_args()
    out = Path(args.out_dir)
    (out / "inputs").mkdir(parents=True, exist_ok=True)
    side = 32 if args.task == "upscale" else 96
    images = {
        "landscape": Image.fromarray(smooth(side, side, 0)),
        "cutout": Image.fromarray(np.dstack([smooth(side, side, 1), np.tri(side, side, dtype=np.uint8) * 255]), "RGBA"),
        "gray16": Image.fromarray(smooth(side, side, 2)[..., 0].astype(np.uint16) * 257),
    }
    if args.task == "upscale":
        images["large"] = Image.fromarray(smooth(48, 48, 3))  # over tile_size 32: tiled
    rows = []
    for name, img in images.items():
        path = out / "inputs" / f"{name}.png"
        img.save(path)
        row = {"id": name, "image_uri": str(path.resolve()), "seed": None, "num_images": None, "source": "demo"}
        if args.task == "upscale":
            row.update(prompt=f"a sharp photo, {name}", noise_level=None)
        rows.append(row)
    rows[0].update(seed=1234, num_images=2)
    manifest = out / f"{args.task}.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    print(f"wrote {len(rows)} {args.task} rows to {manifest}")


if __name__ == "__main__":
    main()

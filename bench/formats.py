"""Encode cost and size of each image format, and shard build cost, on 512x512 images (CPU, one core).

    python bench/formats.py [--n 16] [--side 512]

Images: the tiny model's output upscaled (noise-like, hard to compress) and a smooth synthetic scene
(gradients + mild noise, closer to a photo). Prints a markdown table; numbers are per image.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from PIL import Image

from batch.store.formats import OutputFormat, build_parquet, build_webdataset, encode_image, sample_key


def smooth_images(n: int, side: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:side, 0:side] / side
    out = []
    for i in range(n):
        a, b, c = rng.uniform(0.5, 3, 3)
        base = np.stack([np.sin(a * x * 6 + i), np.cos(b * y * 5), np.sin(c * (x + y) * 4)], -1) * 0.5 + 0.5
        img = base * 220 + rng.normal(0, 4, base.shape)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


def tiny_images(n: int, side: int) -> np.ndarray:
    from batch.models.load import load_model, make_scheduler
    from batch.sampling.txt2img import SamplingParams, txt2img

    m = load_model("tiny", device="cpu", dtype="float32")
    imgs = txt2img(m, make_scheduler("pndm", m.scheduler_config), [f"p{i}" for i in range(n)], [None] * n,
                   list(range(n)), SamplingParams(64, 64, 4, 7.5))
    return np.stack([np.asarray(Image.fromarray(im).resize((side, side), Image.BICUBIC)) for im in imgs])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--side", type=int, default=512)
    args = ap.parse_args()
    formats = [OutputFormat(image_format="png"), OutputFormat(image_format="webp"),
               OutputFormat(image_format="webp", webp_lossless=False, jpeg_quality=90),
               OutputFormat(image_format="jpeg", jpeg_quality=95)]
    print(f"| images ({args.side}px) | format | encode ms/img | KiB/img | webdataset shard ms/img | parquet shard ms/img |")
    print("|---|---|---|---|---|---|")
    for label, images in (("smooth", smooth_images(args.n, args.side)), ("tiny model", tiny_images(args.n, args.side))):
        for fmt in formats:
            t0 = time.perf_counter()
            data = [encode_image(im, fmt) for im in images]
            enc = (time.perf_counter() - t0) / len(images)
            samples = [(sample_key(f"r{i}", 0), {"id": f"r{i}", "image_index": 0, "prompt": "p", "seed": i,
                                                 "height": args.side, "width": args.side}, d)
                       for i, d in enumerate(data)]
            t0 = time.perf_counter()
            build_webdataset(samples, fmt.ext)
            wds = (time.perf_counter() - t0) / len(images)
            t0 = time.perf_counter()
            build_parquet(samples, fmt.ext)
            pqt = (time.perf_counter() - t0) / len(images)
            name = fmt.image_format + ("" if fmt.image_format == "png" else
                                       " lossless" if fmt.lossless else f" q{fmt.jpeg_quality}")
            print(f"| {label} | {name} | {enc * 1e3:.1f} | {np.mean([len(d) for d in data]) / 1024:.0f} | "
                  f"{wds * 1e3:.2f} | {pqt * 1e3:.2f} |")


if __name__ == "__main__":
    main()

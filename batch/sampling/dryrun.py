"""Dry-run pixels (``model: none``): small deterministic images without diffusion.

A dry run sends every item through the real pipeline (planner, actor pool, encode/write stage, commits)
but replaces the model with this function, so it measures the orchestration ceiling and rehearses a large
run cheaply. An image depends only on its item's seed and output size, so it is reproducible from its
metadata row alone: an 8x8 tile of random bytes, the first 192 bytes of the raw output of numpy's PCG64 bit
generator seeded with ``seed`` (``PCG64(seed).random_raw(24)`` as little-endian uint64; the raw stream of a
bit generator is fixed for a seed, whereas numpy allows ``Generator`` methods to change their streams),
repeated to fill ``height x width``. The tile keeps the writers' shape contract (HxWx3 uint8 at the item's real size) while
PNG/WebP encode it cheaply (deflate finds the repeats), and it is never flat, so it passes the sampler's
flat-image check. Pure numpy: no torch, no diffusers, no Ray.
"""

from __future__ import annotations

import numpy as np

TILE = 8  # side of the repeated random tile, pixels


def dry_run_image(seed: int, height: int, width: int) -> np.ndarray:
    """The dry-run image of one item: ``height x width x 3`` uint8, a function of (seed, height, width) only."""
    if height < 1 or width < 1:
        raise ValueError(f"dry run: height and width must be >= 1, got {height}x{width}")
    raw = np.random.PCG64(int(seed)).random_raw(TILE * TILE * 3 // 8).astype("<u8")
    tile = raw.view(np.uint8).reshape(TILE, TILE, 3)
    reps = (-(-height // TILE), -(-width // TILE), 1)  # ceil: sizes need not be multiples of the tile
    return np.ascontiguousarray(np.tile(tile, reps)[:height, :width])


def dry_run_images(seeds: list[int], sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """One dry-run image per (seed, (height, width)); each independent of the others (no batch effects)."""
    if len(seeds) != len(sizes):
        raise ValueError(f"dry run: {len(seeds)} seeds for {len(sizes)} sizes")
    return [dry_run_image(s, h, w) for s, (h, w) in zip(seeds, sizes)]

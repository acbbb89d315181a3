"""The seed convention: every image is reproducible from its own metadata row.

Image ``k`` of a manifest row uses ``torch.Generator("cpu").manual_seed(s + k)``, where ``s`` is the row's
``seed`` column or, when that is missing, :func:`derive_row_seed` of (run seed, row id): the first 8 bytes
of SHA-256 over ``"sdbatch-seed-v1:{run_seed}:{row_id}"`` read big-endian and shifted right by one bit (a
stable 63-bit value, independent of Python's hash randomisation, the batch and the actor). The effective
per-image seed ``s + k`` is stored in the ``seed`` metadata column; initial latents (and any ancestral
noise) are drawn from that CPU generator, so the same row gives the same image on any batch, actor or
device, and plain diffusers reproduces it with ``generator=torch.Generator("cpu").manual_seed(seed)``.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SEED_SCHEME = "sdbatch-seed-v1"


def derive_row_seed(run_seed: int, row_id: str) -> int:
    """Stable 63-bit seed for a row that has none: SHA-256 of (scheme, run seed, row id)."""
    digest = hashlib.sha256(f"{SEED_SCHEME}:{int(run_seed)}:{row_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def image_seed(row_seed: int, image_index: int) -> int:
    """Seed of image ``image_index`` of a row whose seed is ``row_seed``."""
    return int(row_seed) + int(image_index)


def generator_for(seed: int) -> torch.Generator:
    """The CPU generator an image with effective seed ``seed`` draws its noise from."""
    import torch  # here, not at the top: planning (and so every CLI command) seeds rows without torch

    return torch.Generator("cpu").manual_seed(int(seed))

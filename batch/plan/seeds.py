"""The seed convention: every image is reproducible from its own metadata row.

Image ``k`` of a manifest row uses ``torch.Generator("cpu").manual_seed(s + k)``, where ``s`` is the row's
``seed`` column or, when that is missing, :func:`derive_row_seed` of (run seed, row id): the first 8 bytes
of SHA-256 over ``"sdbatch-seed-v1:{run_seed}:{row_id}"`` read big-endian and shifted right by one bit (a
stable 63-bit value, independent of Python's hash randomisation, the batch and the actor). The effective
per-image seed ``s + k`` is stored in the ``seed`` metadata column; initial latents (and any ancestral
noise) are drawn from that CPU generator, so the same row gives the same image on any batch, actor or
device, and plain diffusers reproduces it with ``generator=torch.Generator("cpu").manual_seed(seed)``.

Fresh seeds per scheduled day (spec ``seed_per_day: true`` with ``date: YYYY-MM-DD``): the run seed that rows
without a ``seed`` derive theirs from is :func:`day_seed` of (spec ``seed``, date): the first 8 bytes of
SHA-256 over ``"sdbatch-day-seed-v1:{seed}:{YYYY-MM-DD}"``, big-endian, shifted right by one bit. So each
day draws new samples of the same prompts, a rerun of one day draws the same ones, and the metadata row's
``seed`` (the effective per-image seed) still reproduces its image alone; ``run.json`` records the date and
the effective run seed. Rows whose manifest gives a ``seed`` keep it.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

SEED_SCHEME = "sdbatch-seed-v1"
DAY_SEED_SCHEME = "sdbatch-day-seed-v1"


def _seed_prefix(run_seed: int) -> str:
    return f"{SEED_SCHEME}:{int(run_seed)}:"


def derive_row_seed(run_seed: int, row_id: str) -> int:
    """Stable 63-bit seed for a row that has none: SHA-256 of (scheme, run seed, row id)."""
    digest = hashlib.sha256((_seed_prefix(run_seed) + row_id).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def derive_row_seeds(run_seed: int, ids: list[str]) -> np.ndarray:
    """:func:`derive_row_seed` of many ids at once (the same SHA-256 per id, the message built by Arrow and
    the 8-byte prefixes read by numpy instead of per-call Python)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    messages = pc.binary_join_element_wise(_seed_prefix(run_seed), pa.array(ids, pa.string()), "")
    sha = hashlib.sha256
    digests = b"".join([sha(m).digest()[:8] for m in messages.cast(pa.binary()).to_pylist()])
    return np.frombuffer(digests, dtype=">u8").astype(np.uint64) >> np.uint64(1)


def day_seed(run_seed: int, day: str) -> int:
    """Stable 63-bit run seed of one day (``YYYY-MM-DD``): SHA-256 of (day scheme, spec seed, day)."""
    digest = hashlib.sha256(f"{DAY_SEED_SCHEME}:{int(run_seed)}:{day}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def effective_run_seed(spec: Any) -> int:
    """The run seed rows without a ``seed`` derive theirs from: the spec's ``seed``, or with ``seed_per_day``
    the :func:`day_seed` of (``seed``, ``date``). ``seed_per_day`` without a ``date`` raises ``ValueError``:
    the day is always given (``--date``), never read from the clock, so a rerun reproduces the day's seeds."""
    if not getattr(spec, "seed_per_day", False):
        return int(spec.seed)
    if not getattr(spec, "date", None):
        from batch.spec.base import SpecError

        raise SpecError("seed_per_day: true needs the run's day: set date: YYYY-MM-DD in the spec, or pass "
                         "--date YYYY-MM-DD (sdbatch run, jobs/generate.py); it is never read from the clock")
    return day_seed(spec.seed, spec.date)


def image_seed(row_seed: int, image_index: int) -> int:
    """Seed of image ``image_index`` of a row whose seed is ``row_seed``."""
    return int(row_seed) + int(image_index)


def generator_for(seed: int) -> torch.Generator:
    """The CPU generator an image with effective seed ``seed`` draws its noise from."""
    import torch  # here, not at the top: planning (and so every CLI command) seeds rows without torch

    return torch.Generator("cpu").manual_seed(int(seed))

"""GPU batches: which items share a sampler call, and how batches travel as Ray blocks and rows.

Decided in the driver from the (bucket-sorted) plan alone, so batch composition depends only on the
manifest, the spec's defaults and ``batch_size`` -- never on actors, blocks or timing:

1. :func:`assign_batches` numbers the GPU batches (``_batch``): runs of equal bucket key (shape, steps,
   guidance, scheduler), cut every ``batch_size`` items;
2. :func:`cut_blocks` cuts blocks of whole batches, enough to feed every actor;
3. :func:`pack_batches` makes each GPU batch one row, so Ray Data (which merges and slices blocks to honour
   an integer ``batch_size``, required with GPUs) can never split a GPU batch across sampler calls.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batch.plan.rows import BUCKET_FIELDS

MAX_BATCHES_PER_BLOCK = 8
BLOCKS_PER_ACTOR = 4


def assign_batches(items: pa.Table, batch_size: int) -> np.ndarray:
    """GPU batch number of each item: runs of equal bucket key, cut every ``batch_size`` items.

    Computed from the (bucket-sorted) items alone, so which images share a sampler call depends only
    on the manifest, the spec's defaults and ``batch_size``, never on blocks, actors or timing.
    Vectorised: a run starts where any bucket field differs from the previous item's.
    """
    n = items.num_rows
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    new_run = np.zeros(n, dtype=bool)
    new_run[0] = True
    for f in BUCKET_FIELDS:
        col = items.column(f).combine_chunks()
        diff = pc.not_equal(col.slice(1), col.slice(0, n - 1))
        diff = pc.or_(pc.fill_null(diff, False), pc.not_equal(col.slice(1).is_null(), col.slice(0, n - 1).is_null()))
        new_run[1:] |= diff.to_numpy(zero_copy_only=False)
    run_start = np.maximum.accumulate(np.where(new_run, np.arange(n), 0))
    new_batch = new_run | ((np.arange(n) - run_start) % batch_size == 0)
    return np.cumsum(new_batch) - 1


def _batch_starts(ids) -> list[int]:
    """Positions where a new GPU batch begins (consecutive items share a batch number)."""
    ids = np.asarray(ids)
    if len(ids) == 0:
        return []
    return np.flatnonzero(np.concatenate([[True], ids[1:] != ids[:-1]])).tolist()


def cut_blocks(items: pa.Table, batch_size: int, actors: int) -> list[pa.Table]:
    """Number the GPU batches (``_batch``), then cut blocks of whole batches: enough blocks to feed
    every actor (``BLOCKS_PER_ACTOR`` each where there is work), none over ``MAX_BATCHES_PER_BLOCK``."""
    if items.num_rows == 0:
        return []
    if "_batch" in items.column_names:  # numbered by the plan (batch.plan.manifest.plan_chunk)
        ids = items.column("_batch").to_numpy()
    else:
        ids = assign_batches(items, batch_size)
        items = items.append_column("_batch", pa.array(ids, pa.int64()))
    starts = _batch_starts(ids)
    per_block = min(MAX_BATCHES_PER_BLOCK, max(1, math.ceil(len(starts) / (actors * BLOCKS_PER_ACTOR))))
    bounds = starts[::per_block] + [items.num_rows]
    return [items.slice(a, b - a) for a, b in zip(bounds, bounds[1:])]


PACKED = "_gpu_batch"  # one Ray row per GPU batch: list<struct> of the batch's items


def pack_batches(items: pa.Table) -> pa.Table:
    """One row per GPU batch (``_batch``, consecutive): a ``_gpu_batch`` list of the batch's item structs.

    Ray Data needs an integer ``batch_size`` when GPUs are requested, and with one it merges and slices
    blocks into calls of exactly that many rows. Packing makes a Ray row a whole GPU batch, so whatever
    Ray merges or slices, a sampler call only ever receives whole batches (``batch_size=1``: one each).
    """
    ids = items.column("_batch").to_numpy()
    offsets = pa.array(_batch_starts(ids) + [len(ids)], pa.int32())
    structs = items.combine_chunks().to_struct_array().combine_chunks()
    return pa.table({PACKED: pa.ListArray.from_arrays(offsets, structs)})


def unpack_batches(packed: pa.Table) -> pa.Table:
    """The items of packed GPU batches (:func:`pack_batches`), in order, ``_batch`` included."""
    lists = packed.column(PACKED).combine_chunks()
    return pa.Table.from_struct_array(lists.flatten())

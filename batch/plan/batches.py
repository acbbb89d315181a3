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

import pyarrow as pa

from batch.plan.rows import BUCKET_FIELDS, bucket_key

MAX_BATCHES_PER_BLOCK = 8
BLOCKS_PER_ACTOR = 4


def assign_batches(items: pa.Table, batch_size: int) -> list[int]:
    """GPU batch number of each item: runs of equal bucket key, cut every ``batch_size`` items.

    Computed from the (bucket-sorted) items alone, so which images share a sampler call depends only
    on the manifest, the spec's defaults and ``batch_size``, never on blocks, actors or timing.
    """
    rows = items.select(list(BUCKET_FIELDS)).to_pylist()
    ids: list[int] = []
    batch, run_start = -1, 0
    for i, row in enumerate(rows):
        new_run = i == 0 or bucket_key(row) != bucket_key(rows[i - 1])
        if new_run:
            run_start = i
        if new_run or (i - run_start) % batch_size == 0:
            batch += 1
        ids.append(batch)
    return ids


def _batch_starts(ids: list[int]) -> list[int]:
    """Positions where a new GPU batch begins (consecutive items share a batch number)."""
    return [i for i in range(len(ids)) if i == 0 or ids[i] != ids[i - 1]]


def cut_blocks(items: pa.Table, batch_size: int, actors: int) -> list[pa.Table]:
    """Number the GPU batches (``_batch``), then cut blocks of whole batches: enough blocks to feed
    every actor (``BLOCKS_PER_ACTOR`` each where there is work), none over ``MAX_BATCHES_PER_BLOCK``."""
    if items.num_rows == 0:
        return []
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
    ids = items.column("_batch").to_pylist()
    offsets = pa.array(_batch_starts(ids) + [len(ids)], pa.int32())
    structs = items.combine_chunks().to_struct_array().combine_chunks()
    return pa.table({PACKED: pa.ListArray.from_arrays(offsets, structs)})


def unpack_batches(packed: pa.Table) -> pa.Table:
    """The items of packed GPU batches (:func:`pack_batches`), in order, ``_batch`` included."""
    lists = packed.column(PACKED).combine_chunks()
    return pa.Table.from_struct_array(lists.flatten())

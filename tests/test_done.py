"""The bounded-memory reading of committed metadata (batch.store.done) equals the whole-table reading.

Random parts from several attempts (out of order, retried images, failed rows, safety drops, fp32 re-decodes)
are read both ways: :class:`DoneIndex` against :func:`latest_rows` + :func:`select_work` + :func:`tally`.
"""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

from batch.plan.manifest import Plan, failure_reason
from batch.run.stats import tally
from batch.store.commit import latest_rows, part_key, read_parts, select_work
from batch.store.done import DoneIndex
from batch.store.io import open_output
from batch.store.schema import ITEM_SCHEMA, NSFW_ERROR, conform

ATTEMPTS = ["20261201T000000000000Z-aaaaaa", "20261202T000000000000Z-bbbbbb", "20261203T000000000000Z-cccccc"]


def random_output(seed: int):
    rng = random.Random(seed)
    out = open_output(f"memory://done-{seed}")
    rows, images = 40, {}
    for r in range(rows):
        images[r] = rng.choice([1, 2, 3])
    order = ATTEMPTS[:]
    rng.shuffle(order)  # parts are listed by name, attempts win by id: the order written must not matter
    for a in order:
        recs = []
        for r in range(rows):
            if rng.random() < 0.5:
                continue
            if rng.random() < 0.1:  # a failed manifest row
                recs.append({"manifest_row": r, "image_index": None, "num_images": None, "status": "failed",
                             "error": "prompt: missing or empty, got ''", "attempt": a})
                continue
            for k in range(images[r]):
                if rng.random() < 0.3:
                    continue
                status = rng.choice(["ok", "ok", "failed", "skipped"])
                error = rng.choice(["RuntimeError: boom", NSFW_ERROR]) if status == "failed" else None
                recs.append({"manifest_row": r, "image_index": k, "num_images": images[r], "status": status,
                             "error": error, "attempt": a, "vae_redecoded_fp32": rng.random() < 0.1})
        half = len(recs) // 2
        for n, chunk in enumerate([recs[:half], recs[half:]]):
            t = pa.Table.from_pylist(chunk)
            out.put_parquet(part_key(a, n), conform(t, pa.schema([])))
    return out, rows, images


@pytest.mark.parametrize("seed,partition_rows", [(1, None), (2, 7), (3, 1), (4, 16)])
def test_done_index_equals_latest_rows(seed, partition_rows):
    out, rows, images = random_output(seed)
    whole = latest_rows(read_parts(out))
    index = DoneIndex.read(out, partition_rows=partition_rows)
    want = sorted((r["manifest_row"], -1 if r["image_index"] is None else r["image_index"], r["status"])
                  for r in whole.to_pylist())
    got = sorted((int(k) // 65536, int(k) % 65536 - 1, {0: "ok", 3: "skipped"}.get(int(s), "failed"))
                 for q in index.partitions for k, s in zip(index.latest(q).keys, index.latest(q).status))
    assert got == want and index.records == read_parts(out).num_rows
    if partition_rows and partition_rows < rows:
        assert len(index.partitions) > 1  # several partitions really exercised

    planned = sum(images.values())
    assert index.tally(out, rows, planned, failure_reason) == tally(whole, rows, planned)

    items = pa.Table.from_pylist([{"id": f"r{r}", "manifest_row": r, "image_index": k, "num_images": n}
                                  for r, n in images.items() for k in range(n)], schema=ITEM_SCHEMA)
    failed = items.filter(pa.array([False] * items.num_rows))
    for mode in ("run", "retry_failed"):
        want_items, _ = select_work(Plan(items=items, failed=failed, carried=[], num_rows=rows), whole, mode)
        got_items, _ = index.select(items, failed, mode)
        assert got_items.to_pylist() == want_items.to_pylist()

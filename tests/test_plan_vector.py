"""The vectorised, chunked plan equals the per-row plan: same items, same failed rows, same error texts.

The reference below is the per-row planner the project used before (each row through the task's
``validate_row``, a dict of ids for duplicates, a Python sort by bucket). Random manifests mix good rows with
every kind of bad value the row checks know, in integer and float columns, so a kernel that accepted a row
the per-row check refuses (or derived another value) shows up as a difference.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pyarrow as pa
import pytest

import batch.plan.manifest as manifest
from batch.plan.duplicates import DuplicateFinder, hash_strings
from batch.plan.manifest import iter_plan, plan
from batch.plan.sources import rechunk
from batch.plan.rows import RowError, bucket_key
from batch.plan.seeds import image_seed
from batch.spec.config import parse_spec
from batch.store.schema import RESERVED_COLUMNS
from batch.tasks import TASKS


def reference_plan(table: pa.Table, spec) -> tuple[list[dict], list[dict]]:
    """The per-row planner (validate, duplicates, expand, stable bucket sort), as lists of dicts."""
    task = TASKS[spec.task]
    rows = table.select([c for c in task.columns if c in table.column_names]).to_pylist()
    positions: dict = {}
    for i, r in enumerate(rows):
        if isinstance(r.get("id"), str):
            positions.setdefault(r["id"], []).append(i)
    items, failed = [], []
    for i, raw in enumerate(rows):
        try:
            eff = task.validate_row(raw, spec, None)
            dup = positions.get(raw["id"], [])
            if len(dup) > 1:
                raise RowError([("id", f"duplicate id, got {raw['id']!r} at manifest rows {dup[:10]}")])
        except RowError as err:
            rid = raw.get("id")
            failed.append({"id": rid if isinstance(rid, str) else None, "manifest_row": i, "error": str(err)})
            continue
        for k in range(eff["num_images"]):
            items.append({**eff, "manifest_row": i, "image_index": k, "seed": image_seed(eff["row_seed"], k)})
    order = sorted(range(len(items)), key=lambda j: (bucket_key(items[j]), j))
    return [items[j] for j in order], failed


IDS = ["a", "b-1", "q:colon", "x y", "", "   ", None, "a/b", "a%2Fb", "..", ".", "ok.", "é", "Ａ", "tab\t",
       "x" * 513, "dup", "dup", "a\u2215b", "C:\\x", "%", "plain_id"]
PROMPTS = ["a cat", "", "   ", "\u3000", None, "日本", "x" * 20, "ok 1", 5]
GUIDANCE = [None, 7.5, 0.0, -1.0, float("nan"), float("inf"), 1e300, 3.0, 100.0, 100.5]
INTS = [None, 0, 1, 5, 8, 60, 64, 1000, 1001, 4096, 17, 3]
FLOATS = [None, 5.0, 5.5, 64.0, float("nan"), 8.0]
SCHEDULERS = [None, "ddim", "model", "bad", "euler_a"]
SEEDS = [None, 0, 5, -1, 2**63 - 1]


def random_manifest(rng: random.Random, n: int, float_ints: bool) -> pa.Table:
    ints = FLOATS if float_ints else INTS
    rows = []
    for i in range(n):
        rid = rng.choice(IDS) if rng.random() < 0.3 else f"r{i}"
        rows.append({
            "id": rid, "prompt": rng.choice(PROMPTS) if rng.random() < 0.3 else f"prompt {i}",
            "negative_prompt": rng.choice([None, "", "blurry"]),
            "guidance_scale": rng.choice(GUIDANCE) if rng.random() < 0.4 else None,
            "num_inference_steps": rng.choice(ints) if rng.random() < 0.3 else None,
            "height": rng.choice([None, 64, 64, 72, 60, 4096] + ([64.0] if float_ints else [])),
            "width": rng.choice([None, 64, 64, 8]),
            "num_images": rng.choice([None, 1, 2, 3, 0, 17]),
            "scheduler": rng.choice(SCHEDULERS),
            "seed": rng.choice(SEEDS) if rng.random() < 0.5 else None,
        })
    prompts = [r["prompt"] for r in rows]
    types = {"prompt": pa.string() if all(p is None or isinstance(p, str) for p in prompts) else None}
    table = {}
    for c in rows[0]:
        values = [r[c] for r in rows]
        if c == "prompt" and types["prompt"] is None:
            values = [None if v is None else str(v) for v in values]
        if c in ("num_inference_steps",) and float_ints:
            table[c] = pa.array(values, pa.float64())
        elif c == "height" and float_ints:
            table[c] = pa.array([None if v is None else float(v) for v in values], pa.float64())
        else:
            table[c] = pa.array(values)
    return pa.table(table)


def _clean(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()
            if k not in ("_batch",)}


@pytest.mark.parametrize("seed,float_ints", [(1, False), (2, True), (3, False), (4, True), (5, False)])
def test_vectorised_plan_equals_the_per_row_plan(seed, float_ints):
    spec = parse_spec({"defaults": {"height": 64, "width": 64, "num_inference_steps": 4},
                       "limits": {"max_prompt_chars": 10, "max_side": 1024}})
    table = random_manifest(random.Random(seed), 400, float_ints)
    got = plan(table, spec, RESERVED_COLUMNS)
    want_items, want_failed = reference_plan(table, spec)
    assert [_clean(r) for r in got.items.to_pylist()] == [_clean(r) for r in want_items]
    assert got.failed.select(["id", "manifest_row", "error"]).to_pylist() == want_failed
    assert got.items.num_rows > 50 and got.failed.num_rows > 50  # both kinds really exercised


@pytest.mark.parametrize("extra", [{}, {"seed": 3, "seed_per_day": True, "date": "2026-12-02"}])
def test_plain_rows_take_the_kernel_path_and_agree(extra):
    """A manifest of plainly good rows (the common case) never reaches the per-row check, and still equals it
    (also with the per-day run seed the derived seeds come from)."""
    from batch.plan.vector import split_rows

    spec = parse_spec(extra)
    table = pa.table({"id": [f"row-{i}" for i in range(300)], "prompt": [f"p {i}" for i in range(300)],
                      "guidance_scale": [float(1 + i % 9) for i in range(300)],
                      "seed": [None if i % 3 else i for i in range(300)]})
    assert split_rows(table, spec).all()
    got = plan(table, spec, RESERVED_COLUMNS)
    want_items, _ = reference_plan(table, spec)
    assert [_clean(r) for r in got.items.to_pylist()] == [_clean(r) for r in want_items]


def test_every_error_text_is_the_per_row_text():
    spec = parse_spec({"limits": {"max_guidance_scale": 50}})
    table = pa.table({"id": ["a", "b/c", "d", "e", "f"], "prompt": ["x", "y", "", "z", "w"],
                      "guidance_scale": [1e300, 7.0, 7.0, float("nan"), 7.0],
                      "num_images": [1, 1, 1, 1, 99]})
    got = plan(table, spec, RESERVED_COLUMNS).failed.column("error").to_pylist()
    _, want = reference_plan(table, spec)
    assert got == [f["error"] for f in want] and len(got) == 5
    assert got[0] == "guidance_scale: must be at most limits.max_guidance_scale=50, got 1e+300"


def test_chunks_decide_batches_not_file_layout(monkeypatch):
    """Plan chunks start at fixed manifest rows: reading the same manifest in record batches of any size gives
    the same items and GPU batch numbers; buckets never cross a chunk (the documented rule)."""
    monkeypatch.setattr(manifest, "PLAN_CHUNK_ROWS", 16)
    spec = parse_spec({"batch_size": 3})
    rng = random.Random(7)
    table = pa.table({"id": [f"r{i}" for i in range(100)], "prompt": ["p"] * 100,
                      "guidance_scale": [rng.choice([3.0, 7.5]) for _ in range(100)],
                      "num_images": [rng.choice([1, 2]) for _ in range(100)]})

    def streamed(size):
        parts = [p.items for _, p in iter_plan(table.to_batches(max_chunksize=size), spec, [], {})]
        return pa.concat_tables(parts).to_pylist()

    whole = plan(table, spec, RESERVED_COLUMNS).items.to_pylist()
    assert streamed(5) == streamed(64) == streamed(1000) == whole
    chunk_of = {}
    for r in whole:
        chunk_of.setdefault(r["_batch"], set()).add(r["manifest_row"] // 16)
    assert all(len(c) == 1 for c in chunk_of.values())  # no GPU batch spans two chunks
    assert max(len([r for r in whole if r["_batch"] == b]) for b in chunk_of) == 3


def test_rechunk_gives_exact_sizes_across_boundaries():
    t = pa.table({"x": list(range(23))})
    sizes = [c.num_rows for c in rechunk([t.slice(0, 5), t.slice(5, 1), t.slice(6, 17)], 4)]
    assert sizes == [4, 4, 4, 4, 4, 3]
    assert pa.concat_tables(list(rechunk([t.slice(0, 5), t.slice(5, 18)], 4))).column("x").to_pylist() == list(range(23))


def test_duplicates_across_chunks_fail_every_occurrence(monkeypatch):
    monkeypatch.setattr(manifest, "PLAN_CHUNK_ROWS", 10)
    spec = parse_spec({})
    ids = [f"r{i}" for i in range(35)]
    ids[3] = ids[27] = "twice"
    p = plan(pa.table({"id": ids, "prompt": ["p"] * 35}), spec, RESERVED_COLUMNS)
    errors = dict(zip(p.failed.column("manifest_row").to_pylist(), p.failed.column("error").to_pylist()))
    assert errors == {3: "id: duplicate id, got 'twice' at manifest rows [3, 27]",
                      27: "id: duplicate id, got 'twice' at manifest rows [3, 27]"}


def test_hash_collisions_never_fail_a_row(monkeypatch):
    """Every id hashing alike makes every row a candidate; the exact second pass still finds only true dups."""
    import batch.plan.duplicates as dups

    monkeypatch.setattr(dups, "hash_strings", lambda arr: (np.zeros(len(arr), np.uint64),
                                                           np.ones(len(arr), bool)))
    finder = DuplicateFinder(partitions=4)
    chunks = [pa.array(["a", "b", "c"]), pa.array(["d", "a", "e"])]
    for c in chunks:
        finder.add(c)
    assert finder.finish(chunks) == {0: [0, 4], 4: [0, 4]}


def test_hash_strings_is_stable_and_length_aware():
    a = pa.array(["", "a", "a\x00", "abcdefgh", "abcdefghi", "x" * 600, None, "abcdefgh"])
    h, valid = hash_strings(a)
    assert valid.tolist() == [True] * 6 + [False, True]
    assert len(set(h[:6].tolist())) == 6 and h[3] == h[7]
    assert (hash_strings(a.slice(3, 2))[0] == h[3:5]).all()  # slices (array offsets) hash the same


def test_columns_of_another_type_fall_back_to_the_per_row_check():
    """A text `height` column: its null rows take the default through the kernels, the others fail per row."""
    spec = parse_spec({})
    table = pa.table({"id": ["a", "b", "c"], "prompt": ["x", "y", "z"], "height": pa.array([None, "64", None]),
                      "num_inference_steps": pa.array([None, 3.0, 2.5]), "negative_prompt": pa.array([None, 1, None])})
    got = plan(table, spec, RESERVED_COLUMNS)
    want_items, want_failed = reference_plan(table, spec)
    assert [_clean(r) for r in got.items.to_pylist()] == [_clean(r) for r in want_items]
    assert got.failed.select(["id", "manifest_row", "error"]).to_pylist() == want_failed
    assert got.items.num_rows == 1 and got.failed.num_rows == 2

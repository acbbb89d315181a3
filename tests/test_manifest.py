"""Manifest planning (batch.plan.manifest): defaults, expansion, seeds, sorting, carried columns, bad rows."""

from __future__ import annotations

import datetime
import decimal
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.spec.base import MAX_SEED
from batch.spec.config import parse_spec
from batch.plan.manifest import ManifestError, failure_reason, plan, read_manifest
from batch.plan.rows import BUCKET_FIELDS, RowError, bucket_key
from batch.store.schema import ITEM_SCHEMA
from batch.plan.seeds import derive_row_seed
from batch.store.schema import RESERVED_COLUMNS

from conftest import write_manifest


@pytest.fixture
def spec():
    return parse_spec({
        "seed": 123,
        "defaults": {"height": 64, "width": 64, "num_inference_steps": 4, "guidance_scale": 7.5,
                     "negative_prompt": "ugly", "scheduler": "model"},
        "limits": {"max_side": 256, "max_images_per_row": 4},
    })


def _plan(rows, spec, schema=None):
    return plan(pa.Table.from_pylist(rows, schema=schema), spec, RESERVED_COLUMNS)


def _errors(p) -> dict:
    return {r["manifest_row"]: r["error"] for r in p.failed.to_pylist()}


# --- defaults, expansion and seeds ------------------------------------------------------------------------


def test_defaults_fill_missing_columns_and_nulls(spec):
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("negative_prompt", pa.string()),
                        ("guidance_scale", pa.float64()), ("num_inference_steps", pa.int64()),
                        ("height", pa.int64()), ("width", pa.int64()), ("scheduler", pa.string())])
    rows = [
        {"id": "a", "prompt": "cat", "negative_prompt": None, "guidance_scale": None, "num_inference_steps": None,
         "height": None, "width": None, "scheduler": None},
        {"id": "b", "prompt": "dog", "negative_prompt": "", "guidance_scale": 3.0, "num_inference_steps": 9,
         "height": 128, "width": 96, "scheduler": "ddim"},
    ]
    p = _plan(rows, spec, schema)
    assert p.failed.num_rows == 0 and p.num_rows == 2 and p.num_ok_rows == 2
    items = {r["id"]: r for r in p.items.to_pylist()}
    a, b = items["a"], items["b"]
    assert (a["negative_prompt"], a["guidance_scale"], a["num_inference_steps"]) == ("ugly", 7.5, 4)
    assert (a["height"], a["width"], a["scheduler"], a["num_images"]) == (64, 64, "model", 1)
    assert (b["negative_prompt"], b["guidance_scale"], b["num_inference_steps"]) == ("", 3.0, 9)
    assert (b["height"], b["width"], b["scheduler"]) == (128, 96, "ddim")


def test_only_required_columns(spec):
    p = _plan([{"id": "x", "prompt": "p"}], spec)
    assert p.items.num_rows == 1
    assert p.carried == []
    assert p.items.schema.equals(ITEM_SCHEMA.append(pa.field("_batch", pa.int64())))  # + the plan's GPU batch numbers
    item = p.items.to_pylist()[0]
    assert item["manifest_row"] == 0 and item["image_index"] == 0


def test_num_images_expansion_with_consecutive_seeds(spec):
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("num_images", pa.int32()),
                        ("seed", pa.int64())])
    rows = [{"id": "m", "prompt": "p", "num_images": 3, "seed": 1000},
            {"id": "d", "prompt": "q", "num_images": 2, "seed": None},
            {"id": "big", "prompt": "r", "num_images": 4, "seed": MAX_SEED - 1}]
    p = _plan(rows, spec, schema)
    assert p.failed.num_rows == 0
    got = sorted((r["id"], r["image_index"], r["row_seed"], r["seed"], r["seed_source"], r["num_images"])
                 for r in p.items.to_pylist())
    d = derive_row_seed(123, "d")
    big = MAX_SEED - 1
    assert got == sorted(
        [("m", k, 1000, 1000 + k, "manifest", 3) for k in range(3)]
        + [("d", k, d, d + k, "derived", 2) for k in range(2)]
        + [("big", k, big, big + k, "manifest", 4) for k in range(4)]
    )
    assert p.items.schema.field("seed").type == pa.uint64()


def test_derived_seed_depends_on_run_seed_and_id(spec):
    p1 = _plan([{"id": "a", "prompt": "p"}, {"id": "b", "prompt": "p"}], spec)
    seeds = {r["id"]: r["seed"] for r in p1.items.to_pylist()}
    assert seeds == {"a": derive_row_seed(123, "a"), "b": derive_row_seed(123, "b")}
    other = parse_spec({"seed": 124, "defaults": {"height": 64, "width": 64}})
    p2 = plan(pa.Table.from_pylist([{"id": "a", "prompt": "p"}]), other, RESERVED_COLUMNS)
    assert p2.items.column("seed").to_pylist() == [derive_row_seed(124, "a")]
    assert seeds["a"] != derive_row_seed(124, "a")


def test_seed_zero_is_a_manifest_seed_not_null(spec):
    p = _plan([{"id": "z", "prompt": "p", "seed": 0}], spec)
    item = p.items.to_pylist()[0]
    assert (item["seed"], item["seed_source"]) == (0, "manifest")


def test_items_sorted_by_bucket_and_stable(spec):
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("height", pa.int64()),
                        ("num_inference_steps", pa.int64()), ("scheduler", pa.string()),
                        ("num_images", pa.int64())])
    rows = [
        {"id": "r0", "prompt": "p", "height": 128, "num_inference_steps": 4, "scheduler": "ddim", "num_images": 1},
        {"id": "r1", "prompt": "p", "height": 64, "num_inference_steps": 6, "scheduler": "ddim", "num_images": 2},
        {"id": "r2", "prompt": "p", "height": 128, "num_inference_steps": 4, "scheduler": "ddim", "num_images": 2},
        {"id": "r3", "prompt": "p", "height": 64, "num_inference_steps": 4, "scheduler": "euler", "num_images": 1},
        {"id": "r4", "prompt": "p", "height": 64, "num_inference_steps": 6, "scheduler": "ddim", "num_images": 1},
        {"id": "r5", "prompt": "p", "height": 64, "num_inference_steps": 4, "scheduler": "ddim", "num_images": 1},
    ]
    items = _plan(rows, spec, schema).items.to_pylist()
    keys = [bucket_key(i) for i in items]
    assert keys == sorted(keys)
    assert BUCKET_FIELDS == ("height", "width", "num_inference_steps", "guidance_scale", "scheduler")
    # equal buckets are contiguous and keep manifest order, then image order
    order = [(i["id"], i["image_index"]) for i in items]
    assert order == [("r5", 0), ("r3", 0), ("r1", 0), ("r1", 1), ("r4", 0), ("r0", 0), ("r2", 0), ("r2", 1)]


# --- carried columns --------------------------------------------------------------------------------------


CARRIED = {
    "tags": pa.array([[1, 2], None, [], [7], [5]], pa.list_(pa.int32())),
    "meta": pa.array([{"k": 1, "s": "u"}, None, {"k": 3, "s": None}, {"k": 4, "s": "w"}, {"k": 5, "s": "v"}],
                     pa.struct([("k", pa.int64()), ("s", pa.string())])),
    "n": pa.array([1, None, 3, None, 5], pa.int64()),
    "f32": pa.array([1.5, 2.5, None, float("nan"), 0.0], pa.float32()),
    "flag": pa.array([True, False, None, True, False], pa.bool_()),
    "ts": pa.array([datetime.datetime(2020, 1, 1), None, datetime.datetime(2021, 6, 1, 12),
                    datetime.datetime(1999, 12, 31), None], pa.timestamp("ms", tz="UTC")),
    "dec": pa.array([decimal.Decimal("1.50"), None, decimal.Decimal("2.25"), decimal.Decimal("0"), None],
                    pa.decimal128(5, 2)),
    "nested": pa.array([[{"a": [1]}], None, [], [{"a": None}], [{"a": [2, 3]}]],
                       pa.list_(pa.struct([("a", pa.list_(pa.int16()))]))),
    "blob": pa.array([b"\x00\x01", None, b"", b"z", b"y"], pa.large_binary()),
    "cat": pa.array(["p", "q", "p", None, "r"]).dictionary_encode(),
}


def _carried_table():
    base = {
        "id": pa.array(["a", "b", "c", "d", "e"]),
        # row b: empty prompt, row d: bad height -> failed
        "prompt": pa.array(["one", "", "three", "four", "five"]),
        "height": pa.array([64, 64, None, 60, 64], pa.int64()),
        "num_images": pa.array([1, 1, 2, 1, 1], pa.int64()),
        **CARRIED,
    }
    return pa.table(base)


def test_carried_columns_keep_type_and_values(spec):
    table = _carried_table()
    p = plan(table, spec, RESERVED_COLUMNS)
    assert p.carried == list(CARRIED)
    assert sorted(_errors(p)) == [1, 3]

    for out in (p.items, p.failed):
        names = out.column_names
        assert names[-len(CARRIED):] == list(CARRIED)  # carried columns come last, in manifest order
        for name in CARRIED:
            assert out.schema.field(name).type == table.schema.field(name).type, name

    by_row = {i: {n: table.column(n)[i].as_py() for n in CARRIED} for i in range(table.num_rows)}
    for out in (p.items, p.failed):
        for r in out.to_pylist():
            expect = by_row[r["manifest_row"]]
            for name in CARRIED:
                if name == "f32" and expect[name] is not None and math.isnan(expect[name]):
                    assert math.isnan(r[name])
                else:
                    assert r[name] == expect[name], (name, r["manifest_row"])
    # row c expands into 2 items, both carrying row c's values
    c_items = [r for r in p.items.to_pylist() if r["id"] == "c"]
    assert len(c_items) == 2 and all(r["n"] == 3 and r["tags"] == [] for r in c_items)


def test_carried_columns_from_parquet_round_trip(spec, tmp_path):
    table = _carried_table()
    path = tmp_path / "m.parquet"
    pq.write_table(table, path)
    read = read_manifest(str(path))
    p = plan(read, spec, RESERVED_COLUMNS)
    assert [r["n"] for r in p.items.to_pylist() if r["id"] == "a"] == [1]
    assert p.items.schema.field("nested").type == table.schema.field("nested").type


def test_carried_column_with_reserved_name_fails_whole_manifest(spec):
    for name in ("status", "uri", "error", "row_seed", "manifest_row", "_pixels"):
        table = pa.table({"id": ["a"], "prompt": ["p"], name: ["x"]})
        with pytest.raises(ManifestError, match=name):
            plan(table, spec, RESERVED_COLUMNS)


def test_missing_required_column_names_it(spec):
    with pytest.raises(ManifestError, match="prompt"):
        plan(pa.table({"id": ["a"], "text": ["p"]}), spec, RESERVED_COLUMNS)
    with pytest.raises(ManifestError, match=r"\['id'\]"):
        plan(pa.table({"prompt": ["p"]}), spec, RESERVED_COLUMNS)


# --- bad rows: each fails only itself ---------------------------------------------------------------------


def _good(i: int) -> dict:
    return {"id": f"ok-{i}", "prompt": "fine"}


BAD_ROWS = [
    # (column type or None, bad value, field named in the error)
    ("prompt", pa.string(), "", "prompt"),
    ("prompt", pa.string(), "   ", "prompt"),
    ("prompt", pa.string(), None, "prompt"),
    ("guidance_scale", pa.float64(), 0.0, "guidance_scale"),
    ("guidance_scale", pa.float64(), -2.0, "guidance_scale"),
    ("guidance_scale", pa.float64(), float("nan"), "guidance_scale"),
    ("guidance_scale", pa.float64(), float("inf"), "guidance_scale"),
    ("guidance_scale", pa.float64(), float("-inf"), "guidance_scale"),
    ("num_inference_steps", pa.int64(), 0, "num_inference_steps"),
    ("num_inference_steps", pa.int64(), 1001, "num_inference_steps"),
    ("num_inference_steps", pa.float64(), float("nan"), "num_inference_steps"),
    ("num_inference_steps", pa.float64(), 4.5, "num_inference_steps"),
    ("height", pa.int64(), 60, "height"),
    ("height", pa.int64(), 0, "height"),
    ("width", pa.int64(), 264, "width"),  # > limits.max_side (256)
    ("width", pa.int64(), 100, "width"),
    ("num_images", pa.int64(), 0, "num_images"),
    ("num_images", pa.int64(), 5, "num_images"),  # > limits.max_images_per_row (4)
    ("scheduler", pa.string(), "heun", "scheduler"),
    ("scheduler", pa.string(), "DDIM", "scheduler"),
    ("seed", pa.int64(), -1, "seed"),
    ("seed", pa.uint64(), 2**63, "seed"),
    ("seed", pa.uint64(), 2**64 - 1, "seed"),
    ("id", pa.string(), "", "id"),
    ("id", pa.string(), None, "id"),
    ("id", pa.string(), "x" * 513, "id"),
    ("id", pa.string(), "a\x00b", "id"),
]


@pytest.mark.parametrize("column, type_, value, field", BAD_ROWS,
                         ids=[f"{c}={v!r}"[:40] for c, _, v, _ in BAD_ROWS])
def test_bad_row_fails_only_that_row(spec, column, type_, value, field):
    good_value = {"prompt": "fine", "guidance_scale": 5.0, "num_inference_steps": 4, "height": 64, "width": 64,
                  "num_images": 1, "scheduler": "ddim", "seed": 5, "id": None}[column]
    rows = []
    for i in range(4):
        r = _good(i)
        if column != "id":
            r[column] = good_value
        rows.append(r)
    bad = {"id": "bad", "prompt": "fine", column: value}
    rows.insert(2, bad)
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string())]
                       + ([(column, type_)] if column not in ("id", "prompt") else []))
    p = _plan(rows, spec, schema)
    errors = _errors(p)
    assert list(errors) == [2], errors
    assert errors[2].startswith(f"{field}: ") or f"; {field}: " in errors[2]
    assert p.num_ok_rows == 4
    assert sorted(p.items.column("manifest_row").to_pylist()) == [0, 1, 3, 4]
    failed = p.failed.to_pylist()[0]
    assert failed["image_index"] is None
    if column != "id":
        assert failed["id"] == "bad"
    else:  # the failed record keeps a string id as given, and null for a null one
        assert failed["id"] == value


def test_every_problem_of_a_row_is_listed(spec):
    p = _plan([{"id": "a", "prompt": "", "guidance_scale": float("nan"), "height": 61, "scheduler": "nope"}], spec)
    err = _errors(p)[0]
    for field in ("prompt", "guidance_scale", "height", "scheduler"):
        assert f"{field}: " in err


def test_whole_float_column_values_are_accepted_for_integer_fields(spec):
    p = _plan([{"id": "a", "prompt": "p", "num_inference_steps": 5.0, "height": 128.0}], spec)
    item = p.items.to_pylist()[0]
    assert (item["num_inference_steps"], item["height"]) == (5, 128)


def test_integer_guidance_column_becomes_float(spec):
    p = _plan([{"id": "a", "prompt": "p", "guidance_scale": 3}], spec)
    assert p.items.column("guidance_scale").to_pylist() == [3.0]


def test_prompt_longer_than_limit_fails(spec):
    tight = spec.model_copy(update={"limits": spec.limits.model_copy(update={"max_prompt_chars": 5})})
    p = plan(pa.Table.from_pylist([{"id": "a", "prompt": "123456"}, {"id": "b", "prompt": "12345"}]), tight,
             RESERVED_COLUMNS)
    assert list(_errors(p)) == [0] and _errors(p)[0].startswith("prompt: ")


def test_duplicate_ids_fail_every_occurrence(spec):
    rows = [{"id": "dup", "prompt": "a"}, {"id": "x", "prompt": "b"}, {"id": "dup", "prompt": "c"},
            {"id": "y", "prompt": "d"}, {"id": "dup", "prompt": "e"}]
    p = _plan(rows, spec)
    errors = _errors(p)
    assert sorted(errors) == [0, 2, 4]
    assert all(e.startswith("id: duplicate id") for e in errors.values())
    assert all("[0, 2, 4]" in e for e in errors.values())
    assert sorted(p.items.column("id").to_pylist()) == ["x", "y"]


def test_duplicate_of_an_invalid_row_still_fails_the_valid_one(spec):
    p = _plan([{"id": "d", "prompt": ""}, {"id": "d", "prompt": "ok"}, {"id": "e", "prompt": "ok"}], spec)
    assert sorted(_errors(p)) == [0, 1]
    assert p.items.column("id").to_pylist() == ["e"]


def test_non_string_id_column_fails_every_row_naming_id(spec):
    p = plan(pa.table({"id": pa.array([1, 2], pa.int64()), "prompt": ["a", "b"]}), spec, RESERVED_COLUMNS)
    assert p.items.num_rows == 0
    errors = _errors(p)
    assert sorted(errors) == [0, 1]
    assert all(e.startswith("id: ") for e in errors.values())
    assert p.failed.column("id").to_pylist() == [None, None]


def test_non_string_prompt_column_fails_rows(spec):
    p = plan(pa.table({"id": ["a"], "prompt": pa.array([5], pa.int64())}), spec, RESERVED_COLUMNS)
    assert _errors(p)[0].startswith("prompt: ")


def test_empty_manifest(spec):
    p = plan(pa.table({"id": pa.array([], pa.string()), "prompt": pa.array([], pa.string()),
                       "extra": pa.array([], pa.int8())}), spec, RESERVED_COLUMNS)
    assert p.num_rows == 0 and p.items.num_rows == 0 and p.failed.num_rows == 0
    assert p.items.schema.field("extra").type == pa.int8()


def test_row_error_message_format():
    err = RowError([("height", "must be a multiple of 8, got 60"), ("seed", "bad, got -1")])
    assert str(err) == "height: must be a multiple of 8, got 60; seed: bad, got -1"
    assert err.problems[0] == ("height", "must be a multiple of 8, got 60")


# --- failure_reason ---------------------------------------------------------------------------------------


def test_failure_reason_strips_values():
    assert failure_reason("height: must be a multiple of 8, got 60") == "height: must be a multiple of 8"
    assert failure_reason("prompt: missing or empty, got ''; guidance_scale: must be a finite number > 0, got nan") \
        == "prompt: missing or empty; guidance_scale: must be a finite number > 0"
    assert failure_reason("RuntimeError: out of memory") == "RuntimeError: out of memory"


def test_failure_reason_groups_equal_problems_across_rows(spec):
    p = _plan([{"id": "a", "prompt": "p", "height": 60}, {"id": "b", "prompt": "p", "height": 100},
               {"id": "c", "prompt": "p", "seed": -5}], spec, pa.schema([("id", pa.string()),
                                                                        ("prompt", pa.string()),
                                                                        ("height", pa.int64()),
                                                                        ("seed", pa.int64())]))
    reasons = [failure_reason(e) for e in _errors(p).values()]
    assert reasons[0] == reasons[1] == "height: must be a multiple of 8"
    assert reasons[2].startswith("seed: ") and "-5" not in reasons[2]


def test_failure_reason_strips_duplicate_ids_containing_separator(spec):
    """Every duplicate-id failure counts under one reason, whatever the id's text (even with "; ")."""
    p = _plan([{"id": "a; b", "prompt": "p"}, {"id": "a; b", "prompt": "q"}], spec)
    reasons = {failure_reason(e) for e in _errors(p).values()}
    assert reasons == {"id: duplicate id"}


# --- read_manifest ----------------------------------------------------------------------------------------


def test_read_manifest_parquet_file(tmp_path):
    path = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "p", "k": 1}])
    table = read_manifest(path)
    assert table.column_names == ["id", "prompt", "k"]
    assert table.to_pylist() == [{"id": "a", "prompt": "p", "k": 1}]
    assert read_manifest("file://" + path).num_rows == 1


def test_read_manifest_folder_of_parts(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    write_manifest(folder / "part-0.parquet", [{"id": "a", "prompt": "p"}])
    write_manifest(folder / "part-1.parquet", [{"id": "b", "prompt": "q"}])
    assert sorted(read_manifest(str(folder)).column("id").to_pylist()) == ["a", "b"]


def test_read_manifest_not_parquet(tmp_path):
    path = tmp_path / "m.parquet"
    path.write_text("id,prompt\na,hello\n")
    with pytest.raises(ManifestError, match="not a readable Parquet"):
        read_manifest(str(path))


def test_read_manifest_empty_and_truncated_files(tmp_path):
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    with pytest.raises(ManifestError, match="not a readable Parquet"):
        read_manifest(str(empty))
    good = write_manifest(tmp_path / "good.parquet", [{"id": "a", "prompt": "p"}])
    data = open(good, "rb").read()
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(data[: len(data) // 2] + data[-8:])  # keeps the magic footer, loses the rest
    with pytest.raises(ManifestError, match="truncated.parquet"):
        read_manifest(str(truncated))


def test_read_manifest_missing_path(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(str(tmp_path / "absent.parquet"))


def test_read_manifest_unknown_protocol():
    with pytest.raises(ManifestError):
        read_manifest("nosuchproto://bucket/m.parquet")


def test_read_manifest_memory_filesystem():
    import fsspec

    fs = fsspec.filesystem("memory")
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"id": ["m"], "prompt": ["p"]}), buf)
    fs.pipe_file("/sdbatch-test-manifest/m.parquet", buf.getvalue().to_pybytes())
    try:
        assert read_manifest("memory://sdbatch-test-manifest/m.parquet").column("id").to_pylist() == ["m"]
    finally:
        fs.rm("/sdbatch-test-manifest", recursive=True)


def test_whole_float_seeds_are_accepted_and_fractional_ones_fail(spec):
    """pandas turns an int column with nulls into float64: whole, exact floats are valid seeds."""
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("seed", pa.float64())])
    p = _plan([{"id": "a", "prompt": "p", "seed": 5.0}, {"id": "b", "prompt": "p", "seed": None},
               {"id": "c", "prompt": "p", "seed": 2.5}, {"id": "d", "prompt": "p", "seed": 2.0**60}], spec, schema)
    items = {r["id"]: r for r in p.items.to_pylist()}
    assert items["a"]["seed"] == 5 and items["a"]["seed_source"] == "manifest"
    assert items["b"]["seed_source"] == "derived"
    errors = _errors(p)
    assert set(errors) == {2, 3} and all(e.startswith("seed:") for e in errors.values())

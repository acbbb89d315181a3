"""Output layout (batch.store.io): safe object keys, put/get on local and memory filesystems, PNG, conform."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from batch.spec.config import parse_spec
from batch.store.schema import ITEM_SCHEMA
from batch.plan.manifest import plan
from batch.store.io import IMAGES_DIR, RetryPolicy, image_key, is_transient, open_output, retrying
from batch.store.schema import METADATA_SCHEMA, RESERVED_COLUMNS, RESULT_FIELDS, conform
from batch.store.commit import compact, metadata_parts, part_key, read_metadata, read_parts
from batch.store.formats import OutputFormat, decode_image, encode_image
from batch.store import io as storage_mod

HOSTILE_IDS = [
    "../../etc/passwd",
    "/abs/path",
    "a/../../b",
    "%2e%2e%2f",
    "a\u2215b",
    "x\x00y",
    "z" * 2000,
    "",
    "caf\u00e9 \u732b \U0001f600",
    "..",
    ".",
    "...",
    "a\\..\\..\\b",
    "C:\\Windows\\system32",
    "file:///etc/passwd",
    "s3://other-bucket/key",
    "~/x",
    "a/b/c",
    "a b",
    "a_b",
    "a-b",
    "A",
    "a",
    "\ud800",  # lone surrogate: not encodable as UTF-8 without surrogatepass
    "\n\t",
    "-",
    "_",
    "images",
    "0",
]


@pytest.mark.parametrize("row_id", HOSTILE_IDS, ids=lambda s: repr(s)[:30])
def test_image_key_stays_under_images(row_id):
    for k in (0, 3):
        key = image_key(row_id, k)
        assert key.startswith(IMAGES_DIR + "/")
        assert not key.startswith("/")
        parts = key.split("/")
        assert ".." not in parts and "." not in parts and "" not in parts
        assert ".." not in key
        assert len(parts) == 3  # images/<name>/<k>.png: the id can never add a level
        assert parts[2] == f"{k}.png"
        assert "\\" not in key and "\x00" not in key and ":" not in key
        assert key.isascii()
        assert len(key) < 120


def test_image_keys_distinct_for_distinct_ids():
    ids = HOSTILE_IDS + ["a/b", "a\\b", "a:b", "a.b", "a b ", "z" * 2001, "z" * 1999]
    keys = [image_key(i, 0) for i in ids]
    assert len(set(keys)) == len(set(ids))


def test_image_key_distinct_per_image_and_deterministic():
    assert image_key("row", 0) != image_key("row", 1)
    assert image_key("row", 2) == image_key("row", 2)
    assert image_key("row", 0, ext="webp").endswith("/0.webp")
    assert image_key("my-row_1", 0).startswith("images/my-row_1-")  # readable slug kept


def test_output_put_get_local(tmp_path):
    out = open_output(str(tmp_path / "run"))
    key = image_key("../../etc/passwd", 0)
    out.put(key, b"\x89PNG data")
    assert out.get(key) == b"\x89PNG data"
    assert out.exists(key)
    assert (tmp_path / "run" / key).read_bytes() == b"\x89PNG data"
    # nothing written outside the prefix, and no leftover temp files
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files == [tmp_path / "run" / key]
    out.put(key, b"second")  # overwrite is whole
    assert out.get(key) == b"second"
    assert out.uri(key).endswith("/run/" + key)
    assert out.list(IMAGES_DIR) == [key]
    assert out.list("nothing-here") == []


def test_output_put_get_memory():
    root = f"memory://sdbatch-test-{uuid.uuid4().hex}/run"
    out = open_output(root)
    try:
        assert out.is_process_local
        out.put("images/x/0.png", b"abc")
        out.put_json("run.json", {"b": 1, "a": [1, 2]})
        assert out.get("images/x/0.png") == b"abc"
        assert out.get_json("run.json") == {"a": [1, 2], "b": 1}
        assert out.uri("images/x/0.png").startswith("memory://")
        assert sorted(out.list("")) == ["images/x/0.png", "run.json"]
        # the same URI opened again sees the same objects (one in-process store)
        assert open_output(root).get("images/x/0.png") == b"abc"
    finally:
        out.fs.rm(out.root, recursive=True)


def test_local_output_is_not_process_local(tmp_path):
    assert not open_output(str(tmp_path)).is_process_local


@pytest.mark.parametrize("key", ["../x", "a/../../b", "images/../../x", "/etc/passwd", "..", "a/.."])
def test_output_path_refuses_escaping_keys(tmp_path, key):
    out = open_output(str(tmp_path / "run"))
    with pytest.raises(ValueError, match="outside the output prefix"):
        out.path(key)
    with pytest.raises(ValueError):
        out.put(key, b"x")
    assert not any(tmp_path.rglob("*"))


def test_output_path_joins_under_root(tmp_path):
    out = open_output(str(tmp_path / "run") + "/")
    assert out.path("images/a/0.png") == out.root.rstrip("/") + "/images/a/0.png"


def _rows(*recs):
    """Metadata rows from (manifest_row, image_index, status, attempt) tuples."""
    return conform(pa.Table.from_pylist(
        [{"id": f"r{r}", "manifest_row": r, "image_index": k, "status": st, "attempt": att} for r, k, st, att in recs],
        schema=pa.schema([("id", pa.string()), ("manifest_row", pa.int64()), ("image_index", pa.int32()),
                          ("status", pa.string()), ("attempt", pa.string())])), pa.schema([]))


def test_put_parquet_and_read_metadata(tmp_path):
    out = open_output(str(tmp_path / "run"))
    assert read_metadata(str(tmp_path / "run")).schema.equals(METADATA_SCHEMA)
    out.put_parquet(part_key("A", 0), _rows((0, 0, "ok", "A")))
    out.put_parquet(part_key("A", 1), _rows((1, None, "failed", "A")))
    meta = read_metadata(str(tmp_path / "run"))
    assert meta.column("id").to_pylist() == ["r0", "r1"]
    assert meta.schema.equals(METADATA_SCHEMA)


def test_latest_attempt_wins_per_image_and_leftover_temp_parts_are_ignored(tmp_path):
    out = open_output(str(tmp_path / "run"))
    out.put_parquet(part_key("20260101T000000000000Z-aaaaaa", 0),
                    _rows((0, 0, "ok", "20260101T000000000000Z-aaaaaa"), (1, 0, "failed", "20260101T000000000000Z-aaaaaa"),
                          (2, None, "failed", "20260101T000000000000Z-aaaaaa")))
    out.put_parquet(part_key("20260102T000000000000Z-bbbbbb", 0),
                    _rows((1, 0, "ok", "20260102T000000000000Z-bbbbbb"), (1, 1, "ok", "20260102T000000000000Z-bbbbbb")))
    (tmp_path / "run" / "metadata" / "part-x.parquet.tmp-123").write_bytes(b"partial write")
    meta = read_metadata(out)
    got = sorted((r["manifest_row"], r["image_index"], r["status"]) for r in meta.to_pylist())
    assert got == [(0, 0, "ok"), (1, 0, "ok"), (1, 1, "ok"), (2, None, "failed")]
    assert len(read_parts(out)) == 5  # the raw parts still hold the superseded record


def test_compaction_keeps_each_image_once_and_survives_a_crash_between_write_and_delete(tmp_path):
    out = open_output(str(tmp_path / "run"))
    for n in range(5):
        att = f"2026010{n + 1}T000000000000Z-{n:06d}"
        out.put_parquet(part_key(att, 0), _rows((n, 0, "failed" if n == 2 else "ok", att), (0, 0, "ok", att)))
    before = sorted(map(str, read_metadata(out).to_pylist()))
    assert compact(out, rows_per_part=3) == (5, 2)
    assert len(metadata_parts(out)) == 2
    assert sorted(map(str, read_metadata(out).to_pylist())) == before
    # a crash after the compacted parts are written but before the old ones go: readers still see one of each
    out.put_parquet(part_key("20260101T000000000000Z-000000", 0), _rows((0, 0, "ok", "20260101T000000000000Z-000000")))
    meta = read_metadata(out)
    assert meta.num_rows == 5 and sorted(meta.column("manifest_row").to_pylist()) == [0, 1, 2, 3, 4]


class _Flaky(Exception):
    pass


def test_transient_errors_are_retried_with_backoff_and_permanent_ones_are_not(monkeypatch):
    sleeps = []
    monkeypatch.setattr(storage_mod.time, "sleep", sleeps.append)
    calls = []

    def flaky(n_failures, err):
        def fn():
            calls.append(1)
            if len(calls) <= n_failures:
                raise err
            return "done"
        return fn

    assert retrying(flaky(3, OSError("503 Service Unavailable")), policy=RetryPolicy(attempts=4)) == "done"
    assert len(sleeps) == 3 and sleeps[0] < sleeps[2]  # growing backoff
    calls.clear()
    with pytest.raises(TimeoutError):  # bounded: the last error surfaces
        retrying(flaky(10, TimeoutError("read timed out")), policy=RetryPolicy(attempts=3))
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(FileNotFoundError):  # permanent: no retry at all
        retrying(flaky(1, FileNotFoundError("nope")), policy=RetryPolicy(attempts=5))
    assert len(calls) == 1
    assert is_transient(OSError("An error occurred (SlowDown) when calling the PutObject operation"))
    assert is_transient(ConnectionError("reset")) and not is_transient(PermissionError("403 Forbidden"))
    assert not is_transient(_Flaky("some bug"))


# --- PNG ----------------------------------------------------------------------------------------------------


def _png(pixels):
    return encode_image(pixels, OutputFormat(image_format="png"))


@pytest.mark.parametrize("shape", [(1, 1, 3), (64, 64, 3), (8, 24, 3), (37, 5, 3)])
def test_png_round_trip_exact(shape):
    rng = np.random.default_rng(sum(shape))
    pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
    data = _png(pixels)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    back = decode_image(data)
    assert back.dtype == np.uint8 and back.shape == shape
    assert np.array_equal(back, pixels)
    assert _png(pixels.copy()) == data  # deterministic bytes


def test_png_extreme_values_and_non_contiguous():
    pixels = np.zeros((16, 16, 3), dtype=np.uint8)
    pixels[::2] = 255
    pixels[:, :, 1] = np.arange(16, dtype=np.uint8)[None, :] * 17
    assert np.array_equal(decode_image(_png(pixels)), pixels)
    view = pixels[:, ::-1]  # negative strides
    assert np.array_equal(decode_image(_png(view)), view)


# --- conform ------------------------------------------------------------------------------------------------


def test_conform_adds_null_columns_and_keeps_carried_last():
    spec = parse_spec({"defaults": {"height": 64, "width": 64}})
    table = pa.table({"id": ["a", "b"], "prompt": ["p", "q"],
                      "tags": pa.array([[1], None], pa.list_(pa.int32())),
                      "note": pa.array(["x", None])})
    p = plan(table, spec, RESERVED_COLUMNS)
    carried = pa.schema([table.schema.field("tags"), table.schema.field("note")])
    out = conform(p.items, carried)
    assert out.column_names == METADATA_SCHEMA.names + ["tags", "note"]
    assert out.schema.equals(pa.schema(list(METADATA_SCHEMA) + list(carried)))
    for name, _ in RESULT_FIELDS:
        assert out.column(name).null_count == 2
    assert out.column("id").to_pylist() == p.items.column("id").to_pylist()
    assert out.column("seed").to_pylist() == p.items.column("seed").to_pylist()
    assert out.column("tags").to_pylist() == [[1], None]
    assert out.column("note").to_pylist() == ["x", None]


def test_conform_casts_to_metadata_types_and_drops_private_columns():
    table = pa.table({"id": ["a"], "seed": pa.array([5], pa.int64()), "image_index": pa.array([0], pa.int64()),
                      "_pixels": pa.array([b"raw"]), "file_size": pa.array([10], pa.int32())})
    out = conform(table, pa.schema([]))
    assert out.schema.field("seed").type == pa.uint64()
    assert out.schema.field("image_index").type == pa.int32()
    assert out.schema.field("file_size").type == pa.int64()
    assert out.column("seed").to_pylist() == [5]
    assert "_pixels" not in out.column_names


def test_metadata_schema_contains_item_schema_and_reserved_names():
    assert METADATA_SCHEMA.names[: len(ITEM_SCHEMA)] == ITEM_SCHEMA.names
    assert {"status", "error", "uri", "sha256", "_pixels", "_png"} <= RESERVED_COLUMNS
    assert len(set(METADATA_SCHEMA.names)) == len(METADATA_SCHEMA.names)


def test_local_temp_files_are_hidden_from_readers_and_found_as_stale(tmp_path):
    from batch.store.commit import stale_temp_files
    from batch.store.io import temp_path

    tmp = Path(temp_path(str(tmp_path / "run" / "shards" / "abc.tar")))
    assert tmp.parent == tmp_path / "run" / "shards" and tmp.name.startswith(".abc.tar.tmp-")  # "." : Ray skips it
    tmp.parent.mkdir(parents=True)
    tmp.write_bytes(b"partial shard")
    assert stale_temp_files(open_output(str(tmp_path / "run"))) == [f"shards/{tmp.name}"]

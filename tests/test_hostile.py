"""Hostile manifests: every bad row fails alone with a row-and-field reason, good rows are untouched, and
nothing is written outside the output prefix. Also the allowed-input-location rules, unit by unit."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest
from conftest import write_manifest

from batch.spec.config import parse_spec
from batch.run.job import run_job
from batch.plan.locations import InputLocationError, allowed_prefixes, check_input_uri, manifest_folder
from batch.plan.rows import check_id
from batch.store.commit import read_metadata

LONG_PROMPT = "a very detailed description of a castle on a hill " * 200  # 10,000 characters

GOOD = [
    {"id": "good-1", "prompt": "a red cube"},
    {"id": "good-2", "prompt": "a blue sphere", "num_images": 2},
    {"id": "café ☕ 1.5", "prompt": "unicode is fine in ids"},
    {"id": "long-prompt", "prompt": LONG_PROMPT},
]
# (row, expected error prefix)
HOSTILE = [
    ({"id": "../../etc/passwd", "prompt": "x"}, "id: must not contain path separators"),
    ({"id": "/abs/path", "prompt": "x"}, "id: must not contain path separators"),
    ({"id": "..%2F..%2Fescape", "prompt": "x"}, "id: must not contain path separators"),
    ({"id": "%252e%252e%252fx", "prompt": "x"}, "id: must not contain path separators"),
    ({"id": "a\u2215b", "prompt": "x"}, "id: must not contain path separators"),
    ({"id": "a\uff0fb", "prompt": "x"}, "id: must not contain path separators"),
    ({"id": "..", "prompt": "x"}, "id: must not be a path"),
    ({"id": "nul\x00byte", "prompt": "x"}, "id: contains a control or separator character U+0000"),
    ({"id": "line\nbreak", "prompt": "x"}, "id: contains a control or separator character U+000A"),
    ({"id": "x" * 600, "prompt": "x"}, "id: longer than 512 characters"),
    ({"id": "too-long-prompt", "prompt": LONG_PROMPT + "!"}, "prompt: longer than limits.max_prompt_chars"),
    ({"id": "wrong-type", "prompt": "x", "height": "64"}, "height: must be an integer, got '64'"),
    ({"id": "nan", "prompt": "x", "guidance_scale": float("nan")}, "guidance_scale: must be a finite number"),
    ({"id": "inf", "prompt": "x", "guidance_scale": float("inf")}, "guidance_scale: must be a finite number"),
    ({"id": "neg-scale", "prompt": "x", "guidance_scale": -3.0}, "guidance_scale: must be a finite number"),
    ({"id": "neg-seed", "prompt": "x", "seed": -1}, "seed: must be an integer in [0, 2**63)"),
    ({"id": "zero-images", "prompt": "x", "num_images": 0}, "num_images: must be in [1, 4]"),
    ({"id": "huge-images", "prompt": "x", "num_images": 10**9}, "num_images: must be in [1, 4]"),
    ({"id": "twin", "prompt": "one"}, "id: duplicate id"),
    ({"id": "twin", "prompt": "two"}, "id: duplicate id"),
    ({"id": None, "prompt": "x"}, "id: must be a non-empty string"),
]
SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("num_images", pa.int64()),
                    ("height", pa.string()), ("guidance_scale", pa.float64()), ("seed", pa.int64())])


def _tree(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.e2e
def test_hostile_manifest_fails_bad_rows_only_and_writes_nowhere_else(tmp_path, ray_session):
    manifest = write_manifest(tmp_path / "m.parquet", GOOD + [r for r, _ in HOSTILE], SCHEMA)
    before = _tree(tmp_path)
    spec = parse_spec({"model": "tiny", "device": "cpu", "dtype": "float32", "manifest": manifest,
                       "output": str(tmp_path / "run" / "out"), "progress": False, "max_failed_fraction": 1.0,
                       "limits": {"max_images_per_row": 4},
                       "defaults": {"height": 32, "width": 32, "num_inference_steps": 2}})
    summary = run_job(spec)
    meta = read_metadata(spec.output).to_pylist()

    ok = sorted((r["id"], r["image_index"]) for r in meta if r["status"] == "ok")
    assert ok == sorted([("good-1", 0), ("good-2", 0), ("good-2", 1), ("café ☕ 1.5", 0), ("long-prompt", 0)])
    failed = {r["manifest_row"]: r["error"] for r in meta if r["status"] == "failed"}
    assert len(failed) == len(HOSTILE)
    for i, (_, expected) in enumerate(HOSTILE):
        assert failed[len(GOOD) + i].startswith(expected), (i, failed[len(GOOD) + i])
    assert (summary.rows_ok, summary.rows_failed) == (len(GOOD), len(HOSTILE))

    long_row = next(r for r in meta if r["id"] == "long-prompt")
    assert long_row["warnings"].startswith("prompt: truncated to 77 tokens (had ")
    assert all(r["warnings"] is None for r in meta if r["id"] in ("good-1", "good-2"))

    # nothing outside the output prefix changed; everything new is under it
    after = _tree(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("run/out/")} == before
    assert all(k.startswith(("run/out/images/", "run/out/metadata/", "run/out/logs/", "run/out/manifest/rowhash-"))
               or k in ("run/out/run.json", "run/out/_SUCCESS", "run/out/_LEASE", "run/out/README.md")
               for k in after if k not in before)


@pytest.mark.parametrize("rid", ["a", "row-0001", "a.b.c", "name with spaces", "日本語", "x" * 512])
def test_ordinary_ids_pass(rid):
    assert check_id(rid) is None


# --- allowed input locations ---------------------------------------------------------------------------


@pytest.fixture()
def layout(tmp_path):
    (tmp_path / "data" / "imgs").mkdir(parents=True)
    (tmp_path / "data" / "imgs" / "a.png").write_bytes(b"png")
    (tmp_path / "data" / "m.parquet").write_bytes(b"manifest")
    (tmp_path / "secret.txt").write_text("secret")
    os.symlink(tmp_path / "secret.txt", tmp_path / "data" / "imgs" / "link.png")
    return tmp_path


def test_default_allows_only_the_manifest_folder(layout):
    manifest = str(layout / "data" / "m.parquet")
    allowed = allowed_prefixes([], manifest)
    base = manifest_folder(manifest)
    assert allowed == [str(layout / "data")]
    assert check_input_uri("imgs/a.png", allowed, base) == str(layout / "data" / "imgs" / "a.png")
    assert check_input_uri(f"file://{layout}/data/imgs/a.png", allowed, base).endswith("imgs/a.png")
    for uri in (str(layout / "secret.txt"), "../secret.txt", "imgs/../../secret.txt", f"file://{layout}/secret.txt",
                "imgs/link.png",  # a symlink pointing out of the folder is judged by its target
                "/etc/passwd", "s3://bucket/x.png", "http://169.254.169.254/latest/meta-data"):
        with pytest.raises(InputLocationError, match="outside the allowed input locations"):
            check_input_uri(uri, allowed, base)
    # a sibling folder whose name merely starts with the allowed one is not inside it
    (layout / "data-evil").mkdir()
    with pytest.raises(InputLocationError):
        check_input_uri(str(layout / "data-evil" / "x.png"), allowed, base)


def test_listed_remote_prefixes_and_dot_segments(layout):
    allowed = allowed_prefixes(["s3://bucket/images/", "memory://in"], None)
    assert check_input_uri("s3://bucket/images/a/b.png", allowed) == "s3://bucket/images/a/b.png"
    assert check_input_uri("memory://in/x.png", allowed) == "memory:///in/x.png"  # the filesystem's own path form
    for uri in ("s3://bucket/images/../private/k.png", "s3://bucket/images/%2e%2e/private/k.png",
                "s3://bucket/imagesX/a.png", "s3://other/images/a.png", "gs://bucket/images/a.png", ""):
        with pytest.raises(InputLocationError):
            check_input_uri(uri, allowed)


def test_image_uris_outside_allowed_locations_fail_their_rows_at_planning(layout):
    from batch.plan.manifest import plan
    from batch.store.schema import RESERVED_COLUMNS

    manifest = str(layout / "data" / "m.parquet")
    table = pa.Table.from_pylist([
        {"id": "inside", "image_uri": "imgs/a.png"},
        {"id": "abs-outside", "image_uri": str(layout / "secret.txt")},
        {"id": "dotdot", "image_uri": "imgs/../../secret.txt"},
        {"id": "symlink", "image_uri": "imgs/link.png"},
        {"id": "remote", "image_uri": "s3://someone-elses-bucket/x.png"},
        {"id": "metadata-service", "image_uri": "http://169.254.169.254/latest/meta-data"},
    ])
    p = plan(table, parse_spec({"task": "variation", "manifest": manifest}), RESERVED_COLUMNS)
    assert p.items.column("image_uri").to_pylist() == [str(layout / "data" / "imgs" / "a.png")]  # resolved
    errors = dict(zip(p.failed.column("id").to_pylist(), p.failed.column("error").to_pylist()))
    assert set(errors) == {"abs-outside", "dotdot", "symlink", "remote", "metadata-service"}
    assert all(e.startswith("image_uri: ") and "outside the allowed input locations" in e for e in errors.values())
    listed = plan(table, parse_spec({"task": "variation", "manifest": manifest,
                                     "allowed_input_prefixes": [str(layout), "s3://someone-elses-bucket/"]}),
                  RESERVED_COLUMNS)
    assert sorted(listed.items.column("id").to_pylist()) == ["abs-outside", "dotdot", "inside", "remote", "symlink"]

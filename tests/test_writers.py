"""Output formats in-process (no Ray): every container and encoding written, read back and compared with
the generated pixels that the default file output stores."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import batch.run.stages as stages
from batch.spec.base import SpecError
from batch.spec.config import parse_spec
from batch.plan.manifest import plan
from batch.store.schema import RESERVED_COLUMNS
from batch.store.io import open_output
from batch.store.formats import (SAMPLE_FIELDS, WRITERS, ImageReader, OutputFormat, Sample, Stored, apply_driver_writes,
                                  decode_image, encode_image, format_warnings, png_parameters, sample_key, stats_key)
from batch.store.schema import METADATA_SCHEMA
from PIL import Image


@pytest.fixture(scope="module")
def generated():
    sampler = stages.Sampler(stages.SamplerSettings(model="tiny", dtype="float32", device="cpu", batch_size=2))
    spec = parse_spec({"defaults": {"height": 64, "width": 64, "num_inference_steps": 3}})
    rows = [{"id": "a", "prompt": "a red cube", "num_images": 2}, {"id": "b", "prompt": "a blue sphere"}]
    return sampler(plan(pa.Table.from_pylist(rows), spec, RESERVED_COLUMNS).items)


def _pixels(generated):
    return {(r["id"], r["image_index"]): np.frombuffer(r["_pixels"], np.uint8).reshape(64, 64, 3)
            for r in generated.to_pylist()}


def _write(generated, out, **fmt):
    return stages.encode_and_write(generated, stages.WriterSettings(out, fmt=OutputFormat(**fmt))).to_pylist()


@pytest.fixture(scope="module")
def files_output(generated, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("files") / "out")
    rows = _write(generated, out)
    reader = ImageReader()
    return {(r["id"], r["image_index"]): reader.read(r) for r in rows}


def test_files_png_is_the_generated_pixels(generated, files_output):
    expected = _pixels(generated)
    assert set(files_output) == set(expected) and len(expected) == 3
    for k, img in files_output.items():
        assert np.array_equal(img, expected[k])


@pytest.mark.parametrize("output_format", ["files", "webdataset", "parquet"])
@pytest.mark.parametrize("image_format", ["png", "webp"])  # webp lossless by default
def test_lossless_formats_read_back_equal_to_file_output(generated, files_output, tmp_path, output_format,
                                                         image_format):
    out_uri = str(tmp_path / "out")
    rows = _write(generated, out_uri, output_format=output_format, image_format=image_format)
    reader = ImageReader()
    assert all(r["status"] == "ok" for r in rows)
    for r in rows:
        assert np.array_equal(reader.read(r), files_output[(r["id"], r["image_index"])])
        assert r["sha256"] == hashlib.sha256(reader.read_bytes(r)).hexdigest()
        assert r["file_size"] == len(reader.read_bytes(r))
    out = open_output(out_uri)
    ext = {"png": "png", "webp": "webp"}[image_format]
    if output_format == "files":
        assert all(r["member"] is None and r["uri"].endswith(f".{ext}") for r in rows)
        return
    shards = [k for k in out.list("shards") if "/_stats/" not in k]
    assert len(shards) == 1 and all(r["uri"] == out.uri(shards[0]) for r in rows)  # one shard per block
    assert out.list("shards/_stats") == [stats_key(shards[0])]
    stats = out.get_json(stats_key(shards[0]))
    assert stats["written"] == 3 and stats["shard"] == shards[0] and stats["image_format"] == image_format
    data = out.get(shards[0])
    if output_format == "webdataset":
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            names = tar.getnames()
            meta = {n: json.loads(tar.extractfile(n).read()) for n in names if n.endswith(".json")}
        keys = [r["member"].rsplit(".", 1)[0] for r in rows]
        assert sorted(names) == sorted(f"{k}.{e}" for k in keys for e in (ext, "json", "txt"))
        for r, k in zip(rows, keys):
            assert "." not in k and "/" not in k  # WebDataset splits keys at the first dot
            assert meta[f"{k}.json"]["id"] == r["id"] and meta[f"{k}.json"]["seed"] == r["seed"]
    else:
        table = pq.read_table(io.BytesIO(data))
        assert {"key", "caption", "id", "image_index", "seed", ext} <= set(table.column_names)
        assert sorted(table.column("key").to_pylist()) == sorted(r["member"] for r in rows)


def test_shard_names_are_deterministic(generated, tmp_path):
    a = _write(generated, str(tmp_path / "a"), output_format="webdataset")
    b = _write(generated, str(tmp_path / "b"), output_format="webdataset")
    name = lambda rows: {r["uri"].rsplit("/", 1)[1] for r in rows}  # noqa: E731
    assert name(a) == name(b) and len(name(a)) == 1
    assert open_output(str(tmp_path / "a")).list("shards") == open_output(str(tmp_path / "b")).list("shards")
    assert (tmp_path / "a" / "shards").is_dir() and not list((tmp_path / "a").rglob("*.tmp-*"))


def test_jpeg_is_lossy_close_and_warned(generated, files_output, tmp_path):
    rows = _write(generated, str(tmp_path / "out"), output_format="parquet", image_format="jpeg", jpeg_quality=90)
    reader = ImageReader()
    for r in rows:
        img, ref = reader.read(r).astype(int), files_output[(r["id"], r["image_index"])].astype(int)
        assert img.shape == ref.shape and r["uri"].endswith(".parquet")
        assert np.abs(img - ref).mean() < 20  # close, but JPEG does not keep pixels
    assert format_warnings(OutputFormat(image_format="jpeg"))[0].startswith("image_format=jpeg")
    assert "FID" in format_warnings(OutputFormat(image_format="webp", webp_lossless=False))[0]
    assert format_warnings(OutputFormat(image_format="webp")) == format_warnings(OutputFormat()) == []


def test_driver_side_writes_for_process_local_storage(generated, files_output, tmp_path):
    out_uri = str(tmp_path / "out")
    result = stages.encode_and_write(generated, stages.WriterSettings(out_uri, upload=False, fmt=OutputFormat("webdataset")))
    assert not (tmp_path / "out").exists()  # nothing written by the stage itself
    assert all(r["uri"] is None and r["_uri_key"].startswith("shards/") for r in result.to_pylist())
    written = apply_driver_writes(open_output(out_uri), result)
    assert "_puts" not in written.column_names and "_uri_key" not in written.column_names
    reader = ImageReader()
    for r in written.to_pylist():
        assert np.array_equal(reader.read(r), files_output[(r["id"], r["image_index"])])


def test_a_failed_shard_put_fails_every_image_in_it(generated, tmp_path):
    (tmp_path / "ro").write_text("a file where the output folder should be")
    rows = _write(generated, str(tmp_path / "ro"), output_format="parquet")
    assert all(r["status"] == "failed" and r["uri"] is None and r["member"] is None and r["error"] for r in rows)


def test_spec_fields_are_checked():
    assert parse_spec({"output_format": "webdataset", "image_format": "webp"}).image_format == "webp"
    with pytest.raises(SpecError, match="output_format"):
        parse_spec({"output_format": "tfrecord"})
    with pytest.raises(SpecError, match="jpeg_quality"):
        parse_spec({"jpeg_quality": 0})


def test_decode_image_round_trips_all_encodings():
    rng = np.random.default_rng(0)
    px = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    from batch.store.formats import encode_image

    assert np.array_equal(decode_image(encode_image(px, OutputFormat(image_format="png"))), px)
    assert np.array_equal(decode_image(encode_image(px, OutputFormat(image_format="webp"))), px)
    assert decode_image(encode_image(px, OutputFormat(image_format="jpeg"))).shape == px.shape



def test_image_reader_retries_a_transient_read_error(tmp_path, monkeypatch):
    """A transient storage error (dropped connection) is retried with the storage retry policy, so a hiccup does
    not drop an image from FID; a permanent one (not found) is not retried."""
    from fsspec.implementations.local import LocalFileSystem

    from batch.store.formats import encode_image

    img = np.zeros((8, 8, 3), np.uint8)
    img[2:5, 3:6] = 200
    data = encode_image(img, OutputFormat())
    (tmp_path / "a.png").write_bytes(data)
    calls, real = [], LocalFileSystem.cat_file

    def flaky(self, path, *args, **kwargs):  # the first read of each path drops its connection
        calls.append(path)
        if calls.count(path) == 1 and path.endswith("a.png"):
            raise ConnectionError("connection reset by peer")
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "cat_file", flaky)
    reader = ImageReader()  # the default storage retry policy (first pause <= 0.5 s)
    assert reader.read_bytes({"uri": str(tmp_path / "a.png"), "member": None}) == data
    assert len(calls) == 2  # the failure, then its retry
    assert np.array_equal(reader.read({"uri": str(tmp_path / "a.png"), "member": None}), img)
    calls.clear()
    with pytest.raises(FileNotFoundError):
        reader.read_bytes({"uri": str(tmp_path / "missing.png"), "member": None})
    assert len(calls) == 1  # not found is permanent: no retry


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_each_writer_class_round_trips_a_block_through_the_reader(name, tmp_path):
    """The BlockWriter interface itself: write(samples) says per sample where it went, ImageReader reads it
    back; a failed put fails its image (files) or, for a shard or its stats, every image in the shard."""
    fmt, out = OutputFormat(output_format=name), open_output(str(tmp_path / "out"))
    pixels = [np.random.default_rng(j).integers(0, 256, (8, 12, 3), dtype=np.uint8) for j in range(3)]
    samples = [Sample(sample_key(f"r{j}", 0), {"id": f"r{j}", "image_index": 0, "prompt": f"p{j}", "seed": j,
                                               "height": 8, "width": 12}, encode_image(px, fmt))
               for j, px in enumerate(pixels)]
    owners = []
    stored = WRITERS[name](fmt, lambda j, key, data: (owners.append(j), out.put(key, data)), 4).write(samples)
    assert all(isinstance(s, Stored) for s in stored) and len(stored) == 3
    reader = ImageReader()
    for s, px in zip(stored, pixels):
        assert np.array_equal(reader.read({"uri": out.uri(s.key), "member": s.member}), px)
    assert owners == ([0, 1, 2] if name == "files" else [0, 0])  # a shard and its stats go with sample 0

    calls = []

    def second_put_fails(j, key, data):
        calls.append(key)
        if len(calls) == 2:
            raise OSError("storage down")

    failed = WRITERS[name](fmt, second_put_fails, 3).write(samples)
    expected = [False, True, False] if name == "files" else [True, True, True]
    assert [isinstance(s, OSError) for s in failed] == expected


def test_png_parameters_chunk_is_a1111_infotext_and_keeps_pixels(generated, tmp_path):
    rows = _write(generated, str(tmp_path / "out"))
    reader = ImageReader()
    for r, g in zip(rows, generated.to_pylist()):
        data = reader.read_bytes(r)
        text = Image.open(io.BytesIO(data)).text["parameters"]
        prompt, params = text.split("\n")  # no negative prompt in these rows
        assert prompt == r["prompt"]
        fields = dict(p.split(": ", 1) for p in params.split(", "))
        assert fields["Steps"] == "3" and fields["Seed"] == str(r["seed"]) and fields["Size"] == "64x64"
        assert fields["CFG scale"] == str(r["guidance_scale"]) and fields["Sampler"] == r["scheduler"]
        assert fields["Model"] == "tiny" and fields["Image index"] == str(r["image_index"])
        # the chunk does not change the pixels, and the bytes are deterministic (no timestamp)
        px = np.frombuffer(g["_pixels"], np.uint8).reshape(64, 64, 3)
        assert np.array_equal(decode_image(data), px)
        assert encode_image(px, OutputFormat(), text) == data
        assert encode_image(px, OutputFormat()) != data  # ... and it is really there
    again = _write(generated, str(tmp_path / "again"))
    assert [r["sha256"] for r in again] == [r["sha256"] for r in rows]


def test_png_parameters_quotes_and_negative_prompt():
    meta = {"prompt": "a cat, on a mat", "negative_prompt": "blurry", "num_inference_steps": 50,
            "scheduler": "euler_a", "guidance_scale": 7.5, "seed": np.uint64(123), "height": 512, "width": 768,
            "model": "CompVis/stable-diffusion-v1-4", "model_revision": None, "image_index": 0}
    assert png_parameters(meta) == ("a cat, on a mat\nNegative prompt: blurry\nSteps: 50, Sampler: euler_a, "
                                    "CFG scale: 7.5, Seed: 123, Size: 768x512, Model: "
                                    "CompVis/stable-diffusion-v1-4, Image index: 0")
    # a value holding ',' or ':' is JSON-quoted (A1111's quote); non-Latin-1 text survives the round trip
    text = png_parameters({**meta, "prompt": "猫", "model": "/models/a,b:c"})
    assert 'Model: "/models/a,b:c"' in text
    data = encode_image(np.zeros((4, 4, 3), np.uint8), OutputFormat(), text)
    assert Image.open(io.BytesIO(data)).text["parameters"] == text


@pytest.mark.parametrize("output_format", ["webdataset", "parquet"])
def test_images_per_shard_splits_a_block(generated, tmp_path, output_format):
    out_uri = str(tmp_path / "out")
    rows = _write(generated, out_uri, output_format=output_format, images_per_shard=2)
    out = open_output(out_uri)
    shards = sorted(k for k in out.list("shards") if "/_stats/" not in k)
    assert len(rows) == 3 and len(shards) == 2  # 3 images, at most 2 per shard
    assert sorted(out.list("shards/_stats")) == sorted(stats_key(k) for k in shards)
    stats = [out.get_json(stats_key(k)) for k in shards]
    assert sorted(s["written"] for s in stats) == [1, 2] and sum(s["images"] for s in stats) == 3
    reader = ImageReader()
    for r in rows:
        assert np.array_equal(reader.read(r), _pixels(generated)[(r["id"], r["image_index"])])


def test_images_per_shard_is_checked():
    with pytest.raises(SpecError, match="images_per_shard"):
        parse_spec({"images_per_shard": 0, "output_format": "webdataset"})
    with pytest.raises(SpecError, match="images_per_shard: 8 applies to the shard formats"):
        parse_spec({"images_per_shard": 8})
    assert OutputFormat.from_spec(parse_spec({"images_per_shard": 8, "output_format": "parquet"})).images_per_shard == 8


def test_parquet_shards_carry_the_generation_parameters(generated, tmp_path):
    rows = _write(generated, str(tmp_path / "out"), output_format="parquet")
    table = pq.read_table(rows[0]["uri"])  # a local output: uri is the shard's path
    for name in SAMPLE_FIELDS:  # typed as the metadata, so shards and metadata join on (id, image_index)
        assert table.schema.field(name).type == METADATA_SCHEMA.field(name).type
    by_key = {r["key"]: r for r in table.to_pylist()}
    for r in rows:
        s = by_key[r["member"]]
        assert (s["prompt"], s["seed"], s["guidance_scale"], s["model"]) == (r["prompt"], r["seed"],
                                                                               r["guidance_scale"], r["model"])
        assert s["caption"] == r["prompt"] and s["sha256"] == r["sha256"]

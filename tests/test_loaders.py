"""Loader-ready outputs: a real (tiny) job's output read with Ray Data without any extra argument.

Two small jobs (WebDataset with ``images_per_shard``, and Parquet shards), then ``ray.data.read_webdataset``,
``ray.data.read_parquet`` on the shards and on the metadata, the PNG ``parameters`` chunk and the dataset card.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from conftest import write_manifest
from PIL import Image

from batch.run.job import run_job
from batch.spec.config import parse_spec
from batch.store.card import CARD, front_matter
from batch.store.commit import SUCCESS_MARKER, read_metadata
from batch.store.formats import ImageReader, decode_image
from batch.store.io import open_output

ROWS = [{"id": "a", "prompt": "a red cube", "num_images": 2}, {"id": "b", "prompt": "a blue sphere"},
        {"id": "c", "prompt": "a green cone", "num_images": 2}, {"id": "d", "prompt": "a tiny house"},
        {"id": "bad", "prompt": ""}]
IMAGES = 6  # images of the good rows


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, ray_session):
    d = tmp_path_factory.mktemp("loaders")
    manifest = write_manifest(d / "m.parquet", ROWS)
    runs = {}
    for fmt, extra in (("webdataset", {"images_per_shard": 3}), ("parquet", {})):
        spec = parse_spec({"model": "tiny", "device": "cpu", "dtype": "float32", "manifest": manifest,
                           "output": str(d / fmt), "defaults": {"height": 32, "width": 32, "num_inference_steps": 2},
                           "batch_size": 2, "actors": 1, "progress": False, "max_failed_fraction": 0.5,
                           "output_format": fmt, **extra})
        summary = run_job(spec)
        assert summary.images_ok == IMAGES and summary.rows_failed == 1 and summary.exit_code == 0
        runs[fmt] = str(d / fmt)
    return runs


def _ok(meta):
    return {r["member"]: r for r in meta.to_pylist() if r["status"] == "ok"}


@pytest.mark.e2e
def test_read_webdataset_reads_the_shards_alone(outputs):
    import ray

    out = outputs["webdataset"]
    Path(out, "shards", ".0123.tar.tmp-dead").write_bytes(b"a killed writer's partial shard")
    rows = ray.data.read_webdataset(f"{out}/shards").take_all()  # no arguments: _stats/ and temp files skipped
    meta = _ok(read_metadata(out))
    assert len(rows) == IMAGES and sorted(f"{r['__key__']}.png" for r in rows) == sorted(meta)
    reader = ImageReader()
    for r in rows:
        m = meta[f"{r['__key__']}.png"]
        assert (r["png"] == reader.read(m)).all()  # Ray's default decoder gives the stored pixels
        assert r["json"]["seed"] == m["seed"] and r["json"]["prompt"] == m["prompt"] == r["txt"]
    stats = [open_output(out).get_json(k) for k in open_output(out).list("shards/_stats")]
    assert sum(s["written"] for s in stats) == IMAGES and max(s["written"] for s in stats) <= 3  # images_per_shard
    assert len({m["uri"] for m in meta.values()}) == len(stats) >= 2


@pytest.mark.e2e
def test_read_webdataset_raw_png_carries_its_parameters(outputs):
    import ray

    out = outputs["webdataset"]
    rows = ray.data.read_webdataset(f"{out}/shards", decoder=None).take_all()  # raw bytes
    meta = _ok(read_metadata(out))
    for r in rows:
        m = meta[f"{r['__key__']}.png"]
        text = Image.open(io.BytesIO(r["png"])).text["parameters"]
        assert text.startswith(m["prompt"] + "\n") and f"Seed: {m['seed']}," in text and "Size: 32x32" in text


@pytest.mark.e2e
def test_read_parquet_reads_shards_and_metadata_apart(outputs):
    import ray

    out = outputs["parquet"]
    shards = ray.data.read_parquet(f"{out}/shards").take_all()
    meta = _ok(read_metadata(out))
    assert len(shards) == IMAGES and sorted(r["key"] for r in shards) == sorted(meta)
    for r in shards:  # the shard row alone has the image and its generation parameters
        m = meta[r["key"]]
        assert (r["prompt"], r["seed"], r["guidance_scale"], r["model"]) == (m["prompt"], m["seed"],
                                                                            m["guidance_scale"], m["model"])
        assert (decode_image(r["png"]) == ImageReader().read(m)).all()
    metadata = ray.data.read_parquet(f"{out}/metadata")
    assert metadata.count() == IMAGES + 1 and "png" not in metadata.schema().names  # + the failed row


@pytest.mark.e2e
def test_dataset_card_in_the_output(outputs):
    for fmt, out in outputs.items():
        o = open_output(out)
        assert o.exists(SUCCESS_MARKER)
        card = o.get(CARD).decode()
        assert front_matter(card)["license_name"] == "random weights, no licence"
        assert f"| images | {IMAGES} | 0 | 0 |" in card and "| rows | 4 | 1 | 0 |" in card
        assert "| 1 | prompt:" in card  # the failure summary
        reader = "read_webdataset" if fmt == "webdataset" else "read_parquet"
        assert f"ray.data.{reader}({out + '/shards'!r})" in card
        revision = read_metadata(out).column("model_revision").drop_null()[0].as_py()
        assert "- model: `tiny`" in card and f"- revision: `{revision}`" in card

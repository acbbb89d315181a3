"""The dry run (``model: none``): deterministic seeded pixels instead of diffusion, through the same stages."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pytest
from conftest import write_manifest
from PIL import Image

from batch.models.dryrun import DRY_RUN_REVISION, DryRunModel
from batch.models.load import load_model
from batch.models.weights import locate
from batch.plan.manifest import plan
from batch.run.stages import Sampler, SamplerSettings
from batch.sampling.dryrun import TILE, dry_run_image, dry_run_images
from batch.spec.config import parse_spec
from batch.store.schema import RESERVED_COLUMNS

ROWS = [
    {"id": "a", "prompt": "a red cube", "seed": 11, "num_images": 2},
    {"id": "b", "prompt": "a blue sphere", "scheduler": "model"},
    {"id": "c", "prompt": "a green cone", "seed": 5, "height": 32, "width": 48, "scheduler": "euler_a"},
    {"id": "d", "prompt": "a tiny house", "num_images": 3},
]
SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("seed", pa.int64()), ("num_images", pa.int64()),
                    ("height", pa.int64()), ("width", pa.int64()), ("scheduler", pa.string())])
DEFAULTS = {"height": 24, "width": 16}


def test_dry_run_image_is_a_function_of_seed_and_size_only():
    img = dry_run_image(7, 24, 20)
    assert img.shape == (24, 20, 3) and img.dtype == np.uint8 and img.flags.c_contiguous
    assert np.array_equal(img, dry_run_image(7, 24, 20))  # same inputs, same bytes
    assert not np.array_equal(img, dry_run_image(8, 24, 20))  # another seed, other pixels
    assert img.min() != img.max()  # never flat: passes the sampler's flat-image check
    # the documented recipe: an 8x8 tile of PCG64(seed)'s raw little-endian bytes, repeated; a cropped size is a crop
    tile = np.frombuffer(np.random.PCG64(7).random_raw(24).astype("<u8").tobytes(), np.uint8).reshape(TILE, TILE, 3)
    assert np.array_equal(img[:TILE, :TILE], tile) and np.array_equal(img[TILE:2 * TILE, TILE:2 * TILE], tile)
    assert np.array_equal(dry_run_image(7, 9, 11), img[:9, :11])
    big_seed = 2**63 - 1  # the largest seed the planner gives
    assert dry_run_image(big_seed, 8, 8).shape == (8, 8, 3)
    assert [i.shape for i in dry_run_images([1, 2], [(8, 16), (16, 8)])] == [(8, 16, 3), (16, 8, 3)]
    with pytest.raises(ValueError, match="3 seeds for 2 sizes"):
        dry_run_images([1, 2, 3], [(8, 8), (8, 8)])
    with pytest.raises(ValueError, match="height and width"):
        dry_run_image(1, 0, 8)


def test_model_none_loads_nothing_and_is_recorded_as_none():
    assert locate("none", None, False) == ("none", None, DRY_RUN_REVISION)
    model = load_model("none", task="upscale")
    assert isinstance(model, DryRunModel) and model.dry_run and model.task == "upscale"
    assert parse_spec({"model": "none"}).model == "none"


def _items(batch_size_spec: dict | None = None) -> pa.Table:
    spec = parse_spec({"model": "none", "defaults": DEFAULTS, **(batch_size_spec or {})})
    return plan(pa.Table.from_pylist(ROWS, schema=SCHEMA), spec, RESERVED_COLUMNS).items


def test_dry_run_sampler_keeps_the_item_fields_and_is_batch_independent():
    items = _items()
    outs = [Sampler(SamplerSettings(model="none", device="cpu", batch_size=bs))(items).to_pylist() for bs in (1, 4)]
    one, four = outs
    assert len(one) == 7 and [r["_pixels"] for r in one] == [r["_pixels"] for r in four]
    for r in one:
        assert r["status"] == "ok" and r["error"] is None
        assert (r["model"], r["model_revision"], r["scheduler_class"], r["dtype"], r["device"]) == \
            ("none", DRY_RUN_REVISION, "none", "none", "cpu")
        assert r["scheduler_config"] is None and r["optimizations"] == '{"dry_run": true}'
        pixels = np.frombuffer(r["_pixels"], np.uint8).reshape(r["height"], r["width"], 3)
        assert np.array_equal(pixels, dry_run_image(r["seed"], r["height"], r["width"]))  # from the row alone
    sizes = {(r["id"], r["image_index"]): (r["height"], r["width"]) for r in one}
    assert sizes[("c", 0)] == (32, 48) and sizes[("a", 1)] == (24, 16)
    assert {r["id"]: r["scheduler"] for r in one}["b"] == "model"  # no model to resolve its own scheduler
    a0, a1 = (r["_pixels"] for r in one if r["id"] == "a")
    assert a0 != a1  # images of one row differ (seed + k)


def test_dry_run_upscale_is_four_times_the_input(tmp_path):
    from batch.run.inputs import fetch_inputs

    path = tmp_path / "in.png"
    Image.fromarray(np.full((12, 20, 3), 100, np.uint8)).save(path)
    spec = parse_spec({"task": "upscale", "model": "none"})
    items = plan(pa.Table.from_pylist([{"id": "u", "image_uri": str(path), "num_images": 2}]), spec,
                 RESERVED_COLUMNS).items
    out = Sampler(SamplerSettings(task="upscale", model="none", device="cpu"))(fetch_inputs(items, {}, 10**6))
    rows = out.to_pylist()
    assert [(r["status"], r["height"], r["width"]) for r in rows] == [("ok", 48, 80)] * 2
    for r in rows:
        assert r["_pixels"] == dry_run_image(r["seed"], 48, 80).tobytes()


@pytest.mark.e2e
def test_dry_run_job_commits_and_reruns_byte_identically_at_another_batch_size(tmp_path, ray_session):
    """The whole job (Ray pool, writers, commits, ``_SUCCESS``) with ``model: none``; a second run with another
    batch size and actor count stores the same bytes for every image."""
    from batch.run.job import run_job
    from batch.store.commit import SUCCESS_MARKER, read_metadata
    from batch.store.formats import decode_image
    from batch.store.io import open_output

    manifest = write_manifest(tmp_path / "m.parquet", ROWS, SCHEMA)
    hashes = []
    for n, (bs, actors) in enumerate([(1, 1), (3, 2)]):
        out_uri = str(tmp_path / f"out{n}")
        spec = parse_spec({"model": "none", "device": "cpu", "manifest": manifest, "output": out_uri,
                           "defaults": DEFAULTS, "batch_size": bs, "actors": actors, "progress": False})
        summary = run_job(spec)
        assert summary.complete and summary.exit_code == 0 and summary.images_ok == 7
        out = open_output(out_uri)
        assert out.exists(SUCCESS_MARKER)
        meta = read_metadata(out_uri).to_pylist()
        assert len(meta) == 7 and {r["model"] for r in meta} == {"none"}
        for r in meta:
            data = out.fs.cat_file(out.fs._strip_protocol(r["uri"]))
            assert hashlib.sha256(data).hexdigest() == r["sha256"]
            assert np.array_equal(decode_image(data), dry_run_image(r["seed"], r["height"], r["width"]))
        hashes.append({(r["id"], r["image_index"]): r["sha256"] for r in meta})
    assert hashes[0] == hashes[1]

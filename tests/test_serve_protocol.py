"""The serving endpoint without starting Ray: requests plan like manifest rows (same texts, seeds, limits),
a replica batches waiting requests and groups them by the batch job's bucket rule, responses carry the batch
writer's encoding."""

from __future__ import annotations

import base64
import hashlib
import json

import numpy as np
import pyarrow as pa
import pytest

from batch.plan.manifest import ManifestError, plan, split_problems
from batch.plan.seeds import derive_row_seed
from batch.plan.sources import read_manifest
from batch.serve import protocol as P
from batch.spec.base import SpecError
from batch.spec.config import parse_spec
from batch.store.formats import OutputFormat, decode_image, encode_image, png_parameters
from batch.store.schema import RESERVED_COLUMNS


def _spec(**kw):
    data = {"model": "none", "seed": 11, "batch_size": 2, "defaults": {"height": 64, "width": 64}}
    return parse_spec({**data, **kw})


def _planned(body, spec, form="plain"):
    table = P.parse_plain(body, spec) if form == "plain" else P.parse_catalogue(body, spec)
    return P.plan_request(table, spec, form)


def test_plain_request_plans_like_a_manifest_row():
    spec = _spec()
    items = _planned({"id": "a", "prompt": "a cat", "num_inference_steps": 7}, spec).items.to_pylist()
    assert len(items) == 1 and items[0]["num_inference_steps"] == 7 and items[0]["height"] == 64
    # no seed: derived from (spec seed, id) exactly as the batch job derives it
    assert items[0]["seed"] == derive_row_seed(11, "a") and items[0]["seed_source"] != "manifest"
    given = _planned({"id": "a", "prompt": "a cat", "seed": 5}, spec).items.to_pylist()[0]
    assert given["seed"] == 5
    # no id: a generated one, whose derived seed is returned with the image
    anon = _planned({"prompt": "a cat"}, spec).items.to_pylist()[0]
    assert anon["id"].startswith("req-") and anon["seed"] == derive_row_seed(11, anon["id"])
    assert _planned({"prompt": "a cat"}, spec).items.to_pylist()[0]["id"] != anon["id"]
    # one image, even where the spec's defaults ask for more per row
    assert _planned({"prompt": "a cat"}, _spec(defaults={"num_images": 3})).images == 1
    assert _planned({"input_data": {"columns": ["prompt"], "data": ["a"]}}, _spec(defaults={"num_images": 3}),
                    "catalogue").images == 3


def test_bad_rows_get_the_manifest_validation_text():
    spec = _spec()
    row = {"id": "r", "prompt": "", "height": 65, "num_inference_steps": 0}
    expected = split_problems(plan(pa.Table.from_pylist([row]), spec, RESERVED_COLUMNS).failed["error"][0].as_py())
    assert len(expected) == 3  # prompt, steps, height
    with pytest.raises(P.RequestError) as err:
        _planned(row, spec)
    assert err.value.status == 400 and err.value.errors == [f"request: {p}" for p in expected]
    # catalogue form: the row is named by its position
    doc = {"input_data": {"columns": list(row), "data": [["ok", "x", 64, 4], list(row.values())]}}
    with pytest.raises(P.RequestError) as err:
        _planned(doc, spec, "catalogue")
    assert err.value.errors == [f"input_data.data[1]: {p}" for p in expected]


def test_duplicate_ids_fail_as_in_the_manifest():
    from batch.plan.manifest import find_duplicates

    ids = ["a", "b", "a", "c", "b", "a"]
    assert P._duplicates(ids) == find_duplicates([pa.array(ids)])


def test_request_refusals_name_the_problem():
    spec = _spec()
    cases = [
        ({"prompt": "x", "image_uri": "/etc/passwd"}, "plain", 400, "request: image_uri: unknown field"),
        ({"prompt": "x", "num_images": 2}, "plain", 400, "use POST /score"),
        ({"prompt": "x", "seed": "7"}, "plain", 400, "request: seed must be an integer"),
        (["x"], "plain", 400, "must be a JSON object"),
        ({"input_data": {"columns": ["prompt", "image_uri"], "data": [["x", "s3://b/k.png"]]}}, "catalogue", 400,
         "unknown column(s) ['image_uri']"),
        ({"input_data": {"columns": ["prompt"], "data": ["x"], "parameters": {"steps": 3}}}, "catalogue", 400,
         "unknown parameter 'steps'"),
        ({"inputs": []}, "catalogue", 400, "no input_data object"),
        ({"input_data": {"columns": ["prompt", "num_images"], "data": [["x", 5], ["y", 4]]}}, "catalogue", 413,
         "9 images, more than serve.max_images_per_request=8"),
        ({"input_data": {"columns": ["prompt"], "data": ["x"] * 9}}, "catalogue", 413, "9 rows"),
        ({"input_data": {"columns": ["id", "prompt"], "data": [["d", "x"], ["d", "y"]]}}, "catalogue", 400,
         "duplicate id"),
    ]
    for body, form, status, text in cases:
        with pytest.raises(P.RequestError) as err:
            _planned(body, spec, form)
        assert err.value.status == status and text in err.value.error, (body, err.value.error)
        assert err.value.body()["errors"] and all(isinstance(e, str) for e in err.value.body()["errors"])


def test_catalogue_request_and_catalogue_file_parse_alike(tmp_path):
    doc = {"input_data": {"columns": ["prompt", "seed"], "data": [["a", 1], ["b", None]], "index": [7, 8],
                          "parameters": {"num_inference_steps": 3}}}
    (tmp_path / "m.json").write_text(json.dumps(doc))
    spec = _spec()
    assert P.parse_catalogue(doc, spec).equals(read_manifest(str(tmp_path / "m.json")))
    bad = {"input_data": {"columns": ["prompt"], "data": ["x"], "extra": 1}}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ManifestError) as file_err:
        read_manifest(str(tmp_path / "bad.json"))
    with pytest.raises(P.RequestError) as req_err:
        P.parse_catalogue(bad, spec)
    assert "input_data has unknown key(s) ['extra']" in str(file_err.value) and "['extra']" in req_err.value.error


def test_only_txt2img_is_served_and_serve_settings_are_checked():
    with pytest.raises(SpecError, match="serves task txt2img only"):
        P.check_servable(parse_spec({"task": "upscale"}))
    with pytest.raises(SpecError, match="max_images_per_request .9. is above max_queued_images .8."):
        parse_spec({"serve": {"max_images_per_request": 9, "max_queued_images": 8}})
    with pytest.raises(SpecError, match="serve.replicas"):
        parse_spec({"serve": {"replicas": {"min": 3, "max": 2}}})
    assert parse_spec({"serve": {"replicas": {"min": 1, "max": 4}}}).serve.replicas.max == 4


def test_a_batch_groups_by_bucket_and_answers_each_request_in_order():
    """Three requests collected in one replica batch: compatible images share sampler calls of at most
    batch_size (the batch job's rule), the other steps value gets its own; each request gets its rows back in
    its own order, each image encoded exactly as the batch writer encodes it."""
    from batch.run.stages import Sampler, SamplerSettings

    spec = _spec()
    reqs = [_planned({"input_data": {"columns": ["prompt"], "data": ["a", "b", "c"]}}, spec, "catalogue").items,
            _planned({"prompt": "d", "num_inference_steps": 3}, spec).items,
            _planned({"prompt": "e"}, spec).items]
    batch = P.collect_batch(reqs, spec.batch_size)
    out = Sampler(SamplerSettings.from_spec(spec, "cpu"))(batch)  # model: none, the dry run: no weights
    fmt = OutputFormat.from_spec(spec)
    rows = P.split_batch(batch, out, 3, fmt)
    assert [[r["prompt"] for r in req] for req in rows] == [["a", "b", "c"], ["d"], ["e"]]
    # 4 compatible images (a, b, c, e) in calls of batch_size 2; d alone
    assert sorted(r["batch_images"] for req in rows for r in req) == [1, 2, 2, 2, 2]
    assert rows[1][0]["batch_images"] == 1
    for r in (r for req in rows for r in req):
        image = r["_image"]
        assert r["sha256"] == hashlib.sha256(image).hexdigest() and r["status"] == "ok"
        pixels = decode_image(image)
        assert image == encode_image(pixels, fmt, png_parameters(r))  # the writer's bytes for this row
    body = P.catalogue_response(rows[0])
    assert [sorted(x) for x in body] == [["generated_image", "nsfw_content_detected", "prompt"]] * 3
    assert np.array_equal(decode_image(base64.b64decode(body[0]["generated_image"])), decode_image(rows[0][0]["_image"]))
    plain = P.plain_response(rows[2])
    assert plain["seed"] == rows[2][0]["seed"] and "_image" not in plain["metadata"]
    json.dumps(plain)  # the metadata row is JSON as it is
    failed = [dict(rows[2][0], status="failed", error="RuntimeError: boom")]
    with pytest.raises(P.RequestError) as err:
        P.plain_response(failed)
    assert err.value.status == 500 and err.value.errors == ["request: RuntimeError: boom"]


def test_the_collector_batches_what_waited_skips_the_cancelled_and_survives_errors():
    """The replica's request batching (batch.serve.app.Collector) on a plain event loop (no Ray started):
    requests arriving while a batch runs form the next batch together (up to max_images, never split); a
    request cancelled while queued is never run; one cancelled during its batch leaves the batch to finish."""
    import asyncio

    from batch.serve.app import Collector

    def req(n):
        return pa.table({"x": list(range(n))})

    async def scenario():
        calls, gate = [], asyncio.Event()

        async def run_batch(requests):
            calls.append([t.num_rows for t in requests])
            await gate.wait()
            if any(t.num_rows == 7 for t in requests):
                raise RuntimeError("boom")
            return [f"r{t.num_rows}" for t in requests]

        c = Collector(run_batch, max_images=4, wait_s=0.01)
        first = asyncio.ensure_future(c.submit(req(1)))
        while not calls:  # the first batch is running (blocked on the gate)
            await asyncio.sleep(0.001)
        waiting = [asyncio.ensure_future(c.submit(req(n))) for n in (2, 1, 3)]
        cancelled = asyncio.ensure_future(c.submit(req(1)))
        await asyncio.sleep(0.02)
        cancelled.cancel()
        gate.set()
        results = [await first] + [await w for w in waiting]
        assert results == ["r1", "r2", "r1", "r3"]
        # the 2 and 1 that waited went together (3 images; the 3 would exceed 4); the cancelled one never ran
        assert calls == [[1], [2, 1], [3]]
        # cancelled during its batch: the batch completes and the other request gets its answer
        gate.clear()
        a, b = asyncio.ensure_future(c.submit(req(1))), asyncio.ensure_future(c.submit(req(2)))
        while len(calls) < 4:
            await asyncio.sleep(0.001)
        a.cancel()
        gate.set()
        assert await b == "r2" and calls[-1] == [1, 2]
        # an error fails that batch's requests only; the collector goes on
        with pytest.raises(RuntimeError, match="boom"):
            await c.submit(req(7))
        assert await c.submit(req(1)) == "r1"

    asyncio.run(asyncio.wait_for(scenario(), 10))

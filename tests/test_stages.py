"""The two stages in-process (no Ray): per-call failure isolation, batching, encode/write results."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pytest

import batch.run.stages as stages
import batch.sampling.txt2img as sampling
from batch.spec.config import parse_spec
from batch.plan.manifest import plan
from batch.store.schema import RESERVED_COLUMNS
from batch.store.io import open_output
from batch.store.formats import decode_image


@pytest.fixture(scope="module")
def sampler():
    return stages.Sampler(stages.SamplerSettings(model="tiny", dtype="float32", device="cpu", batch_size=2))


def _items(prompts):
    spec = parse_spec({"defaults": {"height": 64, "width": 64, "num_inference_steps": 3}})
    table = pa.Table.from_pylist([{"id": f"r{i}", "prompt": p} for i, p in enumerate(prompts)])
    return plan(table, spec, RESERVED_COLUMNS).items


def test_a_failing_sampler_call_fails_only_its_own_images(sampler, monkeypatch):
    calls = []
    real = sampling.txt2img

    def flaky(model, scheduler, prompts, negatives, seeds, params, **kwargs):
        calls.append(list(prompts))
        if "boom" in prompts:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(model, scheduler, prompts, negatives, seeds, params, **kwargs)

    monkeypatch.setattr(sampling, "txt2img", flaky)
    out = sampler(_items(["a", "b", "boom", "c", "d"])).to_pylist()
    assert [len(c) for c in calls] == [2, 2, 1]  # batch_size 2 within the one bucket
    by_prompt = {r["prompt"]: r for r in out}
    assert by_prompt["boom"]["status"] == "failed" and "out of memory" in by_prompt["boom"]["error"]
    partner = next(p for c in calls if "boom" in c for p in c if p != "boom")
    assert by_prompt[partner]["status"] == "failed"  # same call
    good = [r for r in out if r["status"] == "ok"]
    assert len(good) == 3 and all(len(r["_pixels"]) == 64 * 64 * 3 for r in good)
    assert all(r["scheduler"] == "pndm" and r["scheduler_class"] == "PNDMScheduler" for r in out)


def test_encode_and_write_hashes_what_it_writes(sampler, tmp_path):
    generated = sampler(_items(["x", "y"]))
    result = stages.encode_and_write(generated, stages.WriterSettings(str(tmp_path / "out")))
    out = open_output(str(tmp_path / "out"))
    assert "_pixels" not in result.column_names
    for gen, r in zip(generated.to_pylist(), result.to_pylist()):
        data = out.fs.cat_file(out.fs._strip_protocol(r["uri"]))
        assert hashlib.sha256(data).hexdigest() == r["sha256"] and r["file_size"] == len(data)
        expected = np.frombuffer(gen["_pixels"], np.uint8).reshape(64, 64, 3)
        assert np.array_equal(decode_image(data), expected)  # PNG is lossless


def test_encode_and_write_failure_is_per_image(sampler, tmp_path):
    generated = sampler(_items(["x"]))
    (tmp_path / "ro").write_text("a file where the output folder should be")
    result = stages.encode_and_write(generated, stages.WriterSettings(str(tmp_path / "ro"))).to_pylist()
    assert result[0]["status"] == "failed" and result[0]["uri"] is None and result[0]["error"]

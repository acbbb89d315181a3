"""The two stages in-process (no Ray): per-call failure isolation, batching, encode/write results."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pytest
import torch

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


def _items(prompts, defaults=None, batch_size=2):
    spec = parse_spec({"defaults": defaults or {"height": 64, "width": 64, "num_inference_steps": 3},
                       "batch_size": batch_size})  # the plan numbers GPU batches with the sampler's batch size
    table = pa.Table.from_pylist([{"id": f"r{i}", "prompt": p} for i, p in enumerate(prompts)])
    return plan(table, spec, RESERVED_COLUMNS).items


def test_a_failing_sampler_call_fails_only_its_own_images(sampler, monkeypatch):
    calls = []
    real = sampling.txt2img

    def flaky(model, scheduler, prompts, negatives, seeds, params, **kwargs):
        calls.append(list(prompts))
        if "boom" in prompts:
            raise RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED (simulated)")
        return real(model, scheduler, prompts, negatives, seeds, params, **kwargs)

    monkeypatch.setattr(sampling, "txt2img", flaky)
    out = sampler(_items(["a", "b", "boom", "c", "d"])).to_pylist()
    assert [len(c) for c in calls] == [2, 2, 1]  # batch_size 2 within the one bucket
    by_prompt = {r["prompt"]: r for r in out}
    assert by_prompt["boom"]["status"] == "failed" and "CUDNN_STATUS_EXECUTION_FAILED" in by_prompt["boom"]["error"]
    partner = next(p for c in calls if "boom" in c for p in c if p != "boom")
    assert by_prompt[partner]["status"] == "failed"  # same call
    good = [r for r in out if r["status"] == "ok"]
    assert len(good) == 3 and all(len(r["_pixels"]) == 64 * 64 * 3 for r in good)
    assert all(r["scheduler"] == "pndm" and r["scheduler_class"] == "PNDMScheduler" for r in out)


def test_out_of_memory_splits_the_batch_down_to_single_images(monkeypatch):
    """An injected OOM whenever a call holds more than 1 image, and always for prompt "huge": a batch of 4
    splits 4 -> 2 -> 1; only "huge" fails, alone; every other image equals the same row sampled unsplit."""
    sampler = stages.Sampler(stages.SamplerSettings(model="tiny", dtype="float32", device="cpu", batch_size=4))
    prompts = ["picture a", "picture b", "huge", "picture c"]
    small = {"height": 32, "width": 32, "num_inference_steps": 2}
    reference = sampler(_items(prompts, small, 4)).to_pylist()  # one call of 4, no OOM injected yet
    calls = []
    real = sampling.txt2img

    def small_memory(model, scheduler, prompts, negatives, seeds, params, **kwargs):
        calls.append(list(prompts))
        if len(prompts) > 1 or "huge" in prompts:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real(model, scheduler, prompts, negatives, seeds, params, **kwargs)

    monkeypatch.setattr(sampling, "txt2img", small_memory)
    out = sampler(_items(prompts, small, 4)).to_pylist()
    assert [len(c) for c in calls] == [4, 2, 1, 1, 2, 1, 1]  # halves, then single images
    assert sorted(p for c in calls if len(c) == 1 for p in c) == sorted(prompts)
    by_prompt = {r["prompt"]: r for r in out}
    assert by_prompt["huge"]["status"] == "failed" and by_prompt["huge"]["_pixels"] is None
    assert by_prompt["huge"]["error"].startswith("out of memory alone (batch 1): OutOfMemoryError: CUDA out of")
    for ref in reference[:2] + reference[3:]:  # same row, same image, within batch invariance (<= 1/255)
        got = by_prompt[ref["prompt"]]
        assert got["status"] == "ok" and got["seed"] == ref["seed"] and got["error"] is None
        a = np.frombuffer(got["_pixels"], np.uint8).astype(int)
        b = np.frombuffer(ref["_pixels"], np.uint8).astype(int)
        assert np.abs(a - b).max() <= 1


def test_what_counts_as_out_of_memory():
    assert stages.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20 MiB"))
    assert stages.is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert stages.is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert not stages.is_out_of_memory(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not stages.is_out_of_memory(ValueError("out of memory"))  # not a runtime failure of the device


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

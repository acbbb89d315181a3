"""The dataset card (README.md in a run's output prefix): licences, counts, failures, loading lines. No Ray."""

from __future__ import annotations

import pyarrow as pa
import pytest

from batch.spec.config import parse_spec
from batch.store.card import (CARD, KNOWN_LICENSES, TINY_LICENSE, UNKNOWN_LICENSE, dataset_card, front_matter,
                              model_license, write_dataset_card)
from batch.store.io import open_output
from batch.run.record import redact


def _record(**spec_kw):
    spec = parse_spec({"output": "s3://bucket/runs/r1", "manifest": "s3://bucket/m.parquet",
                       "storage_options": {"key": "AKIA-SECRET", "secret": "hunter2"}, **spec_kw})
    return spec, {"run_id": "r1", "spec": redact(spec.model_dump(mode="json")), "manifest_sha256": "abc123",
                  "rows": 5, "attempts": [{"attempt": "a1"}]}


SUMMARY = {"run_id": "r1", "rows": 5, "rows_ok": 3, "rows_failed": 2, "images_ok": 6, "images_failed": 3,
           "images_pending": 0, "complete": True,
           "failure_reasons": {"prompt: empty": 1, "guidance_scale: must be finite": 1, "RuntimeError: boom": 1}}


@pytest.mark.parametrize("model, name", [
    ("tiny", "random weights, no licence"),
    ("CompVis/stable-diffusion-v1-4", "CreativeML OpenRAIL-M"),
    ("lambdalabs/sd-image-variations-diffusers", "CreativeML OpenRAIL-M"),
    ("stabilityai/stable-diffusion-2-1", "CreativeML Open RAIL++-M"),
    ("stabilityai/stable-diffusion-x4-upscaler", "CreativeML Open RAIL++-M"),
    ("someone/other-model", "unknown: see the model card"),
])
def test_model_license_by_name(model, name):
    assert model_license(model).name == name


def test_model_license_from_a_local_model_card():
    readme = "---\nlicense: creativeml-openrail-m\ntags:\n- stable-diffusion\n---\n# My fine-tune\n"
    assert model_license("/models/mine", readme) == KNOWN_LICENSES["CompVis/stable-diffusion-v1-4"]
    assert model_license("/models/mine", "---\nlicense: apache-2.0\n---\n").name == "apache-2.0"
    assert model_license("/models/mine", "# no front matter\nlicense: mit\n") == UNKNOWN_LICENSE
    assert model_license("/models/mine", "---\nlicense: [unterminated\n---\n") == UNKNOWN_LICENSE
    assert model_license("tiny", readme) == TINY_LICENSE  # the preset is never read from a folder


@pytest.mark.parametrize("fmt, reader, data_files", [
    ("webdataset", "ray.data.read_webdataset('s3://bucket/runs/r1/shards')", "shards/*.tar"),
    ("parquet", "ray.data.read_parquet('s3://bucket/runs/r1/shards')", "shards/*.parquet"),
    ("files", "ray.data.read_images('s3://bucket/runs/r1/images'", "metadata/*.parquet"),
])
def test_card_contents(fmt, reader, data_files):
    spec, record = _record(model="CompVis/stable-diffusion-v1-4", output_format=fmt,
                           defaults={"guidance_scale": 5.0, "num_inference_steps": 30})
    card = dataset_card(record, SUMMARY, model_license(spec.model), "rev0123")
    meta = front_matter(card)
    assert meta["license"] == "creativeml-openrail-m" and meta["configs"][0]["data_files"] == data_files
    assert "- model: `CompVis/stable-diffusion-v1-4`" in card and "- revision: `rev0123`" in card
    assert "CreativeML OpenRAIL-M" in card
    assert "| `defaults.guidance_scale` | `5.0` |" in card and "| `defaults.num_inference_steps` | `30` |" in card
    assert "| rows | 3 | 2 | 0 |" in card and "| images | 6 | 3 | 0 |" in card
    for reason in SUMMARY["failure_reasons"]:
        assert f"| 1 | {reason} |" in card
    assert reader in card and "ray.data.read_parquet('s3://bucket/runs/r1/metadata')" in card
    assert "load_dataset(" in card
    assert ("wds.WebDataset" in card) == (fmt == "webdataset")
    assert "hunter2" not in card and "AKIA-SECRET" not in card  # the record's spec is redacted


def test_card_says_incomplete_and_no_failures():
    spec, record = _record()
    card = dataset_card(record, {**SUMMARY, "complete": False, "images_pending": 4, "failure_reasons": {}},
                        model_license("tiny"))
    assert "**Incomplete**" in card and "| images | 6 | 3 | 4 |" in card
    assert "## Failures\n\nNone." in card and front_matter(card)["license_name"] == "random weights, no licence"


def test_write_dataset_card_reads_the_revision_from_metadata(tmp_path):
    spec, record = _record()
    out = open_output(str(tmp_path / "out"))
    out.put_parquet("metadata/part-a-000000.parquet",
                    pa.table({"id": ["x", "y"], "model_revision": [None, "tiny-v1"]}))
    text = write_dataset_card(out, spec, SUMMARY, record)
    assert out.get(CARD).decode() == text and "- revision: `tiny-v1`" in text

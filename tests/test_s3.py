"""The full pipeline against an S3-protocol server on loopback (moto), through s3fs: the code path a
user's S3 or MinIO takes. Manifest and outputs both live in the bucket."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import loopback_s3

from batch.spec.config import parse_spec
from batch.run.job import run_job
from batch.store.commit import RUN_RECORD, SUCCESS_MARKER, read_metadata
from batch.store.io import open_output
from batch.store.formats import decode_image

pytestmark = pytest.mark.e2e  # every test here runs a job on Ray


@pytest.fixture(scope="module")
def s3_options():
    with loopback_s3("sdbatch-test") as options:
        yield options


def test_full_run_on_loopback_s3(s3_options, ray_session):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_options)
    rows = [{"id": "s3-a", "prompt": "a boat", "num_images": 2}, {"id": "s3-b", "prompt": ""}]
    with fs.open("sdbatch-test/in/m.parquet", "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows), f)
    spec = parse_spec({"model": "tiny", "device": "cpu", "manifest": "s3://sdbatch-test/in/m.parquet",
                       "output": "s3://sdbatch-test/runs/one", "storage_options": s3_options, "progress": False,
                       "defaults": {"height": 64, "width": 64, "num_inference_steps": 3},
                       "max_failed_fraction": 0.5})
    summary = run_job(spec)
    assert (summary.images_ok, summary.rows_failed, summary.exit_code) == (2, 1, 0)
    meta = read_metadata("s3://sdbatch-test/runs/one", s3_options)
    out = open_output("s3://sdbatch-test/runs/one", s3_options)
    assert out.exists(SUCCESS_MARKER)
    record = out.get_json(RUN_RECORD)  # credentials never land in the run record
    assert record["spec"]["storage_options"]["secret"] == "***" and "testing" not in json.dumps(record)
    ok = [r for r in meta.to_pylist() if r["status"] == "ok"]
    assert len(ok) == 2
    for r in ok:
        assert r["uri"].startswith("s3://sdbatch-test/runs/one/images/")
        data = fs.cat_file(r["uri"])
        assert hashlib.sha256(data).hexdigest() == r["sha256"]
        assert decode_image(data).shape == (64, 64, 3)


def test_status_and_resume_on_s3_use_recorded_spec_and_given_credentials(s3_options, ray_session, capsys):
    from batch.cli import main as cli_main

    uri = "s3://sdbatch-test/runs/one"
    creds = ["--set", "storage_options.key=testing", "--set", "storage_options.secret=testing",
             "--set", f"storage_options.client_kwargs.endpoint_url={s3_options['client_kwargs']['endpoint_url']}",
             "--set", "storage_options.client_kwargs.region_name=us-east-1"]
    assert cli_main(["status", uri, *creds]) == 0
    assert "2 done, 0 failed, 0 pending" in capsys.readouterr().out
    before = read_metadata(uri, s3_options)
    assert cli_main(["resume", uri, "--quiet", *creds]) == 0  # nothing left: no Ray work, nothing rewritten
    assert "this attempt 0 (2 already committed)" in capsys.readouterr().out
    assert read_metadata(uri, s3_options).equals(before)

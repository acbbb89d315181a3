"""The streaming job end to end on the tiny model: waves of plan chunks, and ``sdbatch run --extend``."""

from __future__ import annotations

import pyarrow as pa
import pytest
from conftest import write_manifest

import batch.plan.manifest as manifest
import batch.run.job as job
from batch.cli import main as cli_main
from batch.run.job import run_job
from batch.spec.config import parse_spec
from batch.store.commit import RUN_RECORD, SUCCESS_MARKER, RunExistsError, read_metadata
from batch.store.io import open_output
from batch.store.runlog import read_log

SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("tag", pa.string())])


def rows(n: int, start: int = 0) -> list[dict]:
    return [{"id": f"r{i}", "prompt": f"prompt {i}", "tag": f"t{i}"} for i in range(start, start + n)]


def spec_for(manifest_uri: str, output: str, **kw):
    base = {"model": "tiny", "device": "cpu", "dtype": "float32", "manifest": manifest_uri, "output": output,
            "defaults": {"height": 32, "width": 32, "num_inference_steps": 2}, "batch_size": 2, "actors": 1,
            "progress": False}
    return parse_spec({**base, **kw})


@pytest.mark.e2e
def test_waves_and_extend(tmp_path, ray_session, monkeypatch):
    """Chunks of 3 rows, waves of 2 chunks: 7 rows run as 2 waves (the driver never holds the whole plan);
    then 2 appended rows run alone with --extend; a changed row is refused by number and id."""
    monkeypatch.setattr(manifest, "PLAN_CHUNK_ROWS", 3)
    monkeypatch.setattr(job, "PLAN_CHUNK_ROWS", 3)
    out = str(tmp_path / "out")
    m1 = write_manifest(tmp_path / "m1.parquet", rows(7), SCHEMA)
    s1 = run_job(spec_for(m1, out, wave_rows=5))  # 2 chunks of 3 rows
    assert s1.complete and s1.images_ok == 7
    waves = [e for e in read_log(open_output(out), s1.run_id) if e["event"] == "wave"]
    assert [w["images_to_do"] for w in waves] == [6, 1]
    first = {r["id"]: r for r in read_metadata(out).to_pylist()}

    # a plain run with the longer manifest is refused (another manifest), with a hint
    m2 = write_manifest(tmp_path / "m2.parquet", rows(9), SCHEMA)
    with pytest.raises(RunExistsError, match="manifest contents changed"):
        run_job(spec_for(m2, out))
    s2 = run_job(spec_for(m2, out), mode="extend")
    assert s2.complete and s2.images_ok == 9 and s2.images_this_attempt == 2
    meta = {r["id"]: r for r in read_metadata(out).to_pylist()}
    assert set(meta) == {f"r{i}" for i in range(9)}
    assert all(meta[k]["sha256"] == first[k]["sha256"] and meta[k]["attempt"] == first[k]["attempt"] for k in first)
    record = open_output(out).get_json(RUN_RECORD)
    assert record["rows"] == 9 and record["extended"][0]["rows_before"] == 7
    assert open_output(out).exists(SUCCESS_MARKER)

    # a changed row (r4's prompt) is named and refused; nothing runs
    changed = rows(10)
    changed[4]["prompt"] = "something else"
    m3 = write_manifest(tmp_path / "m3.parquet", changed, SCHEMA)
    with pytest.raises(RunExistsError, match=r"1 row\(s\) the run already has differ.*row 4 \(id 'r4'\)"):
        run_job(spec_for(m3, out), mode="extend")
    # fewer rows than the run: refused
    with pytest.raises(RunExistsError, match="fewer than the 9"):
        run_job(spec_for(m1, out), mode="extend")
    assert read_metadata(out).num_rows == 9


@pytest.mark.e2e
def test_extend_on_the_command_line(tmp_path, ray_session, capsys):
    out = str(tmp_path / "out")
    m1 = write_manifest(tmp_path / "m1.parquet", rows(2), SCHEMA)
    args = ["configs/demo.yaml", "--output", out, "--quiet", "--set", "defaults.height=32",
            "--set", "defaults.width=32", "--set", "defaults.num_inference_steps=2", "--device", "cpu"]
    assert cli_main(["run", *args, "--manifest", m1]) == 0
    m2 = write_manifest(tmp_path / "m2.parquet", rows(3), SCHEMA)
    assert cli_main(["run", *args, "--manifest", m2, "--extend"]) == 0
    assert read_metadata(out).num_rows == 3
    assert '"images_this_attempt": 1' in capsys.readouterr().out

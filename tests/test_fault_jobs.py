"""Faults during a running job (issue 14): an interrupted run retried, a stream that ends short, a disk that
fills while committing, a driver killed with SIGKILL. Each ends with the exactly-once check of
``tests/test_resume.py`` once the fault is gone."""

from __future__ import annotations

import errno
import json
import os
import signal
import time

import pytest
import yaml
from conftest import write_manifest
from test_resume import ROWS, SPEC, _start_driver, assert_exactly_once, spec_for

from batch.cli import main as cli_main
from batch.run import pipeline, reaper
from batch.run.job import run_job
from batch.store.commit import LEASE, RUN_RECORD, SUCCESS_MARKER, metadata_parts
from batch.store.io import TMP_MARK, open_output

pytestmark = pytest.mark.e2e

QUICK = {"height": 64, "width": 64, "num_inference_steps": 2}
PLANNED4 = sum(r["num_images"] for r in ROWS[:4])


def test_a_stream_that_ends_short_writes_no_marker_and_retry_failed_finishes_it(tmp_path, ray_session,
                                                                               monkeypatch, capsys):
    """A block lost between the pipeline and the driver (a node gone with it): the run is recorded
    incomplete, exit code 3, no _SUCCESS. Then `retry-failed` on that interrupted run: images without a
    record were never ok, so it generates them too (it used to write _SUCCESS with images still pending)."""
    manifest = write_manifest(tmp_path / "m.parquet", ROWS[:4])
    output = str(tmp_path / "out")
    real = pipeline.run_items

    def lossy(*args, **kwargs):
        for i, block in enumerate(real(*args, **kwargs)):
            if i:  # the first block never arrives
                yield block

    monkeypatch.setattr(pipeline, "run_items", lossy)
    summary = run_job(spec_for(manifest, output, defaults=QUICK))
    out = open_output(output)
    assert not summary.complete and summary.exit_code == 3 and summary.images_pending > 0
    assert "INCOMPLETE" in summary.text() and not out.exists(SUCCESS_MARKER)
    assert out.get_json(RUN_RECORD)["status"] == "incomplete"
    assert cli_main(["compact", output]) == 2  # nothing downstream takes it for finished
    capsys.readouterr()

    pending = summary.images_pending
    monkeypatch.setattr(pipeline, "run_items", real)
    assert cli_main(["retry-failed", output, "--quiet"]) == 0
    assert f"this attempt {pending} (" in capsys.readouterr().out
    assert_exactly_once(output, PLANNED4)


def test_a_full_disk_while_committing_ends_the_job_with_its_state_recorded(tmp_path, ray_session, monkeypatch,
                                                                          capsys):
    """ENOSPC on the second metadata part: exit 3 with one line, run.json "crashed" with the reason, the lease
    released, no temp file left; once there is space, resume finishes exactly once."""
    import fsspec.implementations.local as local

    manifest = write_manifest(tmp_path / "m.parquet", ROWS[:4])
    output = str(tmp_path / "out")
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump({**SPEC, "defaults": QUICK}))
    real = local.LocalFileSystem.pipe_file
    parts = []

    def full_disk(self, path, value, *args, **kwargs):  # the driver's writes only: workers are other processes
        if "/metadata/" in str(path):
            parts.append(path)
            if len(parts) > 1:
                with open(path, "wb") as f:
                    f.write(value[: len(value) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, path, value, *args, **kwargs)

    monkeypatch.setattr(local.LocalFileSystem, "pipe_file", full_disk)
    rc = cli_main(["run", str(cfg), "--manifest", manifest, "--output", output, "--quiet"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sdbatch:")]
    assert rc == 3 and len(err) == 1 and "storage: cannot write" in err[0] and "No space left" in err[0]
    out = open_output(output)
    record = out.get_json(RUN_RECORD)
    assert record["status"] == "crashed" and "No space left on device" in record["attempts"][-1]["error"]
    assert out.get_json(LEASE)["released"] is True
    assert not [k for k in out.list("metadata") if TMP_MARK in k]

    monkeypatch.setattr(local.LocalFileSystem, "pipe_file", real)
    assert cli_main(["resume", output, "--quiet"]) == 0
    assert_exactly_once(output, PLANNED4)


def test_a_driver_killed_with_sigkill_leaves_no_ray_processes(tmp_path):
    """Its embedded Ray's agents used to outlive it; the watchdog (batch.run.reaper) ends every process
    that Ray started, by pid, and removes the private temp dir."""
    rows = [{"id": f"r{i}", "prompt": "x"} for i in range(40)]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    output = str(tmp_path / "out")
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump({**SPEC, "defaults": {**QUICK, "num_inference_steps": 8}}))
    proc = _start_driver(cfg, manifest, output)
    out = open_output(output)
    deadline = time.monotonic() + 240
    while not metadata_parts(out):  # Ray is up and its workers are generating
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the driver never committed"
        time.sleep(0.2)
    temp_dirs = {arg for pid in reaper.descendants(proc.pid) for arg in reaper._cmdline(pid).split()
                 if "/sdbatch-ray-" in arg}
    temp_dir = "/tmp/" + next(iter(temp_dirs)).split("/sdbatch-ray-")[1].split("/")[0]
    temp_dir = "/tmp/sdbatch-ray-" + temp_dir[len("/tmp/"):]
    ray_procs = reaper.ray_processes(proc.pid, temp_dir)
    assert len(ray_procs) >= 4  # gcs, raylet, agents, workers

    os.kill(proc.pid, signal.SIGKILL)  # the driver alone, as `kill -9 PID` does
    proc.wait()
    deadline = time.monotonic() + 60
    while (left := [p for p in reaper.survivors(ray_procs, temp_dir, os.getpid())]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert left == [], [reaper._cmdline(p)[:100] for p in left]
    while os.path.exists(temp_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not os.path.exists(temp_dir)
    assert json.loads((tmp_path / "out" / RUN_RECORD).read_text())["status"] == "running"  # SIGKILL: no word

"""Exactly once under faults: a killed driver, a killed sampler actor, flaky storage, failed images retried.

Every test ends by checking the same invariant (:func:`assert_exactly_once`): each planned image has one
committed record, ok, whose object exists and matches its sha256, and no raw part repeats a key.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import fsspec
import pytest
from conftest import write_manifest
from fsspec.implementations.memory import MemoryFileSystem

from batch.cli import main as cli_main
from batch.spec.config import parse_spec
from batch.store.commit import RunExistsError, RunInProgressError
from batch.run.job import run_job
from batch.store.commit import LEASE, RUN_RECORD, SUCCESS_MARKER, metadata_parts, read_metadata, read_parts
from batch.store.io import RetryPolicy, open_output

pytestmark = pytest.mark.e2e  # every test here runs a job on Ray

ROOT = Path(__file__).resolve().parents[1]
ROWS = [{"id": f"row-{i:02d}", "prompt": f"a small picture number {i}", "num_images": 1 + i % 2} for i in range(10)]
PLANNED = sum(r["num_images"] for r in ROWS)
SPEC = {"model": "tiny", "device": "cpu", "dtype": "float32", "progress": False, "batch_size": 1, "actors": 1,
        "commit_every": 1, "defaults": {"height": 64, "width": 64, "num_inference_steps": 8}}


def spec_for(manifest: str, output: str, **kw):
    return parse_spec({**SPEC, "manifest": manifest, "output": output, **kw})


def worker_pid(worker: str) -> int:
    """The process id in a metadata ``worker`` (``host:pid[/gpu..][/node-..]``)."""
    return int(worker.split(":", 1)[1].split("/", 1)[0])


def assert_exactly_once(output: str, planned: int = PLANNED, storage_options: dict | None = None,
                        skipped: int = 0) -> None:
    """... and, with deduplication (``dedup_against``), ``skipped`` images recorded as reused: their ``uri`` is
    an earlier run's image, which must exist and match the recorded sha256 just the same."""
    out = open_output(output, storage_options)
    raw = read_parts(out)
    keys = Counter(zip(raw.column("manifest_row").to_pylist(), raw.column("image_index").to_pylist()))
    assert max(keys.values()) == 1, [k for k, n in keys.items() if n > 1]  # never committed twice
    meta = read_metadata(out)
    status = Counter(meta.column("status").to_pylist())
    assert meta.num_rows == planned and status == Counter({"ok": planned - skipped, "skipped": skipped}) - Counter()
    assert len(set(zip(meta.column("id").to_pylist(), meta.column("image_index").to_pylist()))) == planned
    for r in meta.to_pylist():
        data = out.fs.cat_file(out.fs._strip_protocol(r["uri"]))
        assert hashlib.sha256(data).hexdigest() == r["sha256"] and len(data) == r["file_size"]
    assert out.exists(SUCCESS_MARKER)


# --- the driver killed with SIGKILL, then restarted ------------------------------------------------------


def _start_driver(cfg: Path, manifest: str, output: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "batch.cli", "run", str(cfg), "--manifest", manifest,
                             "--output", output, "--quiet"], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 240.0) -> None:
    """SIGKILL the driver's whole process group (driver and its embedded Ray) once ``ready()`` holds."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"driver exited early: {proc.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_driver_killed_at_several_points_then_resumed_commits_every_image_once(tmp_path, ray_session):
    manifest = write_manifest(tmp_path / "m.parquet", ROWS)
    output = str(tmp_path / "out")
    cfg = tmp_path / "job.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(SPEC))
    out = open_output(output)
    # kill points are events observed on disk (the run record, committed parts in metadata/), never delays
    kill_points = [("after the run record", None), ("after 2 more parts", 2), ("after 1 more part", 1)]
    parts_seen = []
    for name, more_parts in kill_points:
        before = len(metadata_parts(out))
        if more_parts is None:
            ready = lambda: out.exists(RUN_RECORD)  # noqa: E731
        else:
            ready = lambda n=before + more_parts: len(metadata_parts(out)) >= n  # noqa: E731
        _kill_when(_start_driver(cfg, manifest, output), ready)
        parts_seen.append(len(metadata_parts(out)))
        assert not out.exists(SUCCESS_MARKER), name
    assert parts_seen[1] >= parts_seen[0] + 2 and parts_seen[2] >= parts_seen[1] + 1
    committed = read_metadata(output).num_rows
    summary = run_job(spec_for(manifest, output))  # the restart (here in-process) finishes the run
    assert summary.images_this_attempt == PLANNED - committed > 0  # the kills really interrupted the run
    assert summary.images_ok == PLANNED and summary.images_skipped == committed
    record = out.get_json(RUN_RECORD)
    # every kill came after its driver recorded its attempt, then the restart's attempt
    assert len(record["attempts"]) == 4 and record["status"] == "finished"
    assert_exactly_once(output)


# --- a sampler actor killed mid-run ----------------------------------------------------------------------


def test_killed_sampler_actor_is_restarted_and_its_rows_redone(tmp_path, ray_session):
    # enough work (36 images x 16 steps) that the actor is usually still busy when the first part is committed;
    # the checks below hold either way (a fast actor may have handed back all its blocks before the kill)
    rows = [{"id": f"row-{i:02d}", "prompt": f"a small picture number {i}", "num_images": 1 + i % 2} for i in range(24)]
    planned = sum(r["num_images"] for r in rows)
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    output = str(tmp_path / "out")
    out = open_output(output)
    killed: list[tuple[int, float, float]] = []  # (pid, time before the kill, time the process was gone)

    def killer():
        import psutil

        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and len(metadata_parts(out)) < 1:
            time.sleep(0.05)
        # the actor that did this run's first committed work (not an idle sampler left by an earlier test)
        workers = set(read_parts(out).column("worker").to_pylist()) - {None}
        for pid in sorted({worker_pid(w) for w in workers}):
            t_before = time.time()
            try:
                proc = psutil.Process(pid)
                os.kill(pid, signal.SIGKILL)
                proc.wait(timeout=30)
            except (ProcessLookupError, psutil.NoSuchProcess):
                continue
            killed.append((pid, t_before, time.time()))

    thread = threading.Thread(target=killer)
    thread.start()
    summary = run_job(spec_for(manifest, output, defaults={"height": 64, "width": 64, "num_inference_steps": 16}))
    thread.join()
    assert killed, "the actor that committed the first part was gone before it could be killed"
    pid, t_before, t_gone = killed[0]
    assert summary.images_ok == planned and summary.exit_code == 0
    meta = read_metadata(output).to_pylist()
    by_killed = [r for r in meta if worker_pid(r["worker"]) == pid]
    by_others = [r for r in meta if worker_pid(r["worker"]) != pid]
    assert by_killed  # the killed actor committed rows first (the first part was its work) ...
    assert all(r["sampled_at"] <= t_gone for r in by_killed)  # ... all sampled before it died ...
    # ... and every other image was sampled after the kill, by the replacement Ray started (none when the
    # killed actor had already handed back all its work)
    assert all(r["sampled_at"] >= t_before for r in by_others)
    assert len(by_killed) + len(by_others) == planned
    assert_exactly_once(output, planned)


# --- transient storage errors ----------------------------------------------------------------------------


class FlakyMemoryFS(MemoryFileSystem):
    """An in-memory filesystem whose first ``failures`` writes raise a throttling error (S3's 503 SlowDown)."""

    protocol = "flakymem"
    failures = 0
    writes = 0

    @classmethod
    def _strip_protocol(cls, path):
        if path.startswith("flakymem://"):
            path = "memory://" + path[len("flakymem://"):]
        return super()._strip_protocol(path)

    def pipe_file(self, path, value, **kwargs):
        FlakyMemoryFS.writes += 1  # every other write of the first 2 * failures fails: each kind of write is hit
        if FlakyMemoryFS.writes <= 2 * FlakyMemoryFS.failures and FlakyMemoryFS.writes % 2:
            raise OSError("503 SlowDown: please reduce your request rate")
        return super().pipe_file(path, value, **kwargs)


def test_job_completes_when_the_first_writes_fail_transiently(tmp_path, ray_session, monkeypatch):
    fsspec.register_implementation("flakymem", FlakyMemoryFS, clobber=True)
    monkeypatch.setattr("batch.store.io.DEFAULT_RETRY", RetryPolicy(base_seconds=0.01, max_seconds=0.05))
    FlakyMemoryFS.failures, FlakyMemoryFS.writes = 8, 0
    manifest = write_manifest(tmp_path / "m.parquet", ROWS[:4])
    output = f"flakymem://flaky-{tmp_path.name}/out"
    summary = run_job(spec_for(manifest, output, storage_retries=6, defaults={"height": 64, "width": 64,
                                                                            "num_inference_steps": 2}))
    assert FlakyMemoryFS.writes > 2 * FlakyMemoryFS.failures  # the failures happened, and were retried
    assert summary.images_ok == sum(r["num_images"] for r in ROWS[:4]) and summary.exit_code == 0
    meta = read_metadata(output)
    out = open_output(output)
    for r in meta.to_pylist():
        assert hashlib.sha256(out.fs.cat_file(out.fs._strip_protocol(r["uri"]))).hexdigest() == r["sha256"]


# --- failed images, retry-failed, status, compact, the lease -----------------------------------------------


def test_failed_images_are_retried_alone_and_status_reports_them(tmp_path, ray_session, capsys):
    rows = ROWS[:4]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    output = tmp_path / "out"
    from batch.store.io import image_key

    # a storage fault for one row: its folder's name is taken by a file, so its 2 images fail to write
    blocked = output / image_key("row-01", 1).rsplit("/", 1)[0]
    blocked.parent.mkdir(parents=True)
    blocked.write_text("in the way")
    first = run_job(spec_for(manifest, str(output), max_failed_fraction=0.5))
    assert (first.images_ok, first.images_failed, first.rows_failed) == (4, 2, 1)
    assert cli_main(["status", str(output)]) == 0
    text = capsys.readouterr().out
    assert "4 done, 2 failed, 0 pending" in text and "failed x2: FileExistsError" in text

    blocked.unlink()
    assert cli_main(["retry-failed", str(output), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "images: 6 ok, 0 failed" in text and "this attempt 2 (4 already committed)" in text
    assert len(read_parts(open_output(str(output)))) == 8  # the failed records stay in their parts ...
    meta = read_metadata(str(output))  # ... but readers see the latest record only
    assert meta.num_rows == 6 and set(meta.column("status").to_pylist()) == {"ok"}

    assert cli_main(["compact", str(output)]) == 0
    assert "-> 1" in capsys.readouterr().out
    assert read_metadata(str(output)).sort_by("manifest_row").equals(meta.sort_by("manifest_row"))
    assert len(read_parts(open_output(str(output)))) == 6
    assert cli_main(["status", str(output), "--json"]) == 0
    assert '"images_ok": 6' in capsys.readouterr().out


def test_live_lease_refuses_a_second_driver(tmp_path, ray_session):
    manifest = write_manifest(tmp_path / "m.parquet", ROWS[:1])
    output = str(tmp_path / "out")
    quick = {"height": 64, "width": 64, "num_inference_steps": 1}
    run_job(spec_for(manifest, output, defaults=quick))
    out = open_output(output)
    out.put_json(LEASE, {"attempt": "other", "host": "another-host", "pid": 1, "heartbeat": time.time(),
                         "released": False})
    with pytest.raises(RunInProgressError, match="another-host"):
        run_job(spec_for(manifest, output, defaults=quick))
    assert run_job(spec_for(manifest, output, defaults=quick), force=True).images_ok == 1  # --force takes over
    with pytest.raises(RunExistsError, match=r"defaults.num_inference_steps: 1 -> 8\n"):
        run_job(spec_for(manifest, output))

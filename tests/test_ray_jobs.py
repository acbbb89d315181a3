"""The documented cluster path: a local Ray head with the dashboard (`ray start --head`), a tiny generation
job submitted with `ray job submit --working-dir . -- python jobs/generate.py --config ...`, its outputs
checked, the head stopped. Only this test's own head is touched: it runs in its own session with its own
temp dir and ports it holds until Ray binds them, and is stopped by killing its processes (never `ray stop`, which stops every Ray
on the machine)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import write_manifest

from batch.store.commit import RUN_RECORD, SUCCESS_MARKER, read_metadata
from batch.store.io import open_output
from batch.store.formats import decode_image

pytestmark = pytest.mark.e2e  # every test here starts a Ray head (`ray start`) in a subprocess

REPO = Path(__file__).resolve().parent.parent
AUTH_TOKEN = Path.home() / ".ray" / "auth_token"


def _reserve_ports(n: int) -> list[socket.socket]:
    """``n`` distinct loopback ports, each held by a bound socket until the caller closes it (just before Ray
    binds them), so no other process is handed the same port by the kernel in the meantime."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    return socks


def _own_pids(marker: str) -> list[int]:
    """Processes whose command line names this head's private temp dir."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if marker in (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(p.name))
            except OSError:
                continue
    return pids


def _stop_head(head: subprocess.Popen, temp: str) -> None:
    """Stop only this head: its process group, then anything else naming its temp dir, by PID."""
    try:
        os.killpg(head.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 8
    while _own_pids(temp) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in _own_pids(temp):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    head.wait(timeout=30)


def _start_head(env: dict, bin_dir: str) -> tuple[subprocess.Popen, str, str]:
    """One try at a Ray head with its own temp dir and ports held until the moment it starts. Returns
    (process, temp dir, dashboard URL); raises RuntimeError (head stopped) if it exits or never answers."""
    temp = tempfile.mkdtemp(prefix="sdbr-", dir="/tmp")  # short: Ray's unix sockets live under it
    socks = _reserve_ports(9)
    gcs, dash, client, nm, om, agent, agent_grpc, rt_env, metrics = (s.getsockname()[1] for s in socks)
    cmd = [str(Path(bin_dir) / "ray"), "start", "--head", "--block", "--num-cpus=2", "--num-gpus=0",
           f"--temp-dir={temp}", f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", f"--ray-client-server-port={client}", f"--node-manager-port={nm}",
           f"--object-manager-port={om}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={rt_env}",
           f"--metrics-export-port={metrics}", "--disable-usage-stats", "--node-ip-address=127.0.0.1"]
    for s in socks:  # released only now, for Ray to bind
        s.close()
    with open(Path(temp) / "head.log", "w") as log:
        head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2).read()
            return head, temp, url
        except OSError:
            if head.poll() is not None or time.monotonic() > deadline:
                _stop_head(head, temp)
                text = (Path(temp) / "head.log").read_text()[-3000:]
                shutil.rmtree(temp, ignore_errors=True)
                raise RuntimeError("ray head did not start:\n" + text) from None
            time.sleep(1)


@pytest.fixture
def ray_head():
    """A Ray head with dashboard on loopback ports of its own; yields (dashboard URL, env for clients)."""
    had_token = AUTH_TOKEN.exists()
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
           "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    for tries_left in (2, 1, 0):  # a port taken between its release and Ray's bind: start again, fresh ports
        try:
            head, temp, url = _start_head(env, bin_dir)
            break
        except RuntimeError:
            if not tries_left:
                raise
    try:
        yield url, env
    finally:
        _stop_head(head, temp)
        shutil.rmtree(temp, ignore_errors=True)
        if not had_token:
            assert not AUTH_TOKEN.exists(), "a Ray auth token was left under ~/.ray"


def test_ray_job_submit_runs_generate_on_a_local_head(ray_head, tmp_path):
    url, env = ray_head
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "job-a", "prompt": "a lighthouse", "num_images": 2},
                                                        {"id": "job-b", "prompt": "a forest", "seed": 3}])
    out_uri = str(tmp_path / "out")
    submit = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", url, "--working-dir", ".",
              "--submission-id", "sdbatch-test-generate", "--",
              "python", "jobs/generate.py", "--config", "configs/demo.yaml", "--manifest", manifest,
              "--output", out_uri, "--quiet", "--set", "defaults.num_inference_steps=2",
              "--shared-path", str(tmp_path)]  # the head runs here: tmp_path is a mount every node shares
    done = subprocess.run(submit, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in (done.stdout + done.stderr).lower()

    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(url)
    assert client.get_job_status("sdbatch-test-generate") == JobStatus.SUCCEEDED
    logs = client.get_job_logs("sdbatch-test-generate")
    assert "images: 3 ok, 0 failed" in logs  # the job's own summary line
    last = json.loads(logs.strip().splitlines()[-1])  # ... and the JSON line automation reads, last
    assert last["exit_code"] == 0 and last["sdbatch_summary"]["images_ok"] == 3

    # a relative output under `ray job submit` would land in Ray's per-job working dir: refused, exit 2
    relative = submit[:submit.index("--submission-id") + 1] + ["sdbatch-test-relative"] + \
        submit[submit.index("--submission-id") + 2:]
    relative = relative[:relative.index("--output") + 1] + ["out/run"] + relative[relative.index("--output") + 2:]
    refused = subprocess.run(relative, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert refused.returncode != 0
    assert client.get_job_status("sdbatch-test-relative") == JobStatus.FAILED
    logs = client.get_job_logs("sdbatch-test-relative")
    assert "output 'out/run' is a relative path, but the job runs on a cluster" in logs
    assert json.loads(logs.strip().splitlines()[-1])["exit_code"] == 2

    out = open_output(out_uri)
    assert out.exists(SUCCESS_MARKER)
    record = out.get_json(RUN_RECORD)
    assert record["status"] == "finished" and record["attempts"][-1]["resources"]["cluster_cpus"] == 2.0
    meta = read_metadata(out_uri).to_pylist()
    assert sorted((r["id"], r["image_index"], r["status"]) for r in meta) == [
        ("job-a", 0, "ok"), ("job-a", 1, "ok"), ("job-b", 0, "ok")]
    for r in meta:
        assert decode_image(out.fs.cat_file(out.fs._strip_protocol(r["uri"]))).shape == (64, 64, 3)
    events = [json.loads(x) for x in (tmp_path / "out" / "logs" / f"{record['run_id']}.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "start" and events[-1]["event"] == "finish"

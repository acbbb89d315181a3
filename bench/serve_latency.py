"""Serving latency and throughput: ``sdbatch serve`` over HTTP against ``sdbatch run`` on the same model.

Issue 19's measure: p50/p95 request latency at 1 and 8 concurrent clients, and the endpoint's images/s at 8
clients as a fraction of the batch job's (target >= 0.8), on the CPU tiny model.

1. **Batch job.** ``sdbatch run`` (a subprocess, its own embedded Ray) on a manifest of ``--images`` prompts with
   fixed seeds. Its rate is the steady one (``batch.run.stats.steady_rate``: images after the first sampler
   batch over the time between the first and the last batch end, from the metadata's ``sampled_at``), so the
   job's start-up (Ray, model load) is left out, as the server's is. Its rate including start-up is reported too.
2. **Endpoint.** ``sdbatch serve`` (a subprocess, the same spec plus its ``serve:`` section) started once; after
   it prints its ready line and answers a few warm-up requests, for each client count ``c`` the same
   ``--images`` single-image requests (``POST /generate``, the plain form, same prompts and seeds) are sent by
   ``c`` threads, each sending its next request when its last reply came (closed loop). Latency is per
   request (send to full reply); throughput is requests over the phase's wall time.

Both sides sample with one replica (``actors: 1`` / ``serve.replicas: 1``) and the same ``batch_size``; the
server collects up to ``batch_size`` concurrent requests per sampler call (``serve.max_batch_size``).

    .venv/bin/python bench/serve_latency.py [--images 48] [--steps 4] [--size 64] [--batch-size 4]
        [--clients 1 8] [--out bench/results/cpu2-serve-DATE.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from common import ROOT, emit

from batch.run.stats import steady_rate
from batch.store.commit import read_metadata

SDBATCH = [sys.executable, "-m", "batch.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float = 600.0) -> tuple[int, dict, float]:
    """One request: (status, JSON reply, seconds from send to the whole reply)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, data = r.status, r.read()
    except urllib.error.HTTPError as err:
        status, data = err.code, err.read()
    return status, json.loads(data or b"null"), time.perf_counter() - t0


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation between order statistics."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def run_batch_job(spec_path: Path, rows: list[dict], tmp: Path) -> dict:
    """``sdbatch run`` on the rows; its steady images/s (from ``sampled_at``) and its rate with start-up."""
    manifest, out = tmp / "manifest.parquet", tmp / "batch-out"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    t0 = time.perf_counter()
    proc = subprocess.run(SDBATCH + ["run", str(spec_path), "--manifest", str(manifest), "--output", str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"sdbatch run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    meta = read_metadata(str(out))
    assert meta.num_rows == len(rows) and set(meta.column("status").to_pylist()) == {"ok"}, meta.num_rows
    return {"steady_images_per_s": steady_rate(Counter(meta.column("sampled_at").to_pylist())),
            "images_per_s_incl_startup": len(rows) / wall, "wall_s": wall}


class Server:
    """``sdbatch serve SPEC --port P`` in a subprocess: started, waited for (its ready line), stopped by SIGTERM."""

    def __init__(self, spec_path: Path, port: int, log: Path):
        self.url = f"http://127.0.0.1:{port}"
        self.log = log.open("w")
        self.proc = subprocess.Popen(SDBATCH + ["serve", str(spec_path), "--port", str(port)], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.started = time.perf_counter()

    def wait_ready(self, timeout: float = 300.0) -> float:
        """Seconds until the ready line; the server's output is read on a thread so a silent hang times out."""
        lines: list[str] = []
        done = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                lines.append(line)
                if '"ready"' in line:
                    done.set()
            done.set()

        threading.Thread(target=read, daemon=True).start()
        if not done.wait(timeout) or self.proc.poll() is not None:
            raise SystemExit(f"sdbatch serve did not get ready (exit {self.proc.poll()}); see {self.log.name}")
        return time.perf_counter() - self.started

    def stop(self, timeout: float = 60.0) -> int | None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return None


def load_phase(url: str, rows: list[dict], clients: int) -> dict:
    """Closed loop: ``clients`` threads send the rows' requests one after another; latency and throughput."""
    todo = list(rows)
    lock = threading.Lock()
    latencies: list[float] = []
    batch_sizes: Counter = Counter()
    errors: list[str] = []

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                row = todo.pop(0)
            status, reply, dt = post(url + "/generate", {k: v for k, v in row.items() if k != "id"})
            with lock:
                if status != 200:
                    errors.append(f"{status}: {reply}")
                    continue
                latencies.append(dt)
                batch_sizes[reply["metadata"].get("batch_images")] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return {"clients": clients, "requests": len(latencies), "wall_s": round(wall, 3),
            "images_per_s": round(len(latencies) / wall, 4),
            "p50_ms": round(1000 * percentile(latencies, 0.5), 1), "p95_ms": round(1000 * percentile(latencies, 0.95), 1),
            "max_ms": round(1000 * max(latencies), 1), "mean_ms": round(1000 * statistics.fmean(latencies), 1),
            "sampler_batch_images": {str(k): v for k, v in sorted(batch_sizes.items(), key=lambda kv: str(kv[0]))}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=48, help="images per phase (and in the batch job)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--warmup", type=int, default=4, help="requests sent before timing")
    ap.add_argument("--out", help="also append the RESULT line's JSON to this file")
    args = ap.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spec = {"task": "txt2img", "model": "tiny", "device": "cpu", "dtype": "float32", "progress": False,
                "batch_size": args.batch_size, "actors": 1, "seed": 0,
                "defaults": {"height": args.size, "width": args.size, "num_inference_steps": args.steps,
                             "guidance_scale": 7.5, "scheduler": "pndm"},
                "serve": {"replicas": 1, "max_batch_size": args.batch_size, "batch_wait_ms": 20,
                          "max_images_per_request": 8, "max_queued_images": 4 * args.images}}
        spec_path = tmp / "spec.yaml"
        spec_path.write_text(yaml.safe_dump(spec))
        rows = [{"id": f"r{i:04d}", "prompt": f"benchmark prompt {i}", "seed": 1000 + i} for i in range(args.images)]

        # 1. the batch job
        job = run_batch_job(spec_path, rows, tmp)
        print(f"batch job: {job['steady_images_per_s']:.3f} images/s steady, "
              f"{job['images_per_s_incl_startup']:.3f} with start-up ({job['wall_s']:.1f} s)", flush=True)

        # 2. the endpoint: start, warm up, then one closed-loop phase per client count
        server = Server(spec_path, free_port(), tmp / "serve.log")
        try:
            ready_s = server.wait_ready()
            for i in range(args.warmup):
                status, reply, _ = post(server.url + "/generate", {"prompt": f"warm-up {i}", "seed": i})
                assert status == 200, reply
            phases = []
            for c in args.clients:
                phases.append(load_phase(server.url, rows, c))
                p = phases[-1]
                print(f"{c} client(s): {p['images_per_s']:.3f} images/s, p50 {p['p50_ms']} ms, "
                      f"p95 {p['p95_ms']} ms, sampler batches {p['sampler_batch_images']}", flush=True)
        finally:
            exit_code = server.stop()
        top = max(phases, key=lambda p: p["clients"])
        result = {"bench": "serve_latency", "device": "cpu", "model": "tiny", "images": args.images,
                  "steps": args.steps, "size": args.size, "batch_size": args.batch_size,
                  "batch_job_steady_images_per_s": round(job["steady_images_per_s"], 4),
                  "batch_job_images_per_s_incl_startup": round(job["images_per_s_incl_startup"], 4),
                  "serve_ready_s": round(ready_s, 1), "phases": phases,
                  "ratio_at_max_clients": round(top["images_per_s"] / job["steady_images_per_s"], 3),
                  "serve_exit_code": exit_code}
        emit(result)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(result, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()

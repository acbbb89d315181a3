"""``sdbatch serve`` over real HTTP on loopback: one server per module (``configs/serve-demo.yaml``: tiny model,
CPU, 64x64), started as the CLI starts it and stopped with SIGTERM at the end."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.plan.manifest import plan, split_problems
from batch.spec.config import load_spec
from batch.store.formats import decode_image
from batch.store.schema import RESERVED_COLUMNS

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "serve-demo.yaml")
SLOW_STEPS = 60  # a request that keeps the sampler busy for a second or more (tiny model, 64x64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "batch.cli", "serve", CONFIG, "--port", str(self.port),
             "--set", "serve.max_queued_images=8"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
        self.lines: list[str] = []
        ready = threading.Event()

        def read():
            for line in self.proc.stdout:
                self.lines.append(line)
                if '"ready"' in line:
                    ready.set()
            ready.set()  # exited

        threading.Thread(target=read, daemon=True).start()
        assert ready.wait(180) and self.proc.poll() is None, f"server did not start: {self.lines}"
        assert json.loads(self.lines[-1]) == {"event": "ready", "url": self.url}

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


@pytest.fixture(scope="module")
def server():
    srv = Server()
    yield srv
    if srv.proc.poll() is None:
        srv.stop()


def call(server, path, body=None, timeout=120):
    """(status, parsed JSON body) of GET ``path`` or POST ``body`` (a dict, or raw bytes)."""
    data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def in_thread(fn, *args):
    """Start ``fn(*args)`` in a thread; the returned function joins it and gives its result."""
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", fn(*args)), daemon=True)
    t.start()
    return lambda: (t.join(180), out["r"])[1]


def wait_queue(server, at_least: int | None = None, exactly: int | None = None, timeout: float = 30) -> int:
    """Poll ``/queue`` until the images accepted and not yet answered reach ``at_least`` (or equal ``exactly``)."""
    deadline = time.monotonic() + timeout
    while True:
        n = call(server, "/queue")[1]["queued_images"]
        if (at_least is not None and n >= at_least) or (exactly is not None and n == exactly):
            return n
        assert time.monotonic() < deadline, f"queue stayed at {n}"
        time.sleep(0.02)


def png(b64: str):
    return decode_image(base64.b64decode(b64))


def test_build_app_reads_the_spec_from_a_uri_and_refuses_what_it_cannot_serve():
    """What a RayService's serveConfigV2 passes: {config: <path or fsspec URI>, set: {...}} (no Ray started)."""
    import fsspec

    from batch.serve.app import build_app, load_serve_spec
    from batch.spec.base import SpecError

    with fsspec.open("memory://sdbatch-serve/spec.yaml", "w") as fh:
        fh.write(Path(CONFIG).read_text())
    spec = load_serve_spec("memory://sdbatch-serve/spec.yaml", {"serve.max_batch_size": 16})
    assert spec.serve.max_batch_size == 16 and spec.model == "tiny"
    with fsspec.open("memory://sdbatch-serve/up.yaml", "w") as fh:
        fh.write("task: upscale\n")
    with pytest.raises(SpecError, match="serves task txt2img only"):
        build_app({"config": "memory://sdbatch-serve/up.yaml"})
    with pytest.raises(ValueError, match="expected config"):
        build_app({"conf": CONFIG})


def test_health_and_ready(server):
    assert call(server, "/health") == (200, {"status": "ok"})
    assert call(server, "/ready") == (200, {"status": "ready"})


def test_plain_request_returns_png_seed_and_metadata(server):
    status, body = call(server, "/generate", {"id": "p1", "prompt": "a red fox", "seed": 7, "num_inference_steps": 3})
    assert status == 200, body
    image = base64.b64decode(body["image"])
    assert png(body["image"]).shape == (64, 64, 3) and body["seed"] == 7
    meta = body["metadata"]
    assert meta["id"] == "p1" and meta["seed"] == 7 and meta["prompt"] == "a red fox" and meta["status"] == "ok"
    assert meta["num_inference_steps"] == 3 and meta["model"] == "tiny" and meta["scheduler"] == "pndm"
    assert "nsfw" in meta and meta["nsfw"] is None  # the tiny model ships no safety checker
    assert meta["sha256"] == hashlib.sha256(image).hexdigest() and meta["batch_images"] >= 1
    # no id: a generated one, and the returned seed reproduces the image
    status, anon = call(server, "/generate", {"prompt": "a red fox", "num_inference_steps": 3})
    assert status == 200 and anon["metadata"]["id"].startswith("req-")
    again = call(server, "/generate", {"prompt": "a red fox", "num_inference_steps": 3, "seed": anon["seed"]})[1]
    assert again["image"] == anon["image"]


def test_served_pngs_equal_the_batch_jobs_bytes(server, tmp_path):
    """Four rows of one bucket: one GPU batch of batch_size 4 in the batch job and in the endpoint (one request
    holding exactly that batch's rows), so the PNGs are byte-identical (seeds given and derived)."""
    from batch.cli import main

    rows = [{"id": "a", "prompt": "a cat", "seed": 5}, {"id": "b", "prompt": "a dog", "seed": None},
            {"id": "c", "prompt": "a cow", "seed": 123456789}, {"id": "d", "prompt": "an owl", "seed": None}]
    manifest = str(tmp_path / "m.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([("id", pa.string()), ("prompt", pa.string()),
                                                                 ("seed", pa.int64())])), manifest)
    out = str(tmp_path / "out")
    assert main(["run", CONFIG, "--manifest", manifest, "--output", out, "--quiet"]) == 0
    meta = pq.read_table(os.path.join(out, "metadata")).to_pylist()
    written = {m["id"]: Path(m["uri"].removeprefix("file://")).read_bytes() for m in meta}
    seeds = {m["id"]: m["seed"] for m in meta}

    doc = {"input_data": {"columns": ["id", "prompt", "seed"], "data": [list(r.values()) for r in rows]}}
    status, body = call(server, "/score", doc)
    assert status == 200, body
    assert [b["prompt"] for b in body] == [r["prompt"] for r in rows]
    for r, b in zip(rows, body):
        assert base64.b64decode(b["generated_image"]) == written[r["id"]], r["id"]
    # the plain form: the same row alone is a batch of 1 in both, and reproduces its own seed
    plain = call(server, "/generate", {"id": "b", "prompt": "a dog"})[1]
    assert plain["seed"] == seeds["b"] and plain["metadata"]["batch_images"] == 1


def test_catalogue_request_and_response_shape(server):
    doc = {"input_data": {"columns": ["prompt", "num_images"], "data": [["a ship", 2], ["a tree", 1]],
                          "index": ["k1", "k2"], "parameters": {"num_inference_steps": 3, "guidance_scale": 5.0}}}
    status, body = call(server, "/score", doc)
    assert status == 200 and isinstance(body, list), body
    assert [sorted(b) for b in body] == [["generated_image", "nsfw_content_detected", "prompt"]] * 3
    assert [b["prompt"] for b in body] == ["a ship", "a ship", "a tree"]
    assert all(png(b["generated_image"]).shape == (64, 64, 3) and b["nsfw_content_detected"] is None for b in body)
    assert body[0]["generated_image"] != body[1]["generated_image"]  # seeds s and s + 1


def test_bad_requests_get_400_with_the_manifest_validation_text(server):
    spec = load_spec(CONFIG)
    row = {"id": "r", "prompt": "x", "height": 65, "num_inference_steps": 0}
    error = plan(pa.Table.from_pylist([row]), spec, RESERVED_COLUMNS).failed["error"][0].as_py()
    status, body = call(server, "/generate", row)
    assert status == 400 and body["errors"] == [f"request: {p}" for p in split_problems(error)]
    status, body = call(server, "/score", {"input_data": {"columns": list(row), "data": [list(row.values())]}})
    assert status == 400 and body["errors"] == [f"input_data.data[0]: {p}" for p in split_problems(error)]
    status, body = call(server, "/generate", {"prompt": "x", "image_uri": "file:///etc/passwd"})
    assert status == 400 and "image_uri: unknown field" in body["error"]
    status, body = call(server, "/generate", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]


def test_too_many_images_get_413(server):
    doc = {"input_data": {"columns": ["prompt", "num_images"], "data": [["x", 5], ["y", 4]]}}
    status, body = call(server, "/score", doc)
    assert status == 413 and "max_images_per_request=8" in body["error"]


def test_a_full_queue_gets_429(server):
    big = {"input_data": {"columns": ["prompt", "num_images"], "data": [["x", 8]],
                          "parameters": {"num_inference_steps": SLOW_STEPS // 4}}}
    first = in_thread(call, server, "/score", big)
    wait_queue(server, at_least=8)  # serve.max_queued_images=8 (set at startup): the queue is full
    status, body = call(server, "/generate", {"prompt": "one more"})
    assert status == 429 and "max_queued_images=8" in body["error"]
    status, body = first()
    assert status == 200 and len(body) == 8
    assert call(server, "/generate", {"prompt": "one more", "num_inference_steps": 2})[0] == 200


def test_concurrent_compatible_requests_share_a_sampler_call_and_incompatible_ones_do_not(server):
    blocker = in_thread(call, server, "/generate", {"prompt": "busy", "num_inference_steps": SLOW_STEPS})
    wait_queue(server, at_least=1)
    time.sleep(0.2)  # longer than serve.batch_wait_ms (20): the blocker's batch has closed and is sampling
    same = [in_thread(call, server, "/generate", {"prompt": f"p{i}", "num_inference_steps": 3}) for i in range(3)]
    other = in_thread(call, server, "/generate", {"prompt": "q", "num_inference_steps": 2})
    results = [f() for f in same] + [other()]
    assert all(s == 200 for s, _ in results), results
    metas = [b["metadata"] for _, b in results]
    # the three compatible requests waited behind the blocker and were sampled in one call
    assert [m["batch_images"] for m in metas[:3]] == [3, 3, 3]
    assert metas[3]["batch_images"] == 1 and metas[3]["num_inference_steps"] == 2
    assert blocker()[1]["metadata"]["batch_images"] == 1


def test_a_cancelled_request_leaves_the_batch_and_the_server_healthy(server):
    steps = SLOW_STEPS // 2
    doc = json.dumps({"input_data": {"columns": ["prompt"], "data": ["c1", "c2", "c3"],
                                     "parameters": {"num_inference_steps": steps}}}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(doc) + doc)
    wait_queue(server, at_least=3)
    # a compatible request collected with it (or waiting behind it)
    partner = in_thread(call, server, "/generate", {"prompt": "partner", "num_inference_steps": steps})
    wait_queue(server, at_least=4)
    sock.close()  # the client goes away before the reply
    wait_queue(server, exactly=1, timeout=60)  # the cancelled request's images are given back at once
    status, body = partner()
    assert status == 200 and png(body["image"]).shape == (64, 64, 3), body
    wait_queue(server, exactly=0)
    assert call(server, "/ready")[0] == 200
    assert call(server, "/generate", {"prompt": "after", "num_inference_steps": 2})[0] == 200


def test_sigterm_stops_the_server_with_exit_0_and_frees_the_port(server):
    t0 = time.monotonic()
    assert server.stop(timeout=60) == 0
    assert time.monotonic() - t0 < 60
    assert any('"stopped"' in line for line in server.lines)
    with socket.socket() as s:  # nothing listens there any more: a new server can (SO_REUSEADDR, as uvicorn)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", server.port))
        s.listen()

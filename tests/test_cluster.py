"""A multi-node Ray cluster on one machine (``ray.cluster_utils.Cluster``): a worker node removed mid-run (a
spot preemption) loses and duplicates nothing; a node added mid-run is used by the elastic sampler pool (the
first node's sampler is held after its first block until a sampler on the new node has committed rows, so
the outcome never depends on machine speed). Here (2 cores, idle): about 60 s for the first, 30 s for the second.

The head has no CPUs (it hosts only the driver and the objects it puts); each worker node has 2 logical CPUs,
room for one sampler actor (``cpus_per_actor: 1.5``) and two writers, so a second sampler needs a second node.
Manifest and outputs live on the loopback S3 server only: no node shares a disk with another. Every step waits
for an event (a committed part, a node's first rows), never for a fixed time.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import loopback_s3
from test_resume import assert_exactly_once

from batch.run.job import run_job
from batch.spec.config import parse_spec
from batch.store.commit import metadata_parts, read_metadata, read_parts
from batch.store.io import open_output

pytestmark = pytest.mark.e2e  # starts a Ray cluster and runs jobs on it

NODE = {"num_cpus": 2, "object_store_memory": 80 * 1024**2}
ROWS = [{"id": f"row-{i:02d}", "prompt": f"a small picture number {i}"} for i in range(24)]
BUCKET = "sdbatch-cluster"


@pytest.fixture(scope="module")
def s3_options():
    with loopback_s3(BUCKET) as options:
        yield options


@pytest.fixture(scope="module")
def cluster():
    """A head without CPUs and one worker node; the session's embedded Ray (if any) is restored afterwards."""
    import ray
    from ray.cluster_utils import Cluster

    was_up = ray.is_initialized()
    if was_up:
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 80 * 1024**2,
                                                       "include_dashboard": False})
    c.add_node(**NODE)
    c.wait_for_nodes()
    # every worker process of these jobs runs the gate hook first (Ray's worker_process_setup_hook; a closure,
    # so Ray pickles it by value: this test module is not importable on the workers); it acts only while a
    # test writes GATE_CONFIG (test_a_node_added_mid_run_is_used_by_the_pool)
    ray.init(address=c.address, logging_level="WARNING",
             runtime_env={"worker_process_setup_hook": _gate_hook_for(GATE_CONFIG)})
    yield c
    ray.shutdown()
    c.shutdown()
    if was_up:  # the conftest's session Ray, for the tests that run after these
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")


GATE_CONFIG = f"/tmp/sdbatch-cluster-gate-{uuid.uuid4().hex[:8]}.json"  # {"node", "free", "gate"} while on


def _gate_hook_for(config_path: str):
    """The worker hook: while ``config_path`` exists and names this worker's Ray node, its sampler makes its
    first ``free`` calls (one block: the first commit), then waits before each later call until the ``gate``
    file exists (or ``safety_s`` passed: a failing test must still end). So the first node cannot finish the
    job alone however fast it is: the work that remains must go to a sampler on another node."""

    def hook():
        import json
        import os
        import time

        import ray

        from batch.run import stages

        real = stages.Sampler.__call__
        node = ray.get_runtime_context().get_node_id()
        calls = {"n": 0}

        def gated(self, batch):
            try:
                with open(config_path) as f:
                    config = json.load(f)
            except OSError:
                config = None
            if config and config["node"] == node:
                calls["n"] += 1
                deadline = time.monotonic() + config["safety_s"]
                while calls["n"] > config["free"] and not os.path.exists(config["gate"]) \
                        and time.monotonic() < deadline:
                    time.sleep(0.1)
            return real(self, batch)

        stages.Sampler.__call__ = gated

    return hook


def _job(cluster, s3_options, name: str, steps: int, **kw):
    """The job: 24 images of 64x64, one per sampler call, on an elastic pool of 1 to 2 samplers. ``steps``
    sets how much work there is: enough that a node joining after the first commit still finds work."""
    fs = open_output(f"s3://{BUCKET}", s3_options).fs
    manifest = f"s3://{BUCKET}/{name}/manifest.parquet"
    with fs.open(manifest.removeprefix("s3://"), "wb") as f:
        pq.write_table(pa.Table.from_pylist(ROWS), f)
    return parse_spec({"model": "tiny", "device": "cpu", "dtype": "float32", "progress": False, "batch_size": 1,
                       "actors": {"min": 1, "max": 2}, "cpus_per_actor": 1.5, "writer_cpus": 0.25,
                       "commit_every": 1, "ray_address": cluster.address, "storage_options": s3_options,
                       "manifest": manifest, "output": f"s3://{BUCKET}/{name}/out",
                       "defaults": {"height": 64, "width": 64, "num_inference_steps": steps}, **kw})


def _node_of(worker: str) -> str:
    return worker.rsplit("/node-", 1)[1]


def _run_with(spec, ready, action, timeout: float = 300.0, then=None, release=None) -> dict:
    """Run the job in a thread and ``action()`` in this (main) thread as soon as ``ready()`` holds (polled):
    ``Cluster.add_node``/``remove_node`` install signal handlers, which only the main thread may do. With
    ``then``: wait (polled) until ``then()`` holds too, then call ``release()``.
    Returns ``{"summary": ...}`` or ``{"error": ...}`` from the job, ``"acted"`` if the event came and
    ``"then"`` if ``then()`` held while the job ran."""
    result: dict = {}

    def job():
        try:
            result["summary"] = run_job(spec)
        except Exception as err:  # noqa: BLE001 - reported to the test
            result["error"] = err

    thread = threading.Thread(target=job, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while thread.is_alive() and not ready():
        assert time.monotonic() < deadline, "event never happened"
        time.sleep(0.1)
    if thread.is_alive():
        action()
        result["acted"] = True
    if then is not None:
        while thread.is_alive() and time.monotonic() < deadline and not then():
            time.sleep(0.2)
        result["then"] = then()
        release()
    thread.join(timeout)
    assert not thread.is_alive(), "job did not finish"
    return result


def test_a_worker_node_removed_mid_run_loses_and_duplicates_nothing(cluster, s3_options):
    """A spot preemption: the node of the actor that committed the first rows is killed (no graceful
    shutdown) and a replacement node joins. The lost actor is restarted by Ray (its constructor arguments live
    in the driver's object store on the head, which survives) and its unfinished blocks are redone; the run
    (or, if it fails, one resume) commits every image exactly once."""
    spec = _job(cluster, s3_options, f"lose-{uuid.uuid4().hex[:6]}", steps=6)
    out = open_output(spec.output, s3_options)
    events: dict = {}

    def preempt():
        first = read_parts(out).column("worker").to_pylist()[0]
        victim = next(n for n in cluster.worker_nodes if n.node_id[:12] == _node_of(first))
        events["removed_at"] = time.time()
        cluster.remove_node(victim, allow_graceful=False)
        events["gone_at"] = time.time()  # its raylet is dead; its worker processes exit right after
        events["removed"] = victim.node_id[:12]
        events["replacement"] = cluster.add_node(**NODE).node_id[:12]

    result = _run_with(spec, lambda: len(metadata_parts(out)) >= 1, preempt)
    assert result.get("acted"), "the run finished before its first commit was seen"
    summary = result.get("summary")
    if "error" in result:  # allowed: the rerun below must then finish the run
        events["failed"] = result["error"]
    if summary is None or summary.exit_code != 0:
        summary = run_job(spec)  # `sdbatch resume`: only what is missing
    assert summary.images_ok == len(ROWS) and summary.exit_code == 0
    assert_exactly_once(spec.output, len(ROWS), s3_options)
    meta = read_metadata(spec.output, s3_options).to_pylist()
    removed = [r for r in meta if _node_of(r["worker"]) == events["removed"]]
    # "after the loss": 1 s after remove_node returned (the node's processes may finish a call as they die)
    after = events["gone_at"] + 1
    assert removed and all(r["sampled_at"] <= after for r in removed)  # only before the loss
    assert any(r["sampled_at"] > events["removed_at"] for r in meta)  # the loss really came mid-run
    assert {_node_of(r["worker"]) for r in meta if r["sampled_at"] > after} <= \
        {n.node_id[:12] for n in cluster.worker_nodes}  # after the loss only surviving or new nodes worked
    print(f"node loss: {'the run failed (' + repr(events['failed']) + '), a resume finished it' if 'failed' in events else 'the run itself finished'}")


def test_a_node_added_mid_run_is_used_by_the_pool(cluster, s3_options, tmp_path):
    """The elastic pool (1 to 2 samplers) grows onto a node that joins mid-run. The only worker node has room
    for one sampler; its sampler is held after its first block (the gate hook) until a sampler on the node
    added after the first commit has committed rows, so the outcome never depends on machine speed: the pool
    grows onto the new node, or the test fails at the safety timeout."""
    import json

    from batch.plan.batches import cut_blocks

    spec = _job(cluster, s3_options, f"grow-{uuid.uuid4().hex[:6]}", steps=2)
    out = open_output(spec.output, s3_options)
    (first,) = [n.node_id for n in cluster.worker_nodes]
    gate = tmp_path / "open"
    numbered = pa.Table.from_pylist(ROWS).append_column("_batch", pa.array(range(len(ROWS)), pa.int64()))
    free = cut_blocks(numbered, 1, 2)[0].num_rows  # the first block's sampler calls (batch_size 1: one a row)
    with open(GATE_CONFIG, "w") as f:
        json.dump({"node": first, "free": free, "gate": str(gate), "safety_s": 150}, f)
    events: dict = {}

    def new_node_committed() -> bool:
        return "new" in events and events["new"] in {_node_of(w) for w in read_parts(out).column("worker").to_pylist()}

    def grow():
        events["added_at"] = time.time()
        events["new"] = cluster.add_node(**NODE).node_id[:12]  # main thread: Cluster installs signal handlers

    try:  # the gate opens once the new node committed rows (or at the timeout, so the job can end)
        result = _run_with(spec, lambda: len(metadata_parts(out)) >= 1, grow, timeout=150,
                           then=new_node_committed, release=gate.touch)
    finally:
        gate.touch()
        os.remove(GATE_CONFIG)
    assert result.get("acted"), "the run finished before its first commit was seen"
    assert result.get("then"), "no sampler on the node added mid-run committed rows (the gate's safety timeout)"
    summary = result["summary"]
    assert summary.images_ok == len(ROWS) and summary.exit_code == 0
    assert_exactly_once(spec.output, len(ROWS), s3_options)
    by_node: dict[str, int] = {}
    for r in read_metadata(spec.output, s3_options).to_pylist():
        by_node[_node_of(r["worker"])] = by_node.get(_node_of(r["worker"]), 0) + 1
        if _node_of(r["worker"]) == events["new"]:
            assert r["sampled_at"] > events["added_at"]
    assert set(by_node) == {first[:12], events["new"]} and by_node[events["new"]] > 0, by_node
    print(f"node added: images by node {by_node}")

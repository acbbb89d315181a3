"""The run lease: create-if-absent on each store (local link, memory://, S3 ``If-None-Match: *`` on the loopback
moto server), takeover of a lapsed lease by exactly one of two racing drivers, and the one retry layer per
filesystem (botocore for S3, ``retrying`` elsewhere). No Ray."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from conftest import loopback_s3

from batch.store import commit
from batch.store.commit import LEASE, LEASE_CLAIMS, Lease, RunInProgressError
from batch.store.io import has_own_retries, open_output, retrying


@pytest.fixture(scope="module")
def s3_options():
    with loopback_s3("sdbatch-lease") as options:
        yield options


@pytest.fixture(params=["local", "memory", "s3"])
def output(request, tmp_path):
    """An empty output prefix on each kind of store."""
    if request.param == "local":
        return open_output(str(tmp_path / "run"))
    if request.param == "memory":
        return open_output(f"memory://lease-{uuid.uuid4().hex}/run")
    return open_output(f"s3://sdbatch-lease/{uuid.uuid4().hex}/run", request.getfixturevalue("s3_options"))


def _race(fn, n: int = 6) -> list:
    """Call ``fn(i)`` from ``n`` threads released together; their results (or exceptions)."""
    barrier, results = threading.Barrier(n), [None] * n

    def run(i):
        barrier.wait()
        try:
            results[i] = fn(i)
        except Exception as err:  # noqa: BLE001 - the race's loser raises: that is the result
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_create_if_absent_has_exactly_one_winner(output):
    wins = _race(lambda i: output.create("k", f"writer {i}".encode()))
    assert wins.count(True) == 1 and wins.count(False) == len(wins) - 1
    assert output.get("k") == f"writer {wins.index(True)}".encode()  # the winner's bytes, whole
    assert not [k for k in output.list("") if ".tmp-" in k]  # local: no temp file left behind


def test_s3_create_sends_if_none_match_and_the_server_refuses_a_second(s3_options):
    """moto 5.2.5 honours ``If-None-Match: *``: a second create gets 412 PreconditionFailed."""
    import boto3
    from botocore.exceptions import ClientError

    out = open_output(f"s3://sdbatch-lease/{uuid.uuid4().hex}/run", s3_options)
    out.fs.connect()
    sent = []
    out.fs.s3.meta.events.register("before-send.s3.PutObject", lambda request, **_: sent.append(request.headers))
    assert out.create("_LEASE", b"first") is True and out.create("_LEASE", b"second") is False
    assert [h.get("If-None-Match") for h in sent] == [b"*", b"*"] and out.get("_LEASE") == b"first"
    raw = boto3.client("s3", aws_access_key_id="testing", aws_secret_access_key="testing",
                       **s3_options["client_kwargs"])
    with pytest.raises(ClientError) as err:
        raw.put_object(Bucket="sdbatch-lease", Key=out.path("_LEASE").split("/", 1)[1], Body=b"x", IfNoneMatch="*")
    assert err.value.response["Error"]["Code"] == "PreconditionFailed"
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412


def test_a_live_lease_refuses_a_second_driver_and_is_free_once_released(output):
    first = Lease(output, "attempt-1")
    try:
        assert output.get_json(LEASE)["epoch"] == 0 and not output.list(LEASE_CLAIMS)
        with pytest.raises(RunInProgressError, match="attempt-1"):
            Lease(output, "attempt-2")
    finally:
        first.release()
    second = Lease(output, "attempt-2")  # released: taken over as epoch 1, claimed once
    second.release()
    assert output.get_json(LEASE)["epoch"] == 1 and output.list(LEASE_CLAIMS) == [f"{LEASE_CLAIMS}/000001"]


def test_two_drivers_racing_for_a_lapsed_lease_one_wins_and_the_stalled_holder_stops(output, monkeypatch):
    output.put_json(LEASE, {"attempt": "stalled", "host": "elsewhere", "pid": 1, "epoch": 3, "released": False,
                            "heartbeat": time.time() - commit.LEASE_SECONDS - 1})
    results = _race(lambda i: Lease(output, f"racer-{i}"), n=4)
    winners = [r for r in results if isinstance(r, Lease)]
    assert len(winners) == 1, results
    assert all(isinstance(r, RunInProgressError) for r in results if r is not winners[0])
    held = output.get_json(LEASE)
    assert (held["attempt"], held["epoch"]) == (winners[0].attempt, 4)
    assert output.get_json(f"{LEASE_CLAIMS}/000004")["attempt"] == winners[0].attempt
    winners[0].release()

    # a holder that stalled past LEASE_SECONDS and was taken over stops beating at its next heartbeat
    monkeypatch.setattr(commit, "HEARTBEAT_SECONDS", 0.01)
    stalled = Lease(output, "slow", force=True)
    taker = Lease(output, "taker", force=True)
    stalled._thread.join(timeout=10)
    assert stalled.lost and not stalled._thread.is_alive()
    stalled.release()  # does not overwrite the new holder's lease
    assert output.get_json(LEASE)["attempt"] == "taker"
    taker.release()


def test_one_retry_layer_per_filesystem(s3_options, tmp_path):
    s3 = open_output(f"s3://sdbatch-lease/{uuid.uuid4().hex}/run", s3_options, retries=4)
    s3.fs.connect()
    # S3: botocore retries each request (standard mode, 4 tries in all); our layer makes one try
    assert s3.fs.s3.meta.config.retries == {"mode": "standard", "total_max_attempts": 4}
    assert has_own_retries(s3.fs) and s3.retry.attempts == 1
    local = open_output(str(tmp_path / "run"), retries=4)
    assert not has_own_retries(local.fs) and local.retry.attempts == 4

    calls = []

    class Throttled:
        protocol = ("s3", "s3a")

        def put(self):
            calls.append(1)
            raise OSError("503 SlowDown")

    with pytest.raises(OSError, match="SlowDown"):
        retrying(Throttled().put)
    assert len(calls) == 1  # not retried again on top of the client's own retries

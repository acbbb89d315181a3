"""The structured run log on a local disk (appended) and on an object-store-like filesystem (rewritten)."""

from __future__ import annotations

import uuid

from batch.store.runlog import MAX_FAILURES, RunLog, log_key, read_log
from batch.store.io import open_output


def test_local_log_appends_every_event(tmp_path):
    out = open_output(str(tmp_path / "run"))
    log = RunLog(out, "r1")
    log.event("start", rows=3)
    log.event("block", images=3, ok=2, failed=1)
    assert [e["event"] for e in read_log(out, "r1")] == ["start", "block"]  # visible at once, no flush
    log.warning("lossy")
    events = read_log(out, "r1")
    assert events[-1] == {**events[-1], "event": "warning", "message": "lossy", "run_id": "r1"}
    assert (tmp_path / "run" / log_key("r1")).is_file()


def test_remote_log_is_rewritten_whole_and_throttled():
    out = open_output(f"memory://sdbatch-log-{uuid.uuid4().hex}/run")
    log = RunLog(out, "r2", flush_seconds=3600)
    log.event("start", force=True)
    log.event("block", images=1)  # within the throttle window: not written yet
    assert [e["event"] for e in read_log(out, "r2")] == ["start"]
    for i in range(MAX_FAILURES + 5):
        log.failure(id=f"x{i}", error="boom")
    log.event("finish", force=True)
    events = read_log(out, "r2")
    assert [e["event"] for e in events][:2] == ["start", "block"] and events[-1]["event"] == "finish"
    assert sum(e["event"] == "failure" for e in events) == MAX_FAILURES and log.failures == MAX_FAILURES + 5


def test_remote_log_of_a_resumed_run_keeps_earlier_attempts():
    out = open_output(f"memory://sdbatch-log-{uuid.uuid4().hex}/run")
    first = RunLog(out, "r3")
    first.event("start", attempt="a1", force=True)
    first.event("crashed", force=True)
    second = RunLog(out, "r3")  # the next attempt of the same run
    second.event("start", attempt="a2", force=True)
    second.event("finish", force=True)
    assert [(e["event"], e.get("attempt")) for e in read_log(out, "r3")] == [
        ("start", "a1"), ("crashed", None), ("start", "a2"), ("finish", None)]

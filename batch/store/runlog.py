"""Structured per-run log: one JSON object per line at ``<output>/logs/<run_id>.jsonl``.

Events (each has ``ts`` (UTC ISO time), ``event``, ``run_id``):

* ``start``: rows, images planned, output format, resources;
* ``warning``: e.g. a lossy image format;
* ``block``: a finished block (images ok/failed, images done so far);
* ``commit``: a metadata part committed (part number, rows committed so far);
* ``failure``: one per failed image or row (id, manifest_row, image_index, error), up to ``MAX_FAILURES``
  (the metadata has them all);
* ``finish`` (summary counts and timings) or ``crashed`` (the error).

On a local filesystem lines are appended as they happen. Object stores have no append: the whole log is
rewritten (one atomic put) at most every ``flush_seconds`` and at finish/crash, so a reader always sees
a complete prefix of the events; a resumed attempt starts from the stored log, so earlier attempts'
events stay.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from typing import Any

from batch.store.io import Output

LOGS_DIR = "logs"
MAX_FAILURES = 1000
logger = logging.getLogger("sdbatch")


def log_key(run_id: str) -> str:
    return f"{LOGS_DIR}/{run_id}.jsonl"


class RunLog:
    """Appends structured events to the run's JSON-lines log (see module docstring)."""

    def __init__(self, out: Output, run_id: str, flush_seconds: float = 10.0):
        self.out, self.run_id, self.key = out, run_id, log_key(run_id)
        self.lines: list[str] = []
        self.failures = 0
        self.flush_seconds = flush_seconds
        self._last_flush = 0.0
        if out.is_local:
            out.fs.makedirs(out.path(LOGS_DIR), exist_ok=True)
        elif out.exists(self.key):  # an earlier attempt's events: the rewrite keeps them
            self.lines = out.get(self.key).decode().splitlines()

    def event(self, event: str, force: bool = False, **fields: Any) -> None:
        rec = {"ts": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"), "event": event,
               "run_id": self.run_id, **fields}
        line = json.dumps(rec, sort_keys=False, default=str)
        if self.out.is_local:  # append to the file as we go
            with open(self.out.path(self.key), "a", encoding="utf-8") as f:
                f.write(line + "\n")
        else:  # object stores cannot append: keep the lines, rewrite the object now and then
            self.lines.append(line)
            if force or time.monotonic() - self._last_flush >= self.flush_seconds:
                self.flush()

    def warning(self, message: str) -> None:
        logger.warning(message)
        self.event("warning", message=message)

    def failure(self, **fields: Any) -> None:
        self.failures += 1
        if self.failures <= MAX_FAILURES:
            self.event("failure", **fields)

    def flush(self) -> None:
        if not self.out.is_local and self.lines:
            self.out.put(self.key, ("\n".join(self.lines) + "\n").encode())
            self._last_flush = time.monotonic()


def read_log(out: Output, run_id: str) -> list[dict]:
    """The events of a run's log, in order."""
    return [json.loads(line) for line in out.get(log_key(run_id)).decode().splitlines() if line.strip()]

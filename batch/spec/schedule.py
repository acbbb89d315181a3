"""Scheduled dataset runs: one output prefix per day, ``<base>/dt=YYYY-MM-DD/`` (Hive-style partition).

A nightly job (``infra/k8s/nightly.yaml``: a CronJob that creates a RayJob) passes the day it was triggered
for; every attempt on that day writes to the same prefix with the same run id and spec, so a rerun continues
the day's run instead of starting a second one (resume skips the rows already committed) and the day's
dataset never holds an image twice.
"""

from __future__ import annotations

import datetime as dt
import re

_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def parse_day(text: str | None) -> dt.date:
    """``YYYY-MM-DD`` (or None: today in UTC)."""
    if text is None:
        return dt.datetime.now(dt.timezone.utc).date()
    if not _DAY.match(text):
        raise ValueError(f"--date must be YYYY-MM-DD, got {text!r}")
    return dt.date.fromisoformat(text)


def dated_prefix(base: str, day: dt.date) -> str:
    """``<base>/dt=YYYY-MM-DD/``: the day's output prefix under ``base`` (any fsspec URI)."""
    if not base:
        raise ValueError("dated output needs a base prefix")
    return f"{base.rstrip('/')}/dt={day.isoformat()}/"


def scheduled_run_id(day: dt.date) -> str:
    """The run id of a day's scheduled run: the same for every attempt on that day."""
    return f"dt-{day.isoformat()}"

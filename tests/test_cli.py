"""The command line itself: --version, and a reader that closes the pipe early (``sdbatch ... | head -1``)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from batch.cli import main
from batch.store.commit import RUN_RECORD, MetadataCommitter
from batch.store.io import open_output

ROOT = Path(__file__).resolve().parent.parent


def test_version_prints_the_installed_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"sdbatch {importlib.metadata.version('sdbatch')}"


@pytest.fixture
def small_run(tmp_path):
    """An output prefix with a run record and one committed failed row: enough for ``sdbatch status``."""
    out = open_output(str(tmp_path / "run"))
    out.put_json(RUN_RECORD, {"run_id": "r1", "status": "finished", "rows": 1, "images_planned": 0, "attempts": []})
    committer = MetadataCommitter(out, pa.schema([]), "r1", "a1", 100, 3600)
    committer.add(pa.Table.from_pylist([{"id": "x", "manifest_row": 0, "image_index": None, "num_images": 1,
                                         "status": "failed", "error": "prompt: empty"}]))
    committer.flush()
    return str(tmp_path / "run")


def test_status_json_is_valid(small_run, capsys):
    assert main(["status", small_run, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["run_id"] == "r1" and report["rows_failed"] == 1


@pytest.mark.e2e  # the sdbatch command in a subprocess (~8 s each: a fresh interpreter imports torch)
@pytest.mark.parametrize("flags", [["--json"], []], ids=["json", "text"])
def test_status_into_a_closed_pipe_exits_quietly(small_run, flags):
    """``sdbatch status --json | head -1``: the reader is gone before the output is written. The pipe's read
    end is closed before the command starts, so every write meets a broken pipe (no timing involved)."""
    r, w = os.pipe()
    os.close(r)
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        proc = subprocess.run([sys.executable, "-m", "batch.cli", "status", small_run, *flags], stdout=w,
                              stderr=subprocess.PIPE, env=env, timeout=300)
    finally:
        os.close(w)
    err = proc.stderr.decode()
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err
    assert proc.returncode == 1

"""A scheduled (dated) run through the real entry point `jobs/generate.py` and Ray: WebDataset + lossless
WebP output, a safety checker with the blackout policy, the structured log, a grid from the shards; then the
same day's run again into the same prefix: no image twice."""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import write_manifest
from PIL import Image

from batch.cli import main as cli_main
from batch.store.runlog import read_log
from batch.models.safety import save_tiny_safety_checker
from batch.spec.schedule import dated_prefix, parse_day, scheduled_run_id
from batch.store.commit import SUCCESS_MARKER, read_metadata
from batch.store.io import open_output
from batch.store.formats import ImageReader

REPO = Path(__file__).resolve().parent.parent
DAY = "2026-11-23"
ROWS = [{"id": f"n{i}", "prompt": f"nightly prompt {i}", "num_images": 1 + i % 2} for i in range(4)]


def _generate_main():
    spec = importlib.util.spec_from_file_location("jobs_generate", REPO / "jobs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_dir):
    d = tmp_path_factory.mktemp("nightly")
    model = shutil.copytree(tiny_dir, d / "model")
    save_tiny_safety_checker(model, concept_threshold=-2.0)  # flags every image
    manifest = write_manifest(d / "prompts.parquet", ROWS)
    argv = ["--config", str(REPO / "configs" / "demo.yaml"), "--dated-output", str(d / "datasets"), "--date", DAY,
            "--manifest", manifest, "--model", str(model), "--quiet",
            "--set", "defaults.num_inference_steps=2", "--set", "output_format=webdataset",
            "--set", "image_format=webp", "--set", "safety_policy=blackout", "--set", "commit_every=2"]
    return d, argv


@pytest.fixture(scope="module")
def first_run(setup, ray_session):
    d, argv = setup
    assert _generate_main()(argv) == 0
    return dated_prefix(str(d / "datasets"), parse_day(DAY))


@pytest.mark.e2e
def test_dated_prefix_and_formats_through_ray(first_run, setup):
    d, _ = setup
    assert first_run == f"{d / 'datasets'}/dt={DAY}/"
    out = open_output(first_run)
    assert out.exists(SUCCESS_MARKER) and out.get_json("run.json")["run_id"] == scheduled_run_id(parse_day(DAY))
    meta = [r for r in read_metadata(first_run).to_pylist()]
    assert len(meta) == 6 and all(r["status"] == "ok" for r in meta)
    reader = ImageReader()
    for r in meta:
        assert r["uri"].endswith(".tar") and r["member"].endswith(".webp")  # spec fields reached the writers
        assert r["nsfw"] is True  # the checker ran in the actor ...
        assert not reader.read(r).any()  # ... and blackout reached it: black pixels
    stats = out.list("shards/_stats")
    assert sum(out.get_json(k)["written"] for k in stats) == 6


@pytest.mark.e2e
def test_structured_log(first_run):
    out = open_output(first_run)
    events = read_log(out, scheduled_run_id(parse_day(DAY)))
    kinds = Counter(e["event"] for e in events)
    assert events[0]["event"] == "start" and events[0]["rows"] == 4
    assert events[-1]["event"] == "finish" and events[-1]["images_ok"] == 6 and events[-1]["images_planned"] == 6
    assert kinds["block"] >= 1 and kinds["commit"] >= 1 and kinds["failure"] == 0
    assert sum(e["images"] for e in events if e["event"] == "block") == 6
    assert all(e["run_id"] == scheduled_run_id(parse_day(DAY)) and e["ts"] for e in events)
    assert json.dumps(events)  # plain JSON values only


@pytest.mark.e2e
def test_grid_from_webdataset_shards(first_run, tmp_path):
    assert cli_main(["grid", first_run, "--n", "4", "--out", str(tmp_path / "g.png"), "--cell", "32"]) == 0
    sheet = np.asarray(Image.open(tmp_path / "g.png").convert("RGB"))
    assert not sheet[:32, :32].any()  # first cell: the blacked-out image


@pytest.mark.e2e
def test_same_day_rerun_does_not_duplicate(first_run, setup, ray_session):
    """The second attempt on the same day resumes the day's run in the same prefix (issue 4's resume)."""
    _, argv = setup
    assert _generate_main()(argv) == 0
    meta = read_metadata(first_run).to_pylist()
    keys = [(r["id"], r["image_index"]) for r in meta if r["status"] == "ok"]
    assert len(keys) == len(set(keys)) == 6
    assert [p for p in Path(first_run).parent.iterdir()] == [Path(first_run.rstrip("/"))]  # one dated prefix
    ends = [e for e in read_log(open_output(first_run), scheduled_run_id(parse_day(DAY))) if e["event"] == "finish"]
    assert [e["images_this_attempt"] for e in ends] == [6, 0]  # the second attempt found everything committed


@pytest.mark.e2e
def test_status_reads_a_shard_format_run(first_run, capsys):
    capsys.readouterr()
    assert cli_main(["status", first_run, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["complete"] and report["images_ok"] == 6 and report["images_failed"] == 0


def test_entry_point_flags():
    run_argv = importlib.util.module_from_spec(
        s := importlib.util.spec_from_file_location("jobs_generate_flags", REPO / "jobs" / "generate.py"))
    s.loader.exec_module(run_argv)
    run_argv = run_argv.run_argv
    assert run_argv(["--config", "c.yaml", "--output", "o"]) == ["run", "c.yaml", "--output", "o"]
    assert run_argv(["c.yaml", "--quiet"]) == ["run", "c.yaml", "--quiet"]  # positional still works
    argv = run_argv(["--config", "c.yaml", "--dated-output", "s3://b/n/", "--date", "2026-01-02", "--run-id", "x"])
    assert argv == ["run", "c.yaml", "--run-id", "x", "--output", "s3://b/n/dt=2026-01-02/", "--date", "2026-01-02"]
    # without --dated-output the day is only the spec's date (seed_per_day, run.json)
    assert run_argv(["c.yaml", "--output", "o", "--date", "2026-01-02"]) == ["run", "c.yaml", "--output", "o",
                                                                           "--date", "2026-01-02"]
    for bad in (["--date", "2026-1-2"], ["--dated-output", "b", "--date", "2026-1-2"],
                ["--dated-output", "b", "--output", "o"]):
        with pytest.raises(SystemExit):
            run_argv(["c.yaml", *bad])
    assert dated_prefix("memory://x", parse_day("2026-02-28")) == "memory://x/dt=2026-02-28/"
    with pytest.raises(ValueError):
        parse_day("2026-02-30")

"""Incremental dataset runs end to end (issue 15), three small Ray runs of a ``seed_per_day`` dataset: a rerun
of day 1 with ``dedup_against`` day 1 skips the equal images (same seeds; recording day 1's uri) and generates
only the new and changed ones; day 2 draws other seeds (nothing matches) and may not reuse day 1's prefix.
Tiny model, 64x64, 2 steps."""

from __future__ import annotations

import pytest
from conftest import write_manifest
from test_resume import assert_exactly_once

from batch.plan.seeds import day_seed, derive_row_seed
from batch.run.job import run_job
from batch.spec.config import parse_spec
from batch.store.commit import RUN_RECORD, RunExistsError, read_metadata
from batch.store.io import open_output
from batch.store.runlog import read_log

pytestmark = pytest.mark.e2e  # runs jobs on Ray

SPEC = {"model": "tiny", "device": "cpu", "dtype": "float32", "progress": False, "batch_size": 2, "actors": 1,
        "seed": 3, "defaults": {"height": 64, "width": 64, "num_inference_steps": 2}}
FIRST = [{"id": "a", "prompt": "a red cube"}, {"id": "b", "prompt": "a blue ball"}, {"id": "c", "prompt": "a tree"}]
SECOND = FIRST[:2] + [{"id": "c", "prompt": "a tall tree"}, {"id": "d", "prompt": "a new prompt"}]


DAY = {"seed_per_day": True, "date": "2026-03-01"}


def _job(tmp_path, name, rows, **kw):
    manifest = write_manifest(tmp_path / f"{name}.parquet", rows)
    return run_job(parse_spec({**SPEC, "manifest": manifest, "output": str(tmp_path / name), **kw}))


def _by_id(output):
    return {r["id"]: r for r in read_metadata(output).to_pylist()}


@pytest.fixture(scope="module")
def first(tmp_path_factory, ray_session):
    """Day 1 of a seed_per_day dataset: three images."""
    d = tmp_path_factory.mktemp("incremental")
    summary = _job(d, "run1", FIRST, **DAY)
    assert summary.images_ok == 3 and summary.exit_code == 0
    return d, summary


def test_rerun_of_the_day_reuses_equal_images_and_generates_only_new_and_changed(first):
    """The same day again (same seeds) with dedup_against day 1: the equal images are recorded with day 1's
    uri, only the changed and the new row are generated; a resume then has nothing left to do."""
    tmp_path, first = first
    second = _job(tmp_path, "run2", SECOND, dedup_against=[str(tmp_path / "run1")], **DAY)
    assert (second.images_ok, second.images_reused, second.images_this_attempt) == (2, 2, 2)
    assert second.complete and second.exit_code == 0 and second.rows_ok == 4
    assert_exactly_once(str(tmp_path / "run2"), planned=4, skipped=2)  # the reused objects exist and match
    old, new = _by_id(str(tmp_path / "run1")), _by_id(str(tmp_path / "run2"))
    for rid in ("a", "b"):
        assert new[rid]["status"] == "skipped" and new[rid]["uri"] == old[rid]["uri"]
        assert new[rid]["seed"] == old[rid]["seed"] == derive_row_seed(day_seed(3, "2026-03-01"), rid)
        assert new[rid]["sha256"] == old[rid]["sha256"] and new[rid]["reused_from"].endswith(f"run1 run {first.run_id}")
    for rid in ("c", "d"):  # changed prompt, new row: generated into run2
        assert new[rid]["status"] == "ok" and f"{tmp_path / 'run2'}/images/" in new[rid]["uri"]
    record = open_output(str(tmp_path / "run2")).get_json(RUN_RECORD)
    assert record["date"] == "2026-03-01" and record["run_seed"] == day_seed(3, "2026-03-01")
    assert record["attempts"][0]["dedup"]["images_reused"] == 2 and record["attempts"][0]["dedup"]["index_images"] == 3
    assert [e["images_reused"] for e in read_log(open_output(str(tmp_path / "run2")), second.run_id)
            if e["event"] == "dedup"] == [2]
    again = _job(tmp_path, "run2", SECOND, dedup_against=[str(tmp_path / "run1")], **DAY)  # resume: nothing left
    assert (again.images_this_attempt, again.images_reused, again.images_ok) == (0, 2, 2)
    assert_exactly_once(str(tmp_path / "run2"), planned=4, skipped=2)


def test_another_day_draws_other_seeds_and_is_another_run(first):
    tmp_path, _ = first
    seeds1 = {k: r["seed"] for k, r in _by_id(str(tmp_path / "run1")).items()}
    day2 = _job(tmp_path, "day2", FIRST, seed_per_day=True, date="2026-03-02", dedup_against=[str(tmp_path / "run1")])
    seeds2 = {k: r["seed"] for k, r in _by_id(str(tmp_path / "day2")).items()}
    assert day2.images_ok == 3 and day2.images_reused == 0 and all(seeds2[k] != seeds1[k] for k in seeds1)
    # another day into day 1's prefix is another run: refused with the differing field
    with pytest.raises(RunExistsError, match="date: '2026-03-01' -> '2026-03-02'"):
        _job(tmp_path, "run1", FIRST, seed_per_day=True, date="2026-03-02")

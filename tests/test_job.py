"""End-to-end runs through Ray on the tiny model: outputs, reproduction with plain diffusers, failures."""

from __future__ import annotations

import hashlib
import json

import diffusers
import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import write_manifest

from batch.cli import main as cli_main
from batch.spec.base import SpecError
from batch.spec.config import parse_spec
from batch.store.commit import RunExistsError
from batch.run.job import run_job
from batch.run.pipeline import cut_blocks, resolve_resources
from batch.store.card import CARD
from batch.store.commit import LEASE, RUN_RECORD, SUCCESS_MARKER, read_metadata
from batch.store.io import open_output
from batch.store.formats import decode_image

GOOD = [
    {"id": "a", "prompt": "a red cube", "seed": 11, "num_images": 2, "tag": "x"},
    {"id": "b", "prompt": "a blue sphere", "negative_prompt": "blurry", "tag": "y"},
    {"id": "c", "prompt": "a green cone", "guidance_scale": 3.0, "scheduler": "euler_a", "tag": None},
    {"id": "d", "prompt": "a tiny house", "seed": 5, "height": 32, "width": 48, "tag": "z"},
]
BAD = [
    {"id": "e-empty", "prompt": "", "tag": "bad"},
    {"id": "f-nan", "prompt": "ok", "guidance_scale": float("nan"), "tag": "bad"},
    {"id": "g-size", "prompt": "ok", "height": 60, "tag": "bad"},
    {"id": "h-steps", "prompt": "ok", "num_inference_steps": 0, "tag": "bad"},
    {"id": "dup", "prompt": "one", "tag": "bad"},
    {"id": "dup", "prompt": "two", "tag": "bad"},
]
SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("negative_prompt", pa.string()),
                    ("seed", pa.int64()), ("num_images", pa.int64()), ("guidance_scale", pa.float64()),
                    ("scheduler", pa.string()), ("height", pa.int64()), ("width", pa.int64()),
                    ("num_inference_steps", pa.int64()), ("tag", pa.string())])


def spec_for(manifest: str, output: str, **kw):
    base = {"model": "tiny", "device": "cpu", "dtype": "float32", "manifest": manifest, "output": output,
            "defaults": {"height": 64, "width": 64, "num_inference_steps": 4}, "batch_size": 3, "actors": 1,
            "progress": False, "max_failed_fraction": 0.6}
    base.update(kw)
    return parse_spec(base)


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, ray_session):
    d = tmp_path_factory.mktemp("mixed")
    manifest = write_manifest(d / "m.parquet", GOOD + BAD, SCHEMA)
    summary = run_job(spec_for(manifest, str(d / "out")))
    return summary, str(d / "out"), read_metadata(str(d / "out"))


@pytest.mark.e2e
def test_good_rows_complete_and_bad_rows_fail_with_field(mixed_run):
    summary, out, meta = mixed_run
    rows = meta.to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    failed = {r["id"] + str(r["manifest_row"]): r for r in rows if r["status"] == "failed"}
    assert sorted((r["id"], r["image_index"]) for r in ok) == [("a", 0), ("a", 1), ("b", 0),
                                                                ("c", 0), ("d", 0)]
    assert summary.rows_ok == 4 and summary.rows_failed == 6 and summary.images_ok == 5
    assert failed["e-empty4"]["error"].startswith("prompt:")
    assert failed["f-nan5"]["error"].startswith("guidance_scale:") and "nan" in failed["f-nan5"]["error"]
    assert "height: must be a multiple of 8" in failed["g-size6"]["error"]
    assert failed["h-steps7"]["error"].startswith("num_inference_steps:")
    assert failed["dup8"]["error"].startswith("id: duplicate") and failed["dup9"]["error"].startswith("id: duplicate")
    assert all(r["uri"] is None and r["image_index"] is None for r in failed.values())
    # carried column survives for good and bad rows alike, with its type
    assert meta.schema.field("tag").type == pa.string()
    assert {r["id"]: r["tag"] for r in rows}["c"] is None and {r["id"]: r["tag"] for r in ok}["d"] == "z"
    assert summary.exit_code == 0  # 6 of 10 rows failed: within max_failed_fraction=0.6
    assert summary.failure_reasons["id: duplicate id"] == 2


@pytest.mark.e2e
def test_objects_match_metadata_and_stay_under_prefix(mixed_run):
    _, out_uri, meta = mixed_run
    out = open_output(out_uri)
    for r in meta.to_pylist():
        if r["status"] != "ok":
            continue
        assert r["uri"].startswith(out.fs.unstrip_protocol(out.root) + "/images/")
        data = out.fs.cat_file(out.fs._strip_protocol(r["uri"]))
        assert hashlib.sha256(data).hexdigest() == r["sha256"] and len(data) == r["file_size"]
        assert decode_image(data).shape == (r["height"], r["width"], 3)
        assert r["seed"] == r["row_seed"] + r["image_index"]
        assert r["model"] == "tiny" and r["model_revision"] == "tiny-v1" and r["dtype"] == "float32"
    files = out.list("")
    assert all(f.startswith(("images/", "metadata/", "logs/", "manifest/rowhash-")) or f in (RUN_RECORD, SUCCESS_MARKER, LEASE, CARD)
               for f in files)
    record = out.get_json(RUN_RECORD)
    assert record["status"] == "finished" and record["summary"]["images_ok"] == 5
    assert record["attempts"][0]["versions"]["torch"].startswith("2.13") and record["spec"]["model"] == "tiny"
    assert out.get_json(LEASE)["released"] is True
    assert out.get_json(SUCCESS_MARKER)["run_id"] == record["run_id"]


@pytest.mark.e2e
def test_stored_png_equals_plain_diffusers_from_metadata_row_alone(mixed_run, tiny_dir):
    """Reproduce images with plain diffusers using nothing but each metadata row (tiny == tiny_dir)."""
    from diffusers import StableDiffusionPipeline

    _, out_uri, meta = mixed_run
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    out = open_output(out_uri)
    checked = 0
    for r in meta.to_pylist():
        if r["status"] != "ok":
            continue
        pipe.scheduler = getattr(diffusers, r["scheduler_class"]).from_config(json.loads(r["scheduler_config"]))
        ref = pipe(r["prompt"], negative_prompt=r["negative_prompt"], height=r["height"], width=r["width"],
                   num_inference_steps=r["num_inference_steps"], guidance_scale=r["guidance_scale"],
                   generator=torch.Generator("cpu").manual_seed(r["seed"]), output_type="np").images[0]
        ref = (ref * 255).round().astype(np.uint8)
        stored = decode_image(out.fs.cat_file(out.fs._strip_protocol(r["uri"])))
        assert np.abs(stored.astype(int) - ref).max() <= 1, r["id"]
        checked += 1
    assert checked == 5


@pytest.mark.e2e
def test_rerun_is_byte_identical_and_memory_filesystem_works(mixed_run, tmp_path, ray_session):
    _, _, first = mixed_run
    manifest = write_manifest(tmp_path / "m.parquet", GOOD + BAD, SCHEMA)
    uri = f"memory://rerun-{tmp_path.name}/out"
    run_job(spec_for(manifest, uri))
    second = read_metadata(uri)
    key = lambda t: {(r["id"], r["image_index"]): r["sha256"] for r in t.to_pylist() if r["status"] == "ok"}  # noqa: E731
    assert key(first) == key(second) and len(key(second)) == 5
    out = open_output(uri)
    assert out.exists(SUCCESS_MARKER) and len(out.list("images")) == 5
    for r in second.to_pylist():
        if r["status"] == "ok":
            assert hashlib.sha256(out.fs.cat_file(out.fs._strip_protocol(r["uri"]))).hexdigest() == r["sha256"]


@pytest.mark.e2e
def test_one_file_manifest_spreads_over_two_actors_without_deadlock(tmp_path, ray_session):
    rows = [{"id": f"r{i}", "prompt": f"prompt number {i}"} for i in range(16)]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    summary = run_job(spec_for(manifest, str(tmp_path / "out"), actors=2, batch_size=2))
    meta = read_metadata(str(tmp_path / "out"))
    assert summary.images_ok == 16 and summary.exit_code == 0
    assert len(set(meta.column("worker").to_pylist())) == 2


@pytest.mark.e2e
def test_existing_output_resumes_the_same_run_and_refuses_another(mixed_run, tmp_path):
    _, out, meta = mixed_run
    manifest = write_manifest(tmp_path / "m.parquet", GOOD + BAD, SCHEMA)
    again = run_job(spec_for(manifest, out, actors=2, batch_size=1))  # compute settings may change
    assert (again.images_this_attempt, again.images_skipped, again.images_ok, again.rows_failed) == (0, 5, 5, 6)
    assert read_metadata(out).num_rows == meta.num_rows  # nothing committed twice
    with pytest.raises(RunExistsError, match="seed: 0 -> 1"):
        run_job(spec_for(manifest, out, seed=1))
    changed = write_manifest(tmp_path / "m2.parquet", GOOD, SCHEMA)
    with pytest.raises(RunExistsError, match="manifest contents changed"):
        run_job(spec_for(changed, out))


def test_default_resources_never_take_every_cpu():
    spec = parse_spec({"device": "cpu", "actors": 2})
    res = resolve_resources(spec, {"CPU": 2.0}, local=True)
    assert res.actors * res.cpus_per_actor + spec.writer_cpus <= 2.0
    with pytest.raises(SpecError, match="never run"):
        resolve_resources(parse_spec({"device": "cpu", "actors": 2, "cpus_per_actor": 1}), {"CPU": 2.0}, local=True)
    gpu = resolve_resources(parse_spec({}), {"CPU": 16.0, "GPU": 4.0}, local=True)
    assert (gpu.device, gpu.actors, gpu.gpus_per_actor) == ("cuda", 4, 1.0)


def test_actor_pool_grows_to_the_clusters_maximum_where_known():
    """``actors: auto`` on cuda: from the GPUs present to the GPUs the autoscaler may add; ``{min, max}``."""
    from batch.run.pipeline import _pool

    now, grown = {"CPU": 8.0, "GPU": 1.0}, {"CPU": 64.0, "GPU": 8.0}  # a RayJob's first worker; maxReplicas: 8
    auto = resolve_resources(parse_spec({}), now, local=False, cluster_max=grown)
    assert (auto.pool_min, auto.actors, auto.max_source) == (1, 8, "cluster max")
    half = resolve_resources(parse_spec({"gpus_per_actor": 0.5}), now, local=False, cluster_max=grown)
    assert (half.pool_min, half.actors) == (2, 16)
    unknown = resolve_resources(parse_spec({}), {"CPU": 8.0, "GPU": 2.0}, local=False, cluster_max=None)
    assert (unknown.pool_min, unknown.actors, unknown.max_source) == (2, 2, "current")
    ranged = resolve_resources(parse_spec({"actors": {"min": 2, "max": 5}}), now, local=False, cluster_max=grown)
    assert (ranged.pool_min, ranged.actors, ranged.max_source) == (2, 5, "spec")
    open_max = resolve_resources(parse_spec({"actors": {"min": 1}}), now, local=False, cluster_max=grown)
    assert (open_max.pool_min, open_max.actors) == (1, 8)
    fixed = resolve_resources(parse_spec({"actors": 3}), now, local=False, cluster_max=grown)
    assert (fixed.pool_min, fixed.actors) == (3, 3)
    # GPU workers that autoscale from zero: cuda, one actor to start with (it waits for its node), up to 8
    zero = resolve_resources(parse_spec({}), {"CPU": 4.0}, local=False, cluster_max=grown)
    assert (zero.device, zero.pool_min, zero.actors, zero.gpus_per_actor) == ("cuda", 1, 8, 1.0)
    # a local Ray cannot grow: its maximum is what fits now, and a pool that could take every CPU is refused
    local = resolve_resources(parse_spec({}), {"CPU": 16.0, "GPU": 2.0}, local=True, cluster_max=grown)
    assert (local.pool_min, local.actors) == (2, 2)
    with pytest.raises(SpecError, match="never run"):
        resolve_resources(parse_spec({"device": "cpu", "actors": {"min": 1, "max": 3}, "cpus_per_actor": 0.75}),
                          {"CPU": 2.0}, local=True)
    with pytest.raises(SpecError, match=r"actors.*max \(2\) is below min \(3\)"):
        parse_spec({"actors": {"min": 3, "max": 2}})
    # the strategy Ray Data gets: min..max, never more actors than blocks
    pool = _pool(auto, blocks=32)
    assert (pool.min_size, pool.max_size) == (1, 8)
    assert (_pool(ranged, blocks=3).min_size, _pool(ranged, blocks=3).max_size) == (2, 3)


def test_gpu_batches_are_whole_homogeneous_and_independent_of_actors():
    """50 items in two buckets (30 + 20): batches of <= 4 within a bucket, the same for any actor count."""
    items = pa.table({"x": list(range(50)), "height": [64] * 30 + [128] * 20, "width": [64] * 50,
                      "num_inference_steps": [4] * 50, "guidance_scale": [7.5] * 50, "scheduler": ["pndm"] * 50})
    layouts = {}
    for actors in (1, 2, 5):
        blocks = cut_blocks(items, batch_size=4, actors=actors)
        assert len(blocks) >= min(actors, 16) and sum(b.num_rows for b in blocks) == 50
        rows = [r for b in blocks for r in b.to_pylist()]
        assert [r["x"] for r in rows] == list(range(50))
        batches: dict[int, list] = {}
        for r in rows:
            batches.setdefault(r["_batch"], []).append(r)
        assert all(len(b) <= 4 and len({x["height"] for x in b}) == 1 for b in batches.values())
        assert len(batches) == 8 + 5  # ceil(30/4) + ceil(20/4): no batch straddles the bucket boundary
        ids_per_block = [set(b.column("_batch").to_pylist()) for b in blocks]
        assert all(not (a & b) for i, a in enumerate(ids_per_block) for b in ids_per_block[i + 1:])  # whole
        layouts[actors] = [r["_batch"] for r in rows]
    assert layouts[1] == layouts[2] == layouts[5]


def test_cli_validate_and_fail_fast(tmp_path, capsys):
    manifest = write_manifest(tmp_path / "m.parquet", GOOD + BAD, SCHEMA)
    assert cli_main(["validate", manifest]) == 1
    out = capsys.readouterr().out
    assert "row 5 (id 'f-nan'): guidance_scale" in out and '"rows_failed": 6' in out
    (tmp_path / "not.parquet").write_text("id,prompt\n1,a\n")
    assert cli_main(["validate", str(tmp_path / "not.parquet")]) == 2
    assert "not a readable Parquet file" in capsys.readouterr().err
    write_manifest(tmp_path / "noprompt.parquet", [{"id": "x"}])
    assert cli_main(["validate", str(tmp_path / "noprompt.parquet")]) == 2
    assert "lacks required column(s) ['prompt']" in capsys.readouterr().err


@pytest.mark.e2e
def test_cli_run_uses_spec_and_flags(tmp_path, ray_session, capsys):
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "only", "prompt": "a cat"}])
    cfg = tmp_path / "job.yaml"
    cfg.write_text("model: tiny\ndevice: cpu\ndefaults: {height: 64, width: 64, num_inference_steps: 3}\n")
    code = cli_main(["run", str(cfg), "--manifest", manifest, "--output", str(tmp_path / "out"), "--quiet",
                     "--set", "defaults.guidance_scale=2.5", "--run-id", "cli-test"])
    assert code == 0
    assert "rows: 1 ok, 0 failed" in capsys.readouterr().out
    row = read_metadata(str(tmp_path / "out")).to_pylist()[0]
    assert row["guidance_scale"] == 2.5 and row["run_id"] == "cli-test" and row["num_inference_steps"] == 3
    bad = write_manifest(tmp_path / "bad.parquet", [{"id": "only", "prompt": "a cat"}, {"id": "no", "prompt": ""}])
    assert cli_main(["run", str(cfg), "--manifest", bad, "--output", str(tmp_path / "o1"), "--quiet"]) == 1
    assert "rows: 1 ok, 1 failed" in capsys.readouterr().out  # max_failed_fraction defaults to 0
    cfg.write_text("model: tiny\nbatchsize: 3\n")
    assert cli_main(["run", str(cfg), "--manifest", manifest, "--output", str(tmp_path / "o2")]) == 2
    assert "batchsize: unknown field" in capsys.readouterr().err


def test_make_tiny_model_cli_writes_a_loadable_folder(tmp_path):
    from diffusers import StableDiffusionPipeline

    assert cli_main(["make-tiny-model", str(tmp_path / "m"), "--prediction-type", "v_prediction"]) == 0
    assert (tmp_path / "m" / "model_index.json").is_file()
    assert list((tmp_path / "m" / "unet").glob("*.safetensors"))
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "m", local_files_only=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"


@pytest.mark.e2e
def test_model_that_cannot_load_marks_the_run_crashed(tmp_path, ray_session, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "a cat"}])
    with pytest.raises(Exception, match="creation task|cannot resolve"):
        run_job(spec_for(manifest, str(tmp_path / "out"), model="org/not-in-cache"))
    record = open_output(str(tmp_path / "out")).get_json(RUN_RECORD)
    assert record["status"] == "crashed" and record["attempts"][-1]["error"]
    assert not open_output(str(tmp_path / "out")).exists(SUCCESS_MARKER)


def test_local_model_folder_is_checked_before_ray_starts(tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", [{"id": "a", "prompt": "a cat"}])
    (tmp_path / "notamodel").mkdir()
    from batch.models.weights import ModelError

    with pytest.raises(ModelError, match="model_index.json"):
        run_job(spec_for(manifest, str(tmp_path / "out"), model=str(tmp_path / "notamodel")))
    assert not (tmp_path / "out").exists()


def test_steady_rate_counts_images_after_the_first_sampler_batch():
    from collections import Counter

    from batch.run.stats import steady_rate

    # batches of 2, 2 and 3 images ending at t = 10, 12, 13: 5 images in the 3 s after the first batch
    assert steady_rate(Counter({10.0: 2, 12.0: 2, 13.0: 3})) == pytest.approx(5 / 3)
    assert steady_rate(Counter({10.0: 4})) == 0.0 and steady_rate(Counter()) == 0.0


def test_warmup_is_the_first_call_per_actor_and_shape_over_the_later_ones():
    """The summary's warm-up figure (compile cost when optimizations.compile) comes from the metadata's
    worker / shape / sampled_at / t_sample_s columns: a call's images share one stamp."""
    import pyarrow as pa

    from collections import Counter

    from batch.run.stats import call_ends, sampler_calls, warmup_seconds

    def call(worker, size, at, per_image, n):
        return [{"worker": worker, "height": size, "width": size, "sampled_at": at, "t_sample_s": per_image}] * n

    rows = (call("a", 64, 1.0, 30.0, 2) + call("a", 64, 2.0, 5.0, 2) + call("a", 64, 3.0, 6.0, 2)  # 60 s vs 10-12
            + call("b", 64, 1.5, 20.0, 2) + call("b", 64, 2.5, 5.0, 2)  # 40 s vs 10
            + call("a", 96, 4.0, 50.0, 1)  # a shape seen once: no later call to compare with
            + [{"worker": "a", "height": 64, "width": 64, "sampled_at": None, "t_sample_s": 0.0}])  # failed
    calls = sampler_calls(pa.Table.from_pylist(rows))
    assert calls[("a", 64, 64, 1.0)] == (2, 60.0) and len(calls) == 6
    assert warmup_seconds(calls) == pytest.approx(((60 - 12) + (40 - 10)) / 2)
    assert warmup_seconds({}) == 0.0
    assert call_ends(calls) == Counter({1.0: 2, 2.0: 2, 3.0: 2, 1.5: 2, 2.5: 2, 4.0: 1})  # steady_rate's input


def test_retry_failed_leaves_images_the_safety_checker_dropped():
    """Same seed, same image, same verdict: retrying a dropped image would only drop it again."""
    import pyarrow as pa

    from batch.store.commit import select_work
    from batch.plan.manifest import Plan
    from batch.store.schema import NSFW_ERROR

    items = pa.table({"manifest_row": [0, 1, 2, 3], "image_index": [0, 0, 0, 0]})
    failed = pa.table({"manifest_row": pa.array([4], pa.int64()), "error": ["prompt: missing"]})
    committed = pa.table({"manifest_row": [0, 1, 2], "image_index": [0, 0, 0],
                          "status": ["ok", "failed", "failed"],
                          "error": [None, "OSError: disk full", NSFW_ERROR]})
    job_plan = Plan(items=items, failed=failed, carried=[], num_rows=5)
    todo, again = select_work(job_plan, committed, "retry_failed")
    # row 1 failed: again; row 2 dropped by the checker: not again; row 3 and failed row 4 have no record
    # (an interrupted run): retrying the failures also finishes the run
    assert todo.column("manifest_row").to_pylist() == [1, 3]
    assert again.column("manifest_row").to_pylist() == [4]
    todo, again = select_work(job_plan, committed, "run")  # a resume: only what has no record yet
    assert todo.column("manifest_row").to_pylist() == [3] and again.column("manifest_row").to_pylist() == [4]

"""Faults and hostile input (issue 14): each case a probe broke, shown fixed; README "What happens when...".

Unit-level here (no Ray); the cases that need a running job are in ``tests/test_fault_jobs.py``.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.plan.locations import InputLocationError, check_input_uri, input_rules
from batch.plan.manifest import ManifestError, plan, read_manifest
from batch.plan.rows import check_id
from batch.spec.config import parse_spec
from batch.store.schema import RESERVED_COLUMNS


# --- 4. a folder manifest whose files have different columns ------------------------------------------------


def _folder(tmp_path, *tables):
    folder = tmp_path / "manifest"
    folder.mkdir()
    for i, t in enumerate(tables):
        pq.write_table(t, folder / f"part-{i}.parquet")
    (folder / "_SUCCESS").write_text("")  # a writer's marker is not data
    return str(folder)


def test_folder_manifest_columns_only_in_a_later_file_are_kept(tmp_path):
    """seed/num_images/a carried column only in the second file: 4 images planned, the file's seed used
    (the schema used to come from the first file: 2 images, the columns gone)."""
    uri = _folder(tmp_path, pa.table({"id": ["a"], "prompt": ["x"]}),
                  pa.table({"id": ["b"], "prompt": ["y"], "seed": [42], "num_images": [3], "team": ["t1"]}))
    table = read_manifest(uri)
    p = plan(table, parse_spec({"defaults": {"num_images": 1}}), RESERVED_COLUMNS)
    assert p.items.num_rows == 4 and p.failed.num_rows == 0
    b = [r for r in p.items.to_pylist() if r["id"] == "b"]
    assert [r["seed"] for r in sorted(b, key=lambda r: r["image_index"])] == [42, 43, 44]
    assert p.carried == ["team"] and {r["team"] for r in b} == {"t1"}
    assert [r["team"] for r in p.items.to_pylist() if r["id"] == "a"] == [None]


def test_folder_manifest_type_clash_names_the_files_and_column(tmp_path):
    uri = _folder(tmp_path, pa.table({"id": ["a"], "prompt": ["x"], "seed": [1]}),
                  pa.table({"id": ["b"], "prompt": ["y"], "seed": ["abc"]}))
    with pytest.raises(ManifestError, match=r"column 'seed' is int64 in .*part-0\.parquet but string in "
                                            r".*part-1\.parquet"):
        read_manifest(uri)


def test_folder_manifest_widens_int_and_float(tmp_path):
    uri = _folder(tmp_path, pa.table({"id": ["a"], "prompt": ["x"], "guidance_scale": [3]}),
                  pa.table({"id": ["b"], "prompt": ["y"], "guidance_scale": [4.5]}))
    assert read_manifest(uri).column("guidance_scale").to_pylist() == [3.0, 4.5]


def test_repeated_column_names_get_the_projects_own_message(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array(["a"]), pa.array(["x"]), pa.array(["b"])],
                                        names=["id", "prompt", "id"]), path)
    with pytest.raises(ManifestError, match=r"repeated column name\(s\) \['id'\]"):
        read_manifest(str(path))


# --- 5. numbers the sampler cannot represent ------------------------------------------------------------------


@pytest.mark.parametrize("g, ok", [(7.5, True), (100.0, True), (100.5, False), (1e300, False)])
def test_guidance_scale_has_a_documented_maximum(g, ok):
    table = pa.table({"id": ["r"], "prompt": ["x"], "guidance_scale": [g]})
    p = plan(table, parse_spec({}), RESERVED_COLUMNS)
    assert (p.failed.num_rows == 0) == ok
    if not ok:
        assert p.failed.column("error")[0].as_py() == \
            f"guidance_scale: must be at most limits.max_guidance_scale=100, got {g!r}"


@pytest.mark.slow  # loads the tiny model and samples (about 10 s on 2 busy cores)
def test_flat_images_fail_instead_of_being_stored_ok():
    """guidance 1e300 (allowed here by raising the limit) drives the tiny model's latents to inf; the
    decode's NaNs become a flat image, which the sampler fails with a reason: never status ok."""
    import batch.run.stages as stages

    spec = parse_spec({"defaults": {"height": 64, "width": 64, "num_inference_steps": 2},
                       "limits": {"max_guidance_scale": 1e301}})
    table = pa.table({"id": ["sane", "huge"], "prompt": ["x", "x"], "guidance_scale": [7.5, 1e300]})
    items = plan(table, spec, RESERVED_COLUMNS).items
    sampler = stages.Sampler(stages.SamplerSettings(model="tiny", dtype="float32", device="cpu", batch_size=1))
    out = {r["id"]: r for r in sampler(items).drop_columns(["_pixels"]).to_pylist()}
    assert out["sane"]["status"] == "ok"
    assert out["huge"]["status"] == "failed" and out["huge"]["error"].startswith(stages.FLAT_IMAGE_ERROR)


def test_flatten_nonfinite_makes_partly_nan_images_flat():
    import torch

    from batch.sampling.txt2img import flatten_nonfinite

    x = torch.rand(3, 3, 4, 4) * 2 - 1
    x[1, 0, 2, 2] = float("nan")
    x[2, 1, 0, 0] = float("inf")
    y = flatten_nonfinite(x)
    assert torch.equal(y[0], x[0]) and bool((y[1:] == -1).all())


# --- ids and input locations -----------------------------------------------------------------------------


@pytest.mark.parametrize("rid", ["q:colon", "c:", "urn:isbn:123", "a:b:c"])
def test_colons_in_ids_are_fine(rid):
    assert check_id(rid) is None


def test_relative_image_uri_resolves_from_a_remote_manifest_folder():
    spec = parse_spec({"task": "variation", "manifest": "s3://bucket/jobs/m.parquet"})
    # the folder of an s3 manifest without looking it up: input_rules would call the store
    rules = (["s3://bucket/jobs"], "s3://bucket/jobs")
    assert check_input_uri("img/a.png", *rules) == "s3://bucket/jobs/img/a.png"
    for bad in ("../other/a.png", "img/../../x.png", "s3://bucket/other/a.png"):
        with pytest.raises(InputLocationError):
            check_input_uri(bad, *rules)
    assert spec.task == "variation"


def test_memory_manifest_accepts_its_own_folder_in_either_spelling():
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/sdbatch-faults/m.parquet", b"x")
    try:
        spec = parse_spec({"task": "variation", "manifest": "memory://sdbatch-faults/m.parquet"})
        rules = input_rules(spec)
        for uri in ("memory://sdbatch-faults/a.png", "memory:///sdbatch-faults/a.png", "a.png"):
            assert check_input_uri(uri, *rules) == "memory:///sdbatch-faults/a.png"
        with pytest.raises(InputLocationError):
            check_input_uri("memory://elsewhere/a.png", *rules)
    finally:
        fs.rm("/sdbatch-faults", recursive=True)


# --- storage that refuses writes: exit code 3 and one line, not a traceback ------------------------------------



def _readonly_fs():
    import errno

    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class ReadOnly(MemoryFileSystem):
        protocol = "rofs"

        def pipe_file(self, path, value, *args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system", path)

    fsspec.register_implementation("rofs", ReadOnly, clobber=True)


def test_read_only_output_exits_3_with_one_line(tmp_path, capsys):
    """The lease is the first write, before any Ray: a read-only output ends the command at once."""
    from batch.cli import main

    _readonly_fs()
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ["a"], "prompt": ["x"]}), manifest)
    rc = main(["run", "configs/demo.yaml", "--manifest", str(manifest), "--output", "rofs://ro/out", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 3 and len(err) == 1
    assert err[0].startswith("sdbatch: error: storage: cannot write rofs://ro/out/_LEASE") and "Read-only" in err[0]


def test_a_failed_local_write_leaves_no_temp_file_and_compact_removes_old_ones(tmp_path, monkeypatch):
    import errno

    import fsspec.implementations.local as local

    from batch.store.commit import compact, stale_temp_files
    from batch.store.io import StorageError, open_output

    out = open_output(str(tmp_path / "out"))
    out.put_json("run.json", {"status": "finished"})
    real = local.LocalFileSystem.pipe_file

    def full(self, path, value, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(value[:3])  # what a full disk leaves behind
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(local.LocalFileSystem, "pipe_file", full)
    with pytest.raises(StorageError, match="No space left on device"):
        out.put_parquet("metadata/part-x-000000.parquet", pa.table({"a": [1]}))
    monkeypatch.setattr(local.LocalFileSystem, "pipe_file", real)
    assert stale_temp_files(out) == []
    # a driver killed mid-write (SIGKILL: no cleanup runs) leaves one; compact removes it
    (tmp_path / "out" / "metadata" / "part-y-000000.parquet.tmp-0123").write_bytes(b"par")
    assert stale_temp_files(out) == ["metadata/part-y-000000.parquet.tmp-0123"]
    compact(out)
    assert stale_temp_files(out) == []


def test_status_tells_an_abandoned_run_from_a_running_one(tmp_path, capsys):
    import time

    from batch.cli import main
    from batch.store.io import open_output

    out = open_output(str(tmp_path / "out"))
    out.put_json("run.json", {"run_id": "r", "status": "running", "rows": 1, "images_planned": 1, "attempts": [{}]})
    out.put_json("_LEASE", {"host": "h", "pid": 1, "heartbeat": time.time(), "released": False})
    assert main(["status", str(tmp_path / "out")]) == 0
    assert "run r: running," in capsys.readouterr().out
    out.put_json("_LEASE", {"host": "h", "pid": 1, "heartbeat": time.time() - 3600, "released": False})
    assert main(["status", str(tmp_path / "out")]) == 0
    assert "abandoned (no driver: last heartbeat 3600s ago)" in capsys.readouterr().out


def test_failure_reasons_group_whatever_the_path_in_them():
    from batch.plan.manifest import failure_reason

    a = failure_reason("FileExistsError: [Errno 17] File exists: '/out/images/row_1-ab/0.png'")
    b = failure_reason("FileExistsError: [Errno 17] File exists: '/out/images/row_2-cd/1.png'")
    assert a == b == "FileExistsError: [Errno 17] File exists: '<path>'"
    assert failure_reason("image_uri: not found") == "image_uri: not found"


# --- paths under `ray job submit`, the summary line, the CPU hint ------------------------------------------------


@pytest.mark.parametrize("manifest, output, shared, problem", [
    ("s3://b/m.parquet", "s3://b/out", [], None),
    ("/mnt/shared/m.parquet", "gs://b/out", ["/mnt/shared"], None),
    ("m.parquet", "s3://b/out", [], "manifest 'm.parquet' is a relative path"),
    ("s3://b/m.parquet", "out/run", [], "output 'out/run' is a relative path"),
    ("s3://b/m.parquet", "/data/out", ["/mnt/shared"], "output '/data/out' is a local path"),
    ("s3://b/m.parquet", "file:///data/out", [], "output 'file:///data/out' is a local path"),
    ("s3://b/m.parquet", "/mnt/sharedX/out", ["/mnt/shared"], "is a local path"),
    ("memory://m.parquet", "s3://b/out", [], "memory:// exists only in this process"),
    (["s3://b/m.parquet", "memory://m2.csv"], "s3://b/out", [], "manifest 'memory://m2.csv': memory:// exists"),
    (["s3://b/m.parquet", "/mnt/shared/m2.csv"], "s3://b/out", ["/mnt/shared"], None),
])
def test_a_cluster_job_refuses_paths_other_nodes_cannot_see(manifest, output, shared, problem):
    from batch.run.job import check_cluster_paths
    from batch.spec.base import SpecError

    spec = parse_spec({"manifest": manifest, "output": output, "shared_paths": shared})
    check_cluster_paths(spec, on_cluster=False)  # an embedded Ray: every path is fine
    if problem is None:
        check_cluster_paths(spec, on_cluster=True)
    else:
        with pytest.raises(SpecError, match=problem) as err:
            check_cluster_paths(spec, on_cluster=True)
        assert "s3://" in str(err.value) and ("--shared-path" in str(err.value) or "memory" in str(manifest))


def test_job_commands_end_with_one_json_summary_line(tmp_path, capsys):
    import json

    from batch.cli import main

    _readonly_fs()
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"id": ["a"], "prompt": ["x"]}), manifest)
    assert main(["run", "configs/demo.yaml", "--manifest", str(manifest), "--output", "rofs://ro2/out"]) == 3
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["exit_code"] == 3 and last["exit_reason"].startswith("storage: cannot write")
    assert last["sdbatch_summary"] is None
    assert main(["run", "configs/demo.yaml", "--manifest", str(tmp_path / "missing.parquet"), "--output",
                 str(tmp_path / "o")]) == 2
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["exit_code"] == 2 and "not found" in last["exit_reason"]


def test_large_images_on_cpu_get_a_hint():
    from batch.run.job import cpu_size_warnings
    from batch.run.pipeline import Resources

    spec = parse_spec({})
    items = plan(pa.table({"id": ["s", "b"], "prompt": ["x", "y"], "height": [64, 2048], "width": [64, 2048]}),
                 spec, RESERVED_COLUMNS).items
    cpu = Resources("cpu", 1, 0.0, 1.0, 1, 2.0, 0.0)
    (hint,) = cpu_size_warnings(items, cpu)
    assert hint.startswith("1 image(s) larger than 512x512 (up to about 2048x2048) will be sampled on CPU")
    assert cpu_size_warnings(items, Resources("cuda", 1, 1.0, 1.0, 1, 2.0, 1.0)) == []
    assert cpu_size_warnings(items.slice(0, 1) if items.column("height")[0].as_py() == 64 else items.slice(1, 1),
                             cpu) == []


def test_environment_failures_are_told_apart_from_bugs():
    import errno

    import ray.exceptions

    from batch.cli import _environment_failure
    from batch.store.io import StorageError

    assert _environment_failure(StorageError("cannot write s3://b/k: x")).startswith("storage: cannot write")
    assert _environment_failure(OSError(errno.ENOSPC, "No space left on device")).startswith("storage: OSError")
    assert _environment_failure(ray.exceptions.RaySystemError("node died")).startswith("cluster: RaySystemError")
    assert _environment_failure(ValueError("a bug")) is None and _environment_failure(KeyError("x")) is None

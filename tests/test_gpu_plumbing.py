"""The GPU path through Ray, on a machine without a GPU.

Ray accepts declared GPUs on any machine (``ray.init(num_gpus=2)``) and gives each actor that requests one
its own ``CUDA_VISIBLE_DEVICES``. The jobs below request GPUs exactly as a ``device: cuda`` job does on a
GPU node; only the tensors stay on the CPU, through the test-only switch ``SDBATCH_TEST_CUDA_ON_CPU``
(:mod:`batch.models.devices`), passed to the workers in Ray's runtime environment.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from conftest import write_manifest

from batch.spec.config import parse_spec
from batch.models.devices import CUDA_ON_CPU_ENV
from batch.run.job import run_job
from batch.run.pipeline import resolve_resources
from batch.store.io import open_output
from batch.store.commit import read_metadata
from batch.store.formats import decode_image

ROWS = [{"id": f"r{i}", "prompt": f"a picture number {i}", "seed": 100 + i, "num_images": 1 + i % 2,
         "height": 64 if i < 5 else 32, "width": 64} for i in range(8)]


@pytest.fixture(scope="module")
def gpu_ray():
    """A private embedded Ray with 2 declared GPUs and 4 declared CPUs (the session's plain Ray is put back)."""
    import ray

    was_running = ray.is_initialized()
    if was_running:
        ray.shutdown()
    ray.init(address="local", num_cpus=4, num_gpus=2, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {CUDA_ON_CPU_ENV: "1"}})
    yield ray
    ray.shutdown()
    if was_running:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")


def gpu_spec(manifest: str, output: str, **kw):
    base = {"model": "tiny", "device": "cuda", "dtype": "float32", "manifest": manifest, "output": output,
            "defaults": {"num_inference_steps": 3}, "batch_size": 2, "progress": False}
    return parse_spec(base | kw)


@pytest.mark.e2e
def test_resources_resolve_one_actor_per_declared_gpu(gpu_ray):
    spec = gpu_spec("m", "o")
    res = resolve_resources(spec, dict(gpu_ray.cluster_resources()), local=True)
    assert (res.device, res.actors, res.gpus_per_actor, res.cpus_per_actor) == ("cuda", 2, 1.0, 1.0)
    assert res.cluster_gpus == 2 and res.actors * res.cpus_per_actor + spec.writer_cpus <= res.cluster_cpus
    half = resolve_resources(gpu_spec("m", "o", gpus_per_actor=0.5, cpus_per_actor=0.5),
                             dict(gpu_ray.cluster_resources()), local=True)
    assert (half.actors, half.gpus_per_actor) == (4, 0.5)


def _images(meta: pa.Table, out_uri: str) -> dict[tuple, np.ndarray]:
    out = open_output(out_uri)
    return {(r["id"], r["image_index"]): decode_image(out.fs.cat_file(out.fs._strip_protocol(r["uri"])))
            for r in meta.to_pylist() if r["status"] == "ok"}


@pytest.mark.e2e
def test_generation_requests_one_gpu_per_actor_and_matches_a_cpu_run(gpu_ray, tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", ROWS)
    summary = run_job(gpu_spec(manifest, str(tmp_path / "gpu")))
    expected = sum(r["num_images"] for r in ROWS)
    assert summary.exit_code == 0 and summary.images_ok == expected and summary.images_pending == 0
    meta = read_metadata(str(tmp_path / "gpu"))
    # every image committed exactly once
    keys = [(r["id"], r["image_index"]) for r in meta.to_pylist()]
    assert len(keys) == len(set(keys)) == expected
    # two actors, each holding its own GPU (Ray's CUDA_VISIBLE_DEVICES, recorded in `worker`)
    workers = set(meta.column("worker").to_pylist())
    assert len(workers) == 2, workers
    gpus = sorted(w.split("/gpu", 1)[1].split("/", 1)[0] for w in workers)
    assert gpus == ["0", "1"], workers
    # the same rows on the CPU path (no GPUs requested) give the same images
    cpu = run_job(gpu_spec(manifest, str(tmp_path / "cpu"), device="cpu", actors=1))
    assert cpu.images_ok == expected
    a, b = _images(meta, str(tmp_path / "gpu")), _images(read_metadata(str(tmp_path / "cpu")), str(tmp_path / "cpu"))
    assert a.keys() == b.keys() and len(a) == expected
    assert max(int(np.abs(a[k].astype(int) - b[k]).max()) for k in a) <= 1


@pytest.mark.e2e
def test_image_task_requests_gpus_too(gpu_ray, tmp_path, tiny_variation_dir):
    """The image tasks' fetch stage (CPU) feeds GPU actors the same packed batches."""
    from PIL import Image

    from conftest import smooth_image

    paths = []
    for i in range(3):
        p = tmp_path / f"in{i}.png"
        Image.fromarray(smooth_image(40, 48, seed=i)).save(p)
        paths.append(str(p))
    manifest = write_manifest(tmp_path / "v.parquet", [{"id": f"v{i}", "image_uri": u, "seed": i}
                                                        for i, u in enumerate(paths)])
    summary = run_job(gpu_spec(manifest, str(tmp_path / "var"), task="variation", model=str(tiny_variation_dir),
                               defaults={"num_inference_steps": 2, "height": 32, "width": 32}, actors=1))
    meta = read_metadata(str(tmp_path / "var"))
    assert summary.images_ok == 3, meta.column("error").to_pylist()
    assert all("/gpu" in w for w in meta.column("worker").to_pylist())


@pytest.mark.e2e
def test_feature_stage_requests_one_gpu_per_actor(gpu_ray, tmp_path):
    from PIL import Image

    from batch.run import pipeline
    from batch.metrics.extract import FeatureExtractor
    from batch.metrics.tiny import save_random_inception

    w = save_random_inception(tmp_path / "inc.pth")
    rng = np.random.default_rng(0)
    uris = []
    for i in range(6):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(p)
        uris.append(str(p))
    table = pa.table({"uri": uris})
    compute = parse_spec({"device": "cuda", "writer_cpus": 0.25})
    res = resolve_resources(compute, dict(gpu_ray.cluster_resources()), local=True)
    assert (res.actors, res.gpus_per_actor) == (2, 1.0)
    kwargs = {"inception": str(w), "batch_size": 2}
    out = pa.concat_tables(list(pipeline.run_features(table, kwargs, res, rows_per_block=2)))
    assert out.num_rows == 6 and out.column("feature_error").null_count == 6
    assert all("/gpu" in x for x in out.column("feature_worker").to_pylist())
    # the features equal the in-process (CPU, no Ray) extractor's
    ref = FeatureExtractor(str(w), batch_size=2)(table)
    got = {u: np.array(f) for u, f in zip(out.column("uri").to_pylist(), out.column("inception").to_pylist())}
    for u, f in zip(ref.column("uri").to_pylist(), ref.column("inception").to_pylist()):
        np.testing.assert_allclose(got[u], np.array(f), rtol=1e-4, atol=1e-5)


def test_cpu_device_with_gpus_is_a_spec_error_naming_both_fields():
    from batch.spec.base import SpecError

    with pytest.raises(SpecError, match="device: cpu with gpus_per_actor: 1"):
        parse_spec({"device": "cpu", "gpus_per_actor": 1})
    assert parse_spec({"device": "cpu", "gpus_per_actor": 0}).gpus_per_actor == 0


def test_device_cpu_flag_clears_the_configs_gpus(tmp_path):
    """The shipped GPU configs set gpus_per_actor: 1; ``--device cpu`` makes the run a CPU run."""
    from batch.cli import _spec_from_args, build_parser

    args = build_parser().parse_args(["run", "configs/txt2img-sd14.yaml", "--device", "cpu", "--manifest", "m",
                                      "--output", "o"])
    spec = _spec_from_args(args)
    assert (spec.device, spec.gpus_per_actor) == ("cpu", None)
    res = resolve_resources(spec, {"CPU": 8.0, "GPU": 0.0}, local=False)
    assert (res.device, res.gpus_per_actor) == ("cpu", 0.0)
    gpu = _spec_from_args(build_parser().parse_args(["run", "configs/txt2img-sd14.yaml"]))
    assert (gpu.device, gpu.gpus_per_actor) == ("cuda", 1)


def test_device_branches_without_a_gpu(monkeypatch):
    """Every place that branches on cuda: dtype default, actor CPUs/threads, auto device, the test switch."""
    import torch

    from batch.models.devices import torch_device
    from batch.models.load import resolve_dtype

    assert resolve_dtype("auto", "cuda") == torch.float16 and resolve_dtype("auto", "cpu") == torch.float32
    cuda = resolve_resources(parse_spec({}), {"CPU": 16.0, "GPU": 4.0}, local=True)
    assert (cuda.device, cuda.actors, cuda.gpus_per_actor, cuda.cpus_per_actor) == ("cuda", 4, 1.0, 1.0)
    # device: auto on a cluster without GPUs is a CPU run: the spec's gpus_per_actor is not requested
    auto = resolve_resources(parse_spec({"gpus_per_actor": 1}), {"CPU": 4.0}, local=True)
    assert (auto.device, auto.gpus_per_actor, auto.actors) == ("cpu", 0.0, 1)
    with pytest.raises(Exception, match="needs 2 GPUs; Ray has 1"):
        resolve_resources(parse_spec({"device": "cuda", "actors": 2}), {"CPU": 4.0, "GPU": 1.0}, local=True)
    monkeypatch.delenv(CUDA_ON_CPU_ENV, raising=False)
    assert torch_device("cuda") == "cuda"
    monkeypatch.setenv(CUDA_ON_CPU_ENV, "1")
    assert torch_device("cuda") == "cpu" and torch_device("cpu") == "cpu"

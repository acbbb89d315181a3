"""Shared fixtures: tiny models written to disk once per session, one embedded Ray for the session."""

from __future__ import annotations

import contextlib
import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # never leave a token under ~/.ray
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pyarrow as pa
import pyarrow.parquet as pq
import pytest


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny txt2img model (epsilon prediction) as a diffusers folder."""
    from batch.models.load import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_vpred_dir(tmp_path_factory):
    """The tiny model with a v-prediction scheduler config (the SD 2.x layout)."""
    from batch.models.load import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-v") / "model", prediction_type="v_prediction")


# Fixtures that start Ray. A test that requests one, directly or through another fixture, must be marked e2e
# (`make test-fast` runs `-m "not e2e"`): checked at collection, so an unmarked one fails the whole run.
RAY_FIXTURES = ("ray_session", "ray_head", "gpu_ray")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects anything
def pytest_collection_modifyitems(config, items):
    unmarked = [f"{item.nodeid} (uses {', '.join(f for f in RAY_FIXTURES if f in item.fixturenames)})"
                for item in items
                if any(f in item.fixturenames for f in RAY_FIXTURES) and item.get_closest_marker("e2e") is None]
    if unmarked:
        raise pytest.UsageError("these tests start Ray but are not marked e2e; mark them "
                                "`@pytest.mark.e2e` (or `pytestmark = pytest.mark.e2e` for a whole module):\n  "
                                + "\n  ".join(unmarked))


@pytest.fixture(autouse=True)
def _no_ray_outside_e2e(request):
    """A test not marked e2e must not start Ray by other means either (``run_job`` embeds one on demand)."""
    import sys

    if request.node.get_closest_marker("e2e") is not None:
        yield
        return
    ray = sys.modules.get("ray")
    was_up = ray is not None and ray.is_initialized()
    yield
    ray = sys.modules.get("ray")
    if not was_up and ray is not None and ray.is_initialized():
        ray.shutdown()
        pytest.fail(f"{request.node.nodeid} started Ray but is not marked e2e: mark it `@pytest.mark.e2e`")


@pytest.fixture(scope="session")
def ray_session():
    """One embedded 2-CPU Ray for all pipeline tests (jobs reuse it and leave it running). Only for tests
    marked e2e (enforced by ``pytest_collection_modifyitems`` above)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@contextlib.contextmanager
def loopback_s3(bucket: str):
    """A moto S3 server on loopback (``ENVIRONMENT.md``) holding one empty ``bucket``; yields the s3fs
    storage options that reach it. The modules that use it wrap it in their own ``s3_options`` fixture."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": f"http://{host}:{port}",
                                                                      "region_name": "us-east-1"}}
    boto3.client("s3", aws_access_key_id="testing", aws_secret_access_key="testing",
                 **options["client_kwargs"]).create_bucket(Bucket=bucket)
    try:
        yield options
    finally:
        server.stop()


def write_manifest(path, rows: list[dict], schema: pa.Schema | None = None):
    """Write rows as a Parquet manifest and return its path as a string."""
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_variation_dir(tmp_path_factory):
    """The tiny image-variation model (StableDiffusionImageVariationPipeline layout)."""
    from batch.models.load import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-var") / "model", task="variation")


@pytest.fixture(scope="session")
def tiny_upscale_dir(tmp_path_factory):
    """The tiny x4 upscaler (StableDiffusionUpscalePipeline layout)."""
    from batch.models.load import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-up") / "model", task="upscale")


def smooth_image(h: int, w: int, seed: int = 0):
    """A smooth, colourful uint8 test image (sums of low-frequency sinusoids)."""
    import numpy as np

    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    r = np.random.default_rng(seed).uniform(1, 6, size=3)
    chans = [127 + 100 * np.sin(x * r[0] + y), 127 + 100 * np.cos(y * r[1] + x), 127 + 100 * np.sin((x + y) * r[2])]
    return np.stack(chans, -1).round().astype(np.uint8)

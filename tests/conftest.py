"""Shared fixtures: tiny models written to disk once per session, one embedded Ray for the session."""

from __future__ import annotations

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
    from batch.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_vpred_dir(tmp_path_factory):
    """The tiny model with a v-prediction scheduler config (the SD 2.x layout)."""
    from batch.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-v") / "model", prediction_type="v_prediction")


@pytest.fixture(scope="session")
def ray_session():
    """One embedded 2-CPU Ray for all pipeline tests (jobs reuse it and leave it running)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def write_manifest(path, rows: list[dict], schema: pa.Schema | None = None):
    """Write rows as a Parquet manifest and return its path as a string."""
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return str(path)

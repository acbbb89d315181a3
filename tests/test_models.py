"""Model location and loading (batch.models.load): pickle refusal, bad folders, offline hub cache, schedulers."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from batch.models.load import SCHEDULERS, load_model, make_scheduler, resolve_dtype, scheduler_class_name
from batch.models.weights import ModelError, locate
from batch.models.tiny import SD14_SCHEDULER_CONFIG

COMMIT_MAIN = "0123456789abcdef0123456789abcdef01234567"
COMMIT_V2 = "fedcba9876543210fedcba9876543210fedcba98"


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def reference(tiny_dir):
    return load_model(str(tiny_dir))


# --- pickled weights ----------------------------------------------------------------------------------------


@pytest.fixture
def pickled_dir(tiny_dir, tmp_path):
    """The tiny model with the UNet's weights as a pickled diffusion_pytorch_model.bin only."""
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_dir, folder)
    st = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(st), folder / "unet" / "diffusion_pytorch_model.bin")
    st.unlink()
    return folder


def test_pickled_weights_refused_by_default(pickled_dir):
    with pytest.raises(ModelError) as info:
        load_model(str(pickled_dir))
    msg = str(info.value)
    assert "allow_pickle" in msg
    assert "unet/" in msg and "diffusion_pytorch_model.bin" in msg


def test_pickled_weights_load_when_allowed(pickled_dir, reference):
    model = load_model(str(pickled_dir), allow_pickle=True)
    assert _state_equal(model.unet, reference.unet)
    assert _state_equal(model.vae, reference.vae)
    assert model.revision.startswith("local-") and model.revision != reference.revision


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".pkl"])
def test_other_pickle_suffixes_refused(tiny_dir, tmp_path, suffix):
    folder = tmp_path / "m"
    shutil.copytree(tiny_dir, folder)
    (folder / "vae" / "diffusion_pytorch_model.safetensors").rename(folder / "vae" / f"weights{suffix}")
    with pytest.raises(ModelError, match="allow_pickle"):
        locate(str(folder), None, allow_pickle=False)
    assert locate(str(folder), None, allow_pickle=True)[0] == "local"


def test_safetensors_alongside_bin_is_fine(tiny_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_dir, folder)
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not really a pickle")
    kind, path, revision = locate(str(folder), None, allow_pickle=False)
    assert (kind, path) == ("local", folder) and revision.startswith("local-")


# --- bad folders and names ----------------------------------------------------------------------------------


def test_folder_without_model_index(tiny_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_dir, folder)
    (folder / "model_index.json").unlink()
    with pytest.raises(ModelError, match="model_index.json"):
        load_model(str(folder))


def test_existing_file_is_not_a_model(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(ModelError, match="model_index.json"):
        load_model(str(f))


def test_missing_component_folder(tiny_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_dir, folder)
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(ModelError, match="text_encoder"):
        load_model(str(folder))


def test_component_without_weights(tiny_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_dir, folder)
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelError, match="no weights"):
        load_model(str(folder), allow_pickle=True)


@pytest.mark.parametrize("name", ["/definitely/not/here", "not a model", "a/b/c", "./missing-folder", ""])
def test_nonexistent_non_hub_name(name, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # relative names resolve against an empty folder
    with pytest.raises(ModelError, match="not 'tiny'|model_index"):
        load_model(name)


# --- offline hub cache --------------------------------------------------------------------------------------


def _fake_hub_cache(root: Path, source: Path, repo: str = "org/tiny") -> Path:
    """A huggingface_hub cache: blobs/<sha256>, snapshots/<commit>/<path> -> ../../blobs/<sha256>, refs/<name>."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    blobs = repo_dir / "blobs"
    blobs.mkdir(parents=True)
    for commit in (COMMIT_MAIN, COMMIT_V2):
        snap = repo_dir / "snapshots" / commit
        for f in sorted(p for p in source.rglob("*") if p.is_file()):
            rel = f.relative_to(source)
            data = f.read_bytes()
            if commit == COMMIT_V2 and rel.as_posix() == "scheduler/scheduler_config.json":
                data = data.replace(b'"beta_end": 0.012', b'"beta_end": 0.013')
                assert b"0.013" in data
            blob = blobs / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            link = snap / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT_MAIN)  # no trailing newline, as huggingface_hub writes it
    (repo_dir / "refs" / "v2").write_text(COMMIT_V2)
    return root


@pytest.fixture
def hub_cache(tiny_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    cache = _fake_hub_cache(tmp_path / "hub", Path(tiny_dir))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads both at import time; snapshot_download uses constants.HF_HUB_CACHE when no
    # cache_dir is passed, and its HTTP layer refuses requests when constants.HF_HUB_OFFLINE is set.
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_id_loads_from_offline_cache(hub_cache, reference):
    model = load_model("org/tiny")
    assert model.revision == COMMIT_MAIN
    assert model.model_id == "org/tiny"
    assert _state_equal(model.unet, reference.unet)
    assert _state_equal(model.text_encoder, reference.text_encoder)
    assert model.prediction_type == "epsilon"


def test_hub_revision_by_ref_and_by_commit(hub_cache):
    kind, folder, revision = locate("org/tiny", "v2", allow_pickle=False)
    assert (kind, revision) == ("hub", COMMIT_V2)
    assert folder.name == COMMIT_V2 and folder.parent.name == "snapshots"
    assert locate("org/tiny", COMMIT_MAIN, allow_pickle=False)[2] == COMMIT_MAIN
    assert locate("org/tiny", "main", allow_pickle=False)[2] == COMMIT_MAIN
    model = load_model("org/tiny", revision="v2")
    assert model.revision == COMMIT_V2
    assert model.scheduler_config["beta_end"] == 0.013


def test_hub_id_not_in_cache(hub_cache):
    with pytest.raises(ModelError, match="org/absent"):
        load_model("org/absent")
    with pytest.raises(ModelError, match="cannot resolve"):
        load_model("org/tiny", revision="no-such-branch")


def test_hub_snapshot_with_pickled_weights_refused(hub_cache):
    snap = hub_cache / "models--org--tiny" / "snapshots" / COMMIT_MAIN / "unet"
    st = snap / "diffusion_pytorch_model.safetensors"
    st.unlink()
    (snap / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelError, match="allow_pickle"):
        load_model("org/tiny")


# --- schedulers ---------------------------------------------------------------------------------------------

V_CONFIG = {**SD14_SCHEDULER_CONFIG, "prediction_type": "v_prediction", "_class_name": "PNDMScheduler"}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_make_scheduler_every_name(name, reference):
    sched = make_scheduler(name, reference.scheduler_config)
    assert type(sched).__name__ == SCHEDULERS[name][0] == scheduler_class_name(name)
    for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps"):
        assert sched.config[key] == SD14_SCHEDULER_CONFIG[key]
    assert sched.config.prediction_type == "epsilon"
    assert make_scheduler(name, reference.scheduler_config) is not sched  # fresh: schedulers are stateful
    sched.set_timesteps(5)
    assert len(sched.timesteps) >= 5


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_make_scheduler_carries_v_prediction(name):
    assert make_scheduler(name, V_CONFIG).config.prediction_type == "v_prediction"


def test_scheduler_specific_overrides():
    plms = make_scheduler("plms", {**SD14_SCHEDULER_CONFIG, "skip_prk_steps": False})
    assert plms.config.skip_prk_steps is True
    pndm = make_scheduler("pndm", {**SD14_SCHEDULER_CONFIG, "skip_prk_steps": False})
    assert pndm.config.skip_prk_steps is False  # pndm keeps the model's own setting
    dpm = make_scheduler("dpmpp_2m", SD14_SCHEDULER_CONFIG)
    assert dpm.config.algorithm_type == "dpmsolver++"
    assert dpm.config.solver_order == 2


def test_make_scheduler_does_not_mutate_model_config():
    cfg = dict(V_CONFIG)
    make_scheduler("plms", cfg)
    make_scheduler("dpmpp_2m", cfg)
    assert cfg == V_CONFIG


@pytest.mark.parametrize("name", ["heun", "model", "PNDM", ""])
def test_make_scheduler_unknown_name(name):
    with pytest.raises(ModelError, match="scheduler must be one of"):
        make_scheduler(name, SD14_SCHEDULER_CONFIG)


def test_v_prediction_model_scheduler_config(tiny_vpred_dir):
    model = load_model(str(tiny_vpred_dir))
    assert model.prediction_type == "v_prediction"
    assert make_scheduler("euler", model.scheduler_config).config.prediction_type == "v_prediction"


# --- dtypes -------------------------------------------------------------------------------------------------


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.float16
    assert resolve_dtype("auto", "cuda:1") == torch.float16
    assert resolve_dtype("float32", "cuda") == torch.float32
    assert resolve_dtype("float16", "cpu") == torch.float16
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16


def test_load_tiny_in_bfloat16():
    model = load_model("tiny", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    for comp in (model.unet, model.vae, model.text_encoder):
        assert all(p.dtype == torch.bfloat16 for p in comp.parameters())


def test_load_local_folder_in_bfloat16(tiny_dir, reference):
    model = load_model(str(tiny_dir), dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.unet.parameters())
    assert model.revision == reference.revision


def test_missing_variant_is_a_model_error(tiny_dir):
    with pytest.raises(ModelError, match="variant fp16"):
        load_model(str(tiny_dir), variant="fp16")


def test_building_the_tiny_model_leaves_the_global_rng_alone():
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    load_model("tiny")
    assert torch.equal(torch.rand(3), expected)

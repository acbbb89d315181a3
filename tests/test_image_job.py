"""Image tasks end to end through Ray (one run per task) and their pieces in-process: spec, manifest
planning, tiny presets, the fetch stage and the samplers' pass-through of failed items."""

from __future__ import annotations

import hashlib
import io
import json

import diffusers
import fsspec
import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import smooth_image, write_manifest
from PIL import Image

from batch.cli import main as cli_main
from batch.spec.base import SpecError
from batch.spec.config import parse_spec
from batch.run.job import run_job
from batch.plan.manifest import plan
from batch.store.schema import RESERVED_COLUMNS
from batch.store.io import open_output
from batch.store.commit import read_metadata
from batch.store.formats import decode_image


def write_png(path, arr, mode=None) -> str:
    Image.fromarray(arr, mode).save(path)
    return str(path)


# --- spec and manifest (no model) ----------------------------------------------------------------------

def test_task_defaults_and_forbidden_fields_of_other_tasks():
    v = parse_spec({"task": "variation"})
    assert (v.defaults.guidance_scale, v.defaults.num_inference_steps, v.defaults.height, v.defaults.preprocessing) == (
        3.0, 50, 512, "card")
    u = parse_spec({"task": "upscale"})
    assert (u.defaults.noise_level, u.defaults.guidance_scale, u.defaults.num_inference_steps,
            u.defaults.tile_size, u.defaults.tile_overlap) == (20, 9.0, 75, 128, 32)
    assert parse_spec({}).defaults.guidance_scale == 7.5  # txt2img specs unchanged
    with pytest.raises(SpecError, match=r"defaults\.negative_prompt: unknown field; allowed here: .*preprocessing"):
        parse_spec({"task": "variation", "defaults": {"negative_prompt": "x"}})
    with pytest.raises(SpecError, match=r"defaults\.noise_level: unknown field"):
        parse_spec({"defaults": {"noise_level": 5}})
    with pytest.raises(SpecError, match=r"defaults\.height: unknown field"):
        parse_spec({"task": "upscale", "defaults": {"height": 64}})
    with pytest.raises(SpecError, match=r"defaults\.noise_level: .*less than or equal to 350"):
        parse_spec({"task": "upscale", "defaults": {"noise_level": 351}})
    with pytest.raises(SpecError, match=r"defaults: .*tile_overlap \(64\) must be smaller than tile_size \(64\)"):
        parse_spec({"task": "upscale", "defaults": {"tile_size": 64, "tile_overlap": 64}})
    with pytest.raises(SpecError, match=r"defaults\.preprocessing"):
        parse_spec({"task": "variation", "defaults": {"preprocessing": "antialias"}})


def test_image_manifest_rows_are_validated_per_row_and_field():
    spec = parse_spec({"task": "upscale", "seed": 3})
    table = pa.Table.from_pylist([
        {"id": "ok", "image_uri": "a.png", "prompt": None, "noise_level": None, "num_images": 2, "keep": 1},
        {"id": "noise", "image_uri": "b.png", "prompt": "x", "noise_level": 351, "num_images": None, "keep": 2},
        {"id": "nouri", "image_uri": "", "prompt": "x", "noise_level": 0, "num_images": None, "keep": 3},
    ])
    p = plan(table, spec, RESERVED_COLUMNS)
    items = p.items.to_pylist()
    assert [(r["id"], r["image_index"], r["noise_level"], r["prompt"], r["task"]) for r in items] == [
        ("ok", 0, 20, "", "upscale"), ("ok", 1, 20, "", "upscale")]
    assert items[0]["tile_size"] == 128 and items[0]["height"] is None and items[0]["keep"] == 1
    assert items[1]["seed"] == items[0]["seed"] + 1
    errors = {r["id"]: r["error"] for r in p.failed.to_pylist()}
    assert errors["noise"].startswith("noise_level: must be in [0, 350], got 351")
    assert errors["nouri"].startswith("image_uri: missing or empty")
    assert p.failure_reasons()["noise_level: must be in [0, 350]"] == 1
    var = plan(pa.Table.from_pylist([{"id": "v", "image_uri": "a.png", "caption": "carried"}]),
               parse_spec({"task": "variation"}), RESERVED_COLUMNS)
    assert var.carried == ["caption"] and var.items.column("preprocessing").to_pylist() == ["card"]
    assert var.items.column("prompt").to_pylist() == [None]
    from batch.plan.manifest import ManifestError

    with pytest.raises(ManifestError, match=r"\['prompt'\] would overwrite metadata columns"):  # no prompt here
        plan(pa.Table.from_pylist([{"id": "v", "image_uri": "a.png", "prompt": "x"}]), parse_spec({"task": "variation"}),
             RESERVED_COLUMNS)

    with pytest.raises(ManifestError, match=r"lacks required column\(s\) \['image_uri'\]"):
        plan(pa.Table.from_pylist([{"id": "x", "prompt": "p"}]), parse_spec({"task": "variation"}), RESERVED_COLUMNS)


def test_validate_command_knows_the_image_tasks(tmp_path, capsys):
    m = write_manifest(tmp_path / "m.parquet", [{"id": "a", "image_uri": "x.png"}, {"id": "b", "image_uri": None}])
    assert cli_main(["validate", m, "--task", "variation"]) == 1
    out = capsys.readouterr().out
    assert "row 1 (id 'b'): image_uri: missing or empty" in out and '"rows_ok": 1' in out


def test_make_tiny_model_writes_folders_the_diffusers_pipelines_load(tmp_path, capsys):
    for task, cls in (("variation", "StableDiffusionImageVariationPipeline"), ("upscale", "StableDiffusionUpscalePipeline")):
        assert cli_main(["make-tiny-model", str(tmp_path / task), "--task", task]) == 0
        pipe = getattr(diffusers, cls).from_pretrained(tmp_path / task, local_files_only=True)
        assert pipe.unet.config.in_channels == (7 if task == "upscale" else 4)
        if task == "upscale":
            assert pipe.config.max_noise_level == 350 and type(pipe.low_res_scheduler).__name__ == "DDPMScheduler"
            assert 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 4
        else:
            assert pipe.image_encoder.config.projection_dim == pipe.unet.config.cross_attention_dim
        assert not list((tmp_path / task).rglob("*.bin"))  # safetensors only


def test_tiny_preset_equals_saved_folder(tiny_upscale_dir):
    from batch.models.load import load_model

    a, b = load_model("tiny", task="upscale"), load_model(str(tiny_upscale_dir), task="upscale")
    assert a.max_noise_level == b.max_noise_level == 350 and a.revision == "tiny-v1"
    for (na, pa_), (nb, pb) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert na == nb and torch.equal(pa_, pb)


# --- stages in-process -----------------------------------------------------------------------------------

def test_fetch_stage_then_sampler_passes_failed_items_through(tmp_path):
    from batch.run.inputs import fetch_inputs
    from batch.run.stages import Sampler, SamplerSettings

    good = write_png(tmp_path / "g.png", smooth_image(16, 16))
    spec = parse_spec({"task": "upscale", "defaults": {"num_inference_steps": 2, "guidance_scale": 1.0}})
    table = pa.Table.from_pylist([{"id": "g", "image_uri": good, "num_images": 2},
                                  {"id": "m", "image_uri": str(tmp_path / "missing.png")}])
    items = plan(table, spec, RESERVED_COLUMNS).items
    fetched = fetch_inputs(items, {}, 10**6)
    assert fetched.column("status").to_pylist().count("failed") == 1
    out = Sampler(SamplerSettings(task="upscale", model="tiny", dtype="float32", device="cpu", batch_size=2))(fetched).to_pylist()
    by = {(r["id"], r["image_index"]): r for r in out}
    bad = by[("m", 0)]
    assert bad["status"] == "failed" and bad["error"].startswith("image_uri: not found") and bad["_pixels"] is None
    assert bad["height"] is None and bad["input_sha256"] is None
    for k in (0, 1):
        r = by[("g", k)]
        assert r["status"] == "ok" and (r["height"], r["width"]) == (64, 64) and len(r["_pixels"]) == 64 * 64 * 3
        assert (r["input_width"], r["input_height"], r["input_mode"]) == (16, 16, "RGB")
    assert "_input" not in out[0]


@pytest.mark.parametrize("fallback", [True, False])
def test_upscale_sampler_records_the_fp32_redecode(tmp_path, fallback):
    """``optimizations.nan_fallback`` reaches the upscaler: an fp16 VAE decode that overflows is redone in
    fp32 and ``vae_redecoded_fp32`` says so per image (False for every image when the fallback is off, and
    then the broken images fail instead of being stored black)."""
    from batch.run.inputs import fetch_inputs
    from batch.run.stages import Sampler, SamplerSettings
    from batch.spec.base import Optimizations

    spec = parse_spec({"task": "upscale", "defaults": {"num_inference_steps": 2, "guidance_scale": 1.0,
                                                       "tile_size": 16, "tile_overlap": 8}})
    table = pa.Table.from_pylist([{"id": "big", "image_uri": write_png(tmp_path / "b.png", smooth_image(24, 24))},
                                  {"id": "small", "image_uri": write_png(tmp_path / "s.png", smooth_image(16, 16))}])
    fetched = fetch_inputs(plan(table, spec, RESERVED_COLUMNS).items, {}, 10**6)
    sampler = Sampler(SamplerSettings(task="upscale", model="tiny", dtype="float32", device="cpu", batch_size=2,
                                      optimizations=Optimizations(nan_fallback=fallback)))
    with torch.no_grad():
        sampler.model.vae.post_quant_conv.weight.mul_(3e4)  # fp16 activations overflow (the x4 fp16 failure)
    sampler.model.vae.to(torch.float16)
    with np.errstate(invalid="ignore"):
        out = sampler(fetched).to_pylist()
    assert [r["vae_redecoded_fp32"] for r in out] == [fallback, fallback]
    if fallback:  # rescued: real pixels, ok
        assert [r["status"] for r in out] == ["ok", "ok"]
        assert not any(not np.frombuffer(r["_pixels"], np.uint8).any() for r in out)
    else:  # the NaN decode stays broken: failed with its reason, never stored as an ok black image
        from batch.run.stages import FLAT_IMAGE_ERROR

        assert [r["status"] for r in out] == ["failed", "failed"]
        assert all(r["error"].startswith(FLAT_IMAGE_ERROR) and r["_pixels"] is None for r in out)


# --- end to end through Ray --------------------------------------------------------------------------------

def base_spec(task, model, manifest, output, defaults, **kw):
    return parse_spec({"task": task, "model": model, "device": "cpu", "dtype": "float32", "manifest": manifest,
                       "output": output, "defaults": defaults, "batch_size": 2, "actors": 1, "progress": False,
                       "max_failed_fraction": 0.5, **kw})


@pytest.fixture(scope="module")
def variation_run(tmp_path_factory, ray_session, tiny_variation_dir):
    d = tmp_path_factory.mktemp("var")
    rgba = np.dstack([smooth_image(40, 48, 1), np.full((40, 48), 128, np.uint8)])
    buf = io.BytesIO()
    Image.fromarray(smooth_image(48, 32, 0)).save(buf, format="PNG")
    mem_uri = f"memory://sdbatch-var-{d.name}/a.png"  # process-local: fetched in the driver, not in Ray tasks
    fsspec.filesystem("memory").pipe(mem_uri, buf.getvalue())
    rows = [
        {"id": "rgb", "image_uri": mem_uri, "num_images": 2, "seed": 10},
        {"id": "rgba", "image_uri": write_png(d / "b.png", rgba, "RGBA"), "num_images": None, "seed": None},
        {"id": "missing", "image_uri": str(d / "nope.png"), "num_images": None, "seed": None},
        {"id": "empty", "image_uri": str(d / "empty.png"), "num_images": None, "seed": None},
    ]
    (d / "empty.png").write_bytes(b"")
    manifest = write_manifest(d / "m.parquet", rows)
    spec = base_spec("variation", str(tiny_variation_dir), manifest, str(d / "out"),
                     {"height": 64, "width": 64, "num_inference_steps": 3},
                     allowed_input_prefixes=[str(d), f"memory://sdbatch-var-{d.name}"])  # the memory image is elsewhere
    return run_job(spec), str(d / "out"), read_metadata(str(d / "out"))


@pytest.mark.e2e
def test_variation_job_end_to_end_equals_diffusers(variation_run, tiny_variation_dir):
    from batch.sampling.image import card_preprocess
    from batch.run.inputs import fetch_image

    summary, out_uri, meta = variation_run
    rows = {(r["id"], r["image_index"]): r for r in meta.to_pylist()}
    assert summary.rows_ok == 2 and summary.rows_failed == 2 and summary.images_ok == 3
    assert rows[("missing", 0)]["error"].startswith("image_uri: not found")
    assert rows[("empty", 0)]["error"].startswith("image_uri: empty file (0 bytes)")
    pipe = diffusers.StableDiffusionImageVariationPipeline.from_pretrained(tiny_variation_dir, local_files_only=True,
                                                                           safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    out = open_output(out_uri)
    for key in (("rgb", 0), ("rgb", 1), ("rgba", 0)):
        r = rows[key]
        assert r["status"] == "ok" and r["task"] == "variation" and r["preprocessing"] == "card"
        data = fsspec.open(r["image_uri"], "rb").open().read()
        assert r["input_sha256"] == hashlib.sha256(data).hexdigest()
        assert r["input_mode"] == ("RGBA" if key[0] == "rgba" else "RGB")
        # reproduce from the metadata row alone: fetch its input, card-preprocess, run plain diffusers
        img, info = fetch_image(r["image_uri"])
        assert (info["input_width"], info["input_height"]) == (r["input_width"], r["input_height"])
        pipe.scheduler = getattr(diffusers, r["scheduler_class"]).from_config(json.loads(r["scheduler_config"]))
        ref = pipe(image=card_preprocess([img]), height=r["height"], width=r["width"],
                   num_inference_steps=r["num_inference_steps"], guidance_scale=r["guidance_scale"],
                   generator=torch.Generator("cpu").manual_seed(r["seed"]), output_type="np").images[0]
        stored = decode_image(out.fs.cat_file(out.fs._strip_protocol(r["uri"])))
        assert stored.shape == (64, 64, 3)
        assert np.abs(stored.astype(int) - (ref * 255).round()).max() <= 1, key


@pytest.fixture(scope="module")
def upscale_run(tmp_path_factory, ray_session, tiny_upscale_dir):
    d = tmp_path_factory.mktemp("up")
    gray16 = (smooth_image(16, 16, 4)[..., 0].astype(np.uint16) * 257)
    rows = [
        {"id": "small", "image_uri": write_png(d / "s.png", smooth_image(16, 16, 2)), "prompt": "a cat",
         "negative_prompt": "blurry", "noise_level": 30, "seed": 7},
        {"id": "tiled", "image_uri": write_png(d / "t.png", smooth_image(40, 24, 3)), "prompt": None,
         "negative_prompt": None, "noise_level": None, "seed": None},
        {"id": "gray16", "image_uri": write_png(d / "g.png", gray16), "prompt": "", "negative_prompt": None,
         "noise_level": 0, "seed": 1},
        {"id": "corrupt", "image_uri": str(d / "c.png"), "prompt": "x", "negative_prompt": None,
         "noise_level": None, "seed": None},
    ]
    (d / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    manifest = write_manifest(d / "m.parquet", rows)
    spec = base_spec("upscale", str(tiny_upscale_dir), manifest, str(d / "out"),
                     {"num_inference_steps": 3, "tile_size": 16, "tile_overlap": 4})
    return run_job(spec), str(d / "out"), read_metadata(str(d / "out"))


@pytest.mark.e2e
def test_upscale_job_end_to_end(upscale_run, tiny_upscale_dir):
    summary, out_uri, meta = upscale_run
    rows = {r["id"]: r for r in meta.to_pylist()}
    assert summary.rows_ok == 3 and summary.rows_failed == 1
    assert rows["corrupt"]["status"] == "failed" and "image_uri: not a decodable image" in rows["corrupt"]["error"]
    out = open_output(out_uri)
    for rid, (h, w) in (("small", (16, 16)), ("tiled", (40, 24)), ("gray16", (16, 16))):
        r = rows[rid]
        stored = decode_image(out.fs.cat_file(out.fs._strip_protocol(r["uri"])))
        assert r["status"] == "ok" and (r["input_height"], r["input_width"]) == (h, w)
        assert stored.shape == (4 * h, 4 * w, 3) and (r["height"], r["width"]) == (4 * h, 4 * w)
        assert r["tile_size"] == 16 and r["tile_overlap"] == 4 and r["task"] == "upscale"
    assert rows["tiled"]["noise_level"] == 20 and rows["small"]["noise_level"] == 30
    assert rows["gray16"]["input_mode"].startswith("I")
    # a single-tile input (16 <= tile side) equals plain diffusers, reproduced from its metadata row alone
    r = rows["small"]
    pipe = diffusers.StableDiffusionUpscalePipeline.from_pretrained(tiny_upscale_dir, local_files_only=True,
                                                                    safety_checker=None, feature_extractor=None,
                                                                    watermarker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusers, r["scheduler_class"]).from_config(json.loads(r["scheduler_config"]))
    ref = pipe(r["prompt"], image=Image.open(r["image_uri"]), negative_prompt=r["negative_prompt"],
               num_inference_steps=r["num_inference_steps"], guidance_scale=r["guidance_scale"],
               noise_level=r["noise_level"], generator=torch.Generator("cpu").manual_seed(r["seed"]),
               output_type="np").images[0]
    stored = decode_image(out.fs.cat_file(out.fs._strip_protocol(r["uri"])))
    assert np.abs(stored.astype(int) - (ref * 255).round()).max() <= 1

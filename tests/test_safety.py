"""Safety checker policies with a tiny randomly initialised StableDiffusionSafetyChecker saved into copies of
the tiny model folder (the real class and loading code; thresholds set to force or forbid flags)."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pytest

import batch.run.stages as stages
from batch.spec.config import parse_spec
from batch.plan.manifest import plan
from batch.models.load import load_model
from batch.models.weights import ModelError, locate_safety_checker, ships_safety_checker
from batch.store.schema import NSFW_ERROR
from batch.models.safety import (apply_policy, save_tiny_safety_checker,
                                 save_tiny_standalone_checker)
from batch.store.schema import RESERVED_COLUMNS

PROMPTS = ["a red cube", "a blue sphere", "a green cone", "a tiny house"]


def _items():
    spec = parse_spec({"defaults": {"height": 64, "width": 64, "num_inference_steps": 3}})
    table = pa.Table.from_pylist([{"id": f"r{i}", "prompt": p, "seed": i} for i, p in enumerate(PROMPTS)])
    return plan(table, spec, RESERVED_COLUMNS).items


def _sampler(model, policy="flag"):
    return stages.Sampler(stages.SamplerSettings(model=str(model), dtype="float32", device="cpu", batch_size=4,
                                                 safety_policy=policy))


def _pixels(rows):
    return {r["id"]: None if r["_pixels"] is None else np.frombuffer(r["_pixels"], np.uint8).reshape(64, 64, 3)
            for r in rows}


@pytest.fixture(scope="module")
def plain(tiny_dir):
    rows = _sampler(tiny_dir)(_items()).to_pylist()
    return rows


@pytest.fixture(scope="module")
def folders(tiny_dir, tmp_path_factory, plain):
    """Copies of the tiny model with a checker that flags every image, none, or about half of them."""
    d = tmp_path_factory.mktemp("safety")
    out = {}
    for name, thr in (("all", -2.0), ("none", 2.0), ("probe", 2.0)):
        out[name] = shutil.copytree(tiny_dir, d / name)
        save_tiny_safety_checker(out[name], concept_threshold=thr, special_threshold=2.0)
    # "mixed": one threshold for every concept, halfway in the largest gap between the images' best cosines
    probe = load_model(str(out["probe"]), device="cpu", dtype="float32").safety_checker
    images = np.stack([v for v in _pixels(plain).values()])
    best = np.sort(probe.concept_cosines(images).max(axis=1))
    gap = int(np.argmax(np.diff(best)))
    assert best[gap + 1] - best[gap] > 0.004, best  # cosines are compared after rounding to 3 decimals
    out["mixed"] = shutil.copytree(tiny_dir, d / "mixed")
    save_tiny_safety_checker(out["mixed"], concept_threshold=float(best[gap] + best[gap + 1]) / 2,
                             special_threshold=2.0)
    out["expected_mixed"] = gap + 1  # images at or below the gap pass
    return out


def test_model_without_checker_records_null(plain, tiny_dir):
    assert not ships_safety_checker(tiny_dir)
    assert all(r["nsfw"] is None and r["status"] == "ok" for r in plain)


def test_flag_keeps_images_and_records_verdict(folders, plain):
    expected = _pixels(plain)
    for name, verdict in (("all", True), ("none", False)):
        rows = _sampler(folders[name], "flag")(_items()).to_pylist()
        assert all(r["nsfw"] is verdict and r["status"] == "ok" for r in rows), name
        for rid, px in _pixels(rows).items():
            assert np.array_equal(px, expected[rid])  # flag never changes pixels


def test_blackout_zeroes_flagged_images(folders, plain):
    rows = _sampler(folders["all"], "blackout")(_items()).to_pylist()
    assert all(r["nsfw"] is True and r["status"] == "ok" for r in rows)
    assert all(px.shape == (64, 64, 3) and not px.any() for px in _pixels(rows).values())
    rows = _sampler(folders["none"], "blackout")(_items()).to_pylist()
    assert all(np.array_equal(px, _pixels(plain)[rid]) for rid, px in _pixels(rows).items())


def test_drop_fails_only_flagged_rows(folders, plain, tmp_path):
    rows = _sampler(folders["mixed"], "drop")(_items())
    listed = rows.to_pylist()
    dropped = [r for r in listed if r["nsfw"]]
    kept = [r for r in listed if r["nsfw"] is False]
    assert len(kept) == folders["expected_mixed"] and len(dropped) == len(PROMPTS) - len(kept) > 0
    assert all(r["status"] == "failed" and r["error"] == NSFW_ERROR and r["_pixels"] is None for r in dropped)
    assert all(r["status"] == "ok" and np.array_equal(_pixels([r])[r["id"]], _pixels(plain)[r["id"]]) for r in kept)
    written = stages.encode_and_write(rows, stages.WriterSettings(str(tmp_path / "out"))).to_pylist()
    assert {r["id"]: (r["status"], r["uri"] is None, r["nsfw"]) for r in written} == {
        r["id"]: (r["status"], r["status"] != "ok", r["nsfw"]) for r in listed}


def test_apply_policy_and_pickled_checker_refused(folders, tmp_path):
    imgs = np.full((2, 4, 4, 3), 7, np.uint8)
    out, keep = apply_policy(imgs, [True, False], "blackout")
    assert not out[0].any() and (out[1] == 7).all() and keep == [True, True] and (imgs == 7).all()
    assert apply_policy(imgs, [True, False], "drop")[1] == [False, True]
    bad = shutil.copytree(folders["none"], tmp_path / "pickled")
    (bad / "safety_checker" / "model.safetensors").rename(bad / "safety_checker" / "pytorch_model.bin")
    with pytest.raises(ModelError, match="safety_checker"):
        load_model(str(bad), device="cpu", dtype="float32")


# ---- issue 19: a checker for every model (spec safety_checker) ---------------------------------------------


@pytest.fixture(scope="module")
def standalone(tmp_path_factory):
    """Tiny checkers in the standalone layout (CompVis/stable-diffusion-safety-checker's): config.json +
    model.safetensors + preprocessor_config.json at the folder's root; ``all`` flags every image, ``none`` none."""
    d = tmp_path_factory.mktemp("standalone")
    return {name: save_tiny_standalone_checker(d / name, concept_threshold=thr, special_threshold=2.0)
            for name, thr in (("all", -2.0), ("none", 2.0))}


def _checked(model, checker, policy="flag", **kw):
    return stages.Sampler(stages.SamplerSettings(model=str(model), dtype="float32", device="cpu", batch_size=4,
                                                 safety_policy=policy, safety_checker=str(checker), **kw))


def test_standalone_checker_flags_a_model_that_ships_none(standalone, tiny_dir, plain):
    assert not ships_safety_checker(tiny_dir)
    rows = _checked(tiny_dir, standalone["all"])(_items()).to_pylist()
    assert all(r["nsfw"] is True and r["status"] == "ok" for r in rows)
    assert {r["safety_checker"] for r in rows} == {str(standalone["all"])}
    revision = rows[0]["safety_checker_revision"]
    assert revision.startswith("local-") and {r["safety_checker_revision"] for r in rows} == {revision}
    assert all(np.array_equal(px, _pixels(plain)[rid]) for rid, px in _pixels(rows).items())  # flag: same pixels
    rows = _checked(tiny_dir, standalone["none"])(_items()).to_pylist()
    assert all(r["nsfw"] is False and r["status"] == "ok" for r in rows)
    assert rows[0]["safety_checker_revision"] != revision  # another checker, another fingerprint
    assert all(r["safety_checker"] is None and r["safety_checker_revision"] is None for r in plain)


def test_standalone_checker_blackout_and_drop(standalone, tiny_dir):
    rows = _checked(tiny_dir, standalone["all"], "blackout")(_items()).to_pylist()
    assert all(r["nsfw"] is True and r["status"] == "ok" for r in rows)
    assert all(px.shape == (64, 64, 3) and not px.any() for px in _pixels(rows).values())
    rows = _checked(tiny_dir, standalone["all"], "drop")(_items()).to_pylist()
    assert all(r["status"] == "failed" and r["error"] == NSFW_ERROR and r["_pixels"] is None and r["nsfw"] is True
               for r in rows)


def test_checker_for_the_tiny_preset_and_the_image_tasks(standalone, tmp_path):
    from PIL import Image

    from batch.run.inputs import fetch_inputs

    rows = _checked("tiny", standalone["all"])(_items()).to_pylist()
    assert all(r["nsfw"] is True and r["status"] == "ok" for r in rows)
    path = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), np.uint8)).save(path)
    for task, defaults in (("variation", {"height": 32, "width": 32, "num_inference_steps": 2}),
                           ("upscale", {"num_inference_steps": 2})):
        spec = parse_spec({"task": task, "defaults": defaults, "safety_checker": str(standalone["all"])})
        items = plan(pa.Table.from_pylist([{"id": "x", "image_uri": str(path), "num_images": 2}]), spec,
                     RESERVED_COLUMNS).items
        settings = stages.SamplerSettings.from_spec(spec, "cpu")
        assert (settings.safety_checker, settings.safety_checker_revision) == (str(standalone["all"]), None)
        rows = stages.Sampler(settings)(fetch_inputs(items, {}, 10**6)).to_pylist()
        assert [(r["status"], r["nsfw"], r["safety_checker"]) for r in rows] == [
            ("ok", True, str(standalone["all"]))] * 2, task


def test_none_turns_off_the_models_own_checker_and_model_keeps_it(folders, standalone):
    own = folders["all"]
    rows = _checked(own, "none")(_items()).to_pylist()
    assert all(r["nsfw"] is None and r["safety_checker"] is None and r["status"] == "ok" for r in rows)
    rows = _checked(own, "model")(_items()).to_pylist()
    assert all(r["nsfw"] is True for r in rows)
    assert {(r["safety_checker"], r["safety_checker_revision"]) for r in rows} == {(str(own), rows[0]["model_revision"])}
    # another checker replaces the model's own: "none" never flags
    assert all(r["nsfw"] is False for r in _checked(own, standalone["none"])(_items()).to_pylist())
    # a diffusers model folder is a checker location too (its safety_checker/ + feature_extractor/)
    rows = _checked("tiny", own)(_items()).to_pylist()
    assert all(r["nsfw"] is True and r["safety_checker"] == str(own) for r in rows)


def test_dry_run_loads_no_checker(standalone):
    spec = parse_spec({"model": "none", "safety_checker": str(standalone["all"]),
                       "defaults": {"height": 64, "width": 64}})
    rows = stages.Sampler(stages.SamplerSettings.from_spec(spec, "cpu"))(_items()).to_pylist()
    assert all(r["status"] == "ok" and r["nsfw"] is None and r["safety_checker"] is None for r in rows)


def test_bad_checker_locations_are_refused_naming_the_field(standalone, tiny_dir, tmp_path):
    from batch.spec.base import SpecError

    # a folder without a checker (a diffusers model that ships none; an empty folder)
    for folder in (tiny_dir, tmp_path):
        with pytest.raises(ModelError, match=r"safety_checker .*: no safety checker there"):
            load_model("tiny", device="cpu", dtype="float32", safety_checker=str(folder))
    # pickled weights only: refused unless allow_pickle
    bad = shutil.copytree(standalone["none"], tmp_path / "pickled")
    (bad / "model.safetensors").rename(bad / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"safety_checker .*only pickled weights \['pytorch_model.bin'\]"):
        locate_safety_checker(str(bad), None, allow_pickle=False)
    assert locate_safety_checker(str(bad), None, allow_pickle=True).checker_dir == bad
    # not a location at all; a hub id missing from the offline cache (HF_HUB_OFFLINE=1 in conftest)
    with pytest.raises(ModelError, match=r"safety_checker: 'no/such/place' is not 'model', 'none', an existing"):
        locate_safety_checker("no/such/place", None, False)
    with pytest.raises(ModelError, match=r"safety_checker CompVis/stable-diffusion-safety-checker .*cannot resolve"):
        locate_safety_checker("CompVis/stable-diffusion-safety-checker", "main", False)
    assert locate_safety_checker("CompVis/stable-diffusion-safety-checker", None, False, resolve_hub=False) is None
    with pytest.raises(ModelError, match=r"safety_checker_revision: 'v1' applies to hub ids"):
        locate_safety_checker(str(standalone["all"]), "v1", False)
    # the spec names the field
    with pytest.raises(SpecError, match=r"safety_checker: Value error, must be 'model', 'none'"):
        parse_spec({"safety_checker": " "})
    with pytest.raises(SpecError, match=r"safety_checker_revision: 'abc' applies to a hub id"):
        parse_spec({"safety_checker_revision": "abc"})
    spec = parse_spec({"safety_checker": "CompVis/stable-diffusion-safety-checker",
                       "safety_checker_revision": "main"})
    assert (spec.safety_checker, spec.safety_checker_revision) == ("CompVis/stable-diffusion-safety-checker", "main")
    assert parse_spec({}).safety_checker == "model"


def test_card_names_the_checker_that_ran():
    from batch.store.card import dataset_card, model_license

    spec = {"model": "stabilityai/stable-diffusion-2-1", "safety_checker": "CompVis/stable-diffusion-safety-checker",
            "safety_policy": "blackout"}
    record = {"run_id": "r", "spec": spec, "safety_checker": {"location": spec["safety_checker"], "revision": "abc1"}}
    card = dataset_card(record, {}, model_license(spec["model"]))
    assert ("- safety checker: `CompVis/stable-diffusion-safety-checker` (revision `abc1`), policy `blackout`"
            in card)
    card = dataset_card({"run_id": "r", "spec": {"model": "tiny"}, "safety_checker": None}, {}, model_license("tiny"))
    assert "- safety checker: none (the model ships none); metadata `nsfw` is null" in card


@pytest.mark.e2e
def test_job_with_a_standalone_checker_records_it_in_metadata_run_json_and_card(standalone, tiny_dir, tmp_path,
                                                                                 ray_session):
    """The whole job (Ray actors, writers, commit): the checker travels through SamplerSettings.from_spec to
    the actors; metadata, run.json and the dataset card name it; a resume with another checker is refused."""
    from conftest import write_manifest

    from batch.run.job import run_job
    from batch.store.card import CARD
    from batch.store.commit import RUN_RECORD, RunExistsError, read_metadata
    from batch.store.io import open_output

    manifest = write_manifest(tmp_path / "m.parquet", [{"id": f"r{i}", "prompt": p} for i, p in enumerate(PROMPTS)])
    base = {"model": str(tiny_dir), "device": "cpu", "dtype": "float32", "manifest": manifest,
            "output": str(tmp_path / "out"), "defaults": {"height": 64, "width": 64, "num_inference_steps": 3},
            "batch_size": 4, "actors": 1, "progress": False, "safety_checker": str(standalone["all"]),
            "safety_policy": "blackout"}
    summary = run_job(parse_spec(base))
    assert summary.exit_code == 0 and summary.images_ok == len(PROMPTS)
    rows = read_metadata(str(tmp_path / "out")).to_pylist()
    assert all(r["status"] == "ok" and r["nsfw"] is True and r["safety_checker"] == str(standalone["all"])
               for r in rows)
    revision = rows[0]["safety_checker_revision"]
    assert revision.startswith("local-")
    out = open_output(str(tmp_path / "out"))
    record = out.get_json(RUN_RECORD)
    assert record["safety_checker"] == {"location": str(standalone["all"]), "revision": revision}
    assert record["spec"]["safety_checker"] == str(standalone["all"])
    assert f"- safety checker: `{standalone['all']}` (revision `{revision}`), policy `blackout`" in \
        out.get(CARD).decode()
    with pytest.raises(RunExistsError, match="safety_checker"):
        run_job(parse_spec({**base, "safety_checker": str(standalone["none"])}))

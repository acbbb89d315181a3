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
from batch.models.weights import ModelError
from batch.store.schema import NSFW_ERROR
from batch.models.safety import apply_policy, has_safety_checker, save_tiny_safety_checker
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
    assert not has_safety_checker(tiny_dir)
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

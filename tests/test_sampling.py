"""Sampling (batch.sampling.txt2img) against plain diffusers on the tiny models: equality, batch invariance, seeds.

Every comparison is on uint8 pixels with a tolerance of 1 (CPU float32 reductions may differ in the last
bit between batch sizes); the equality tests additionally check that the images are not trivial, so a
"match" can't be two blank images.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from batch.models.load import SCHEDULERS, load_model, make_scheduler
from batch.models.weights import locate
from batch.sampling.txt2img import SamplingParams, txt2img, uses_guidance
from batch.models.tiny import TINY_REVISION

SIZE = 64
STEPS = 4
PROMPT = "a red cube on a table"
NEGATIVE = "blurry, low quality"
SEED = 1234
NAMES = list(SCHEDULERS)


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_model(str(tiny_dir))


@pytest.fixture(scope="module")
def vpred_model(tiny_vpred_dir):
    return load_model(str(tiny_vpred_dir))


def _pipe(folder):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return _pipe(tiny_dir)


@pytest.fixture(scope="module")
def vpred_pipe(tiny_vpred_dir):
    return _pipe(tiny_vpred_dir)


def ours(model, name, prompts, negatives, seeds, *, height=SIZE, width=SIZE, steps=STEPS, guidance=7.5):
    return txt2img(model, make_scheduler(name, model.scheduler_config), list(prompts), list(negatives),
                   list(seeds), SamplingParams(height=height, width=width, num_inference_steps=steps,
                                               guidance_scale=guidance))


def reference(pipe, model, name, prompt, negative, seed, *, height=SIZE, width=SIZE, steps=STEPS, guidance=7.5):
    pipe.scheduler = make_scheduler(name, model.scheduler_config)
    out = pipe(prompt, negative_prompt=negative, height=height, width=width, num_inference_steps=steps,
               guidance_scale=guidance, generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    return (out.images[0] * 255).round().astype(np.uint8)


def maxdiff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def meandiff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def nontrivial(img: np.ndarray) -> bool:
    return img.dtype == np.uint8 and float(img.std()) > 5 and len(np.unique(img)) > 50


# --- equality with diffusers -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_matches_diffusers(model, pipe, name):
    assert model.prediction_type == "epsilon"
    img = ours(model, name, [PROMPT], [NEGATIVE], [SEED])
    assert img.shape == (1, SIZE, SIZE, 3) and img.dtype == np.uint8
    ref = reference(pipe, model, name, PROMPT, NEGATIVE, SEED)
    assert nontrivial(ref)
    assert maxdiff(img[0], ref) <= 1


@pytest.mark.parametrize("name", NAMES)
def test_matches_diffusers_v_prediction(vpred_model, vpred_pipe, model, name):
    assert vpred_model.prediction_type == "v_prediction"
    assert make_scheduler(name, vpred_model.scheduler_config).config.prediction_type == "v_prediction"
    img = ours(vpred_model, name, [PROMPT], [NEGATIVE], [SEED])[0]
    ref = reference(vpred_pipe, vpred_model, name, PROMPT, NEGATIVE, SEED)
    assert nontrivial(ref)
    assert maxdiff(img, ref) <= 1
    # same weights, same seed: only the prediction type differs, and it must change the image
    assert meandiff(img, ours(model, name, [PROMPT], [NEGATIVE], [SEED])[0]) > 1


@pytest.mark.parametrize("name", NAMES)
def test_matches_diffusers_without_guidance(model, pipe, name):
    assert not uses_guidance(model.unet, 1.0)
    img = ours(model, name, [PROMPT], [NEGATIVE], [SEED], guidance=1.0)[0]
    ref = reference(pipe, model, name, PROMPT, NEGATIVE, SEED, guidance=1.0)
    assert nontrivial(ref)
    assert maxdiff(img, ref) <= 1
    # the CFG path really is a different computation
    assert meandiff(img, ours(model, name, [PROMPT], [NEGATIVE], [SEED], guidance=7.5)[0]) > 1


def test_without_guidance_the_negative_prompt_is_unused(model):
    a = ours(model, "ddim", [PROMPT], ["one thing"], [SEED], guidance=1.0)
    b = ours(model, "ddim", [PROMPT], [None], [SEED], guidance=1.0)
    assert np.array_equal(a, b)
    # ... while with guidance it matters
    c = ours(model, "ddim", [PROMPT], ["one thing"], [SEED], guidance=7.5)
    d = ours(model, "ddim", [PROMPT], [None], [SEED], guidance=7.5)
    assert meandiff(c, d) > 0.5


def test_guidance_below_one_matches_diffusers(model, pipe):
    img = ours(model, "euler", [PROMPT], [NEGATIVE], [SEED], guidance=0.5)[0]
    assert maxdiff(img, reference(pipe, model, "euler", PROMPT, NEGATIVE, SEED, guidance=0.5)) <= 1


def test_null_negative_prompt_matches_diffusers_default(model, pipe):
    img = ours(model, "pndm", [PROMPT], [None], [SEED])[0]
    assert maxdiff(img, reference(pipe, model, "pndm", PROMPT, None, SEED)) <= 1
    # None and "" are the same unconditional text
    assert np.array_equal(img, ours(model, "pndm", [PROMPT], [""], [SEED])[0])


@pytest.mark.parametrize("height, width", [(64, 96), (96, 64), (32, 48)])
def test_non_square_matches_diffusers(model, pipe, height, width):
    img = ours(model, "dpmpp_2m", [PROMPT], [NEGATIVE], [SEED], height=height, width=width)[0]
    assert img.shape == (height, width, 3)
    ref = reference(pipe, model, "dpmpp_2m", PROMPT, NEGATIVE, SEED, height=height, width=width)
    assert maxdiff(img, ref) <= 1


def test_long_prompt_truncated_like_diffusers(model, pipe):
    long_prompt = " ".join(f"word{i}" for i in range(200))  # far beyond 77 tokens
    img = ours(model, "euler_a", [long_prompt], [NEGATIVE], [SEED])[0]
    assert maxdiff(img, reference(pipe, model, "euler_a", long_prompt, NEGATIVE, SEED)) <= 1


def test_model_default_scheduler_is_pndm(model):
    assert model.default_scheduler == "pndm"
    assert model.scheduler_config["_class_name"] == "PNDMScheduler"


# --- batch invariance ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_batch_invariance(model, name):
    alone = ours(model, name, [PROMPT], [NEGATIVE], [SEED], steps=5)[0]
    prompts = ["a dog", PROMPT, "x " * 100, "a tree at night"]
    negatives = [None, NEGATIVE, "", "bright"]
    seeds = [1, SEED, 2**63 - 1, 99]
    batch = ours(model, name, prompts, negatives, seeds, steps=5)
    assert batch.shape == (4, SIZE, SIZE, 3)
    assert maxdiff(alone, batch[1]) <= 1
    # the neighbours are different images, so the match above is not an accident
    for j in (0, 2, 3):
        assert meandiff(batch[j], batch[1]) > 1


@pytest.mark.parametrize("name", ["euler_a", "pndm"])
def test_batch_invariance_every_position(model, name):
    prompts = ["a dog", PROMPT, "a cat", "a tree at night"]
    negatives = [None, NEGATIVE, "", "bright"]
    seeds = [1, SEED, 7, 99]
    batch = ours(model, name, prompts, negatives, seeds)
    reordered = ours(model, name, prompts[::-1], negatives[::-1], seeds[::-1])[::-1]
    assert max(maxdiff(a, b) for a, b in zip(batch, reordered)) <= 1
    for j in (0, 3):
        assert maxdiff(batch[j], ours(model, name, [prompts[j]], [negatives[j]], [seeds[j]])[0]) <= 1


def test_same_prompt_and_seed_twice_in_one_batch(model):
    imgs = ours(model, "euler_a", [PROMPT, PROMPT], [NEGATIVE, NEGATIVE], [SEED, SEED])
    assert maxdiff(imgs[0], imgs[1]) <= 1


# --- seeds ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pndm", "euler_a"])
def test_same_seed_twice_is_identical(model, name):
    a = ours(model, name, [PROMPT], [NEGATIVE], [SEED])
    b = ours(model, name, [PROMPT], [NEGATIVE], [SEED])
    assert np.array_equal(a, b)


@pytest.mark.parametrize("name", ["pndm", "euler_a"])
def test_different_seeds_give_different_images(model, name):
    a = ours(model, name, [PROMPT], [NEGATIVE], [SEED])[0]
    b = ours(model, name, [PROMPT], [NEGATIVE], [SEED + 1])[0]
    assert meandiff(a, b) > 1


def test_global_torch_rng_does_not_matter(model):
    torch.manual_seed(0)
    a = ours(model, "euler_a", [PROMPT], [NEGATIVE], [SEED])
    torch.manual_seed(12345)
    torch.randn(1000)
    b = ours(model, "euler_a", [PROMPT], [NEGATIVE], [SEED])
    assert np.array_equal(a, b)


# --- argument checks ---------------------------------------------------------------------------------------


def test_txt2img_rejects_bad_arguments(model):
    sched = make_scheduler("ddim", model.scheduler_config)
    p = SamplingParams(SIZE, SIZE, 2, 7.5)
    with pytest.raises(ValueError):
        txt2img(model, sched, ["a", "b"], [None], [1, 2], p)
    with pytest.raises(ValueError):
        txt2img(model, sched, ["a"], [None], [1, 2], p)
    with pytest.raises(ValueError):
        txt2img(model, sched, [], [], [], p)
    with pytest.raises(ValueError, match="multiples"):
        txt2img(model, sched, ["a"], [None], [1], SamplingParams(60, SIZE, 2, 7.5))


# --- model identity -----------------------------------------------------------------------------------------


def test_tiny_preset_equals_saved_folder(model):
    tiny = load_model("tiny")
    for comp in ("unet", "vae", "text_encoder"):
        ours_sd = getattr(tiny, comp).state_dict()
        saved_sd = getattr(model, comp).state_dict()
        assert set(ours_sd) == set(saved_sd), comp
        for k in ours_sd:
            assert ours_sd[k].dtype == saved_sd[k].dtype, (comp, k)
            assert torch.equal(ours_sd[k], saved_sd[k]), (comp, k)
    text = ["a red cube", "caf\u00e9 \U0001f600 " * 30]
    assert tiny.tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids == \
        model.tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids
    assert tiny.prediction_type == model.prediction_type == "epsilon"
    assert tiny.default_scheduler == model.default_scheduler
    assert np.array_equal(ours(tiny, "ddim", [PROMPT], [NEGATIVE], [SEED], steps=2),
                          ours(model, "ddim", [PROMPT], [NEGATIVE], [SEED], steps=2))


def test_model_identity(model, tiny_dir, tmp_path):
    tiny = load_model("tiny")
    assert tiny.revision == TINY_REVISION == "tiny-v1"
    assert tiny.model_id == "tiny"
    assert model.revision.startswith("local-")
    assert len(model.revision) == len("local-") + 16
    assert model.model_id == str(tiny_dir)

    copy = tmp_path / "copy"
    shutil.copytree(tiny_dir, copy)
    assert locate(str(copy), None, False)[2] == model.revision  # content, not location, decides

    cfg_path = copy / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["beta_end"] = 0.013
    cfg_path.write_text(json.dumps(cfg))
    changed = load_model(str(copy))
    assert changed.revision.startswith("local-")
    assert changed.revision != model.revision
    assert changed.scheduler_config["beta_end"] == 0.013

    # a weight file change (within the hashed first/last MiB) changes it as well
    weights = copy / "vae" / "diffusion_pytorch_model.safetensors"
    before = locate(str(copy), None, False)[2]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert locate(str(copy), None, False)[2] != before


def test_model_loaded_in_eval_mode_without_grad(model):
    for comp in (model.unet, model.vae, model.text_encoder):
        assert not comp.training
        assert not any(p.requires_grad for p in comp.parameters())
    assert model.dtype == torch.float32 and model.device == torch.device("cpu")
    assert model.vae_scale_factor == 8

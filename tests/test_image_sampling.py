"""Image-conditioned sampling (batch.sampling.image) against plain diffusers on the tiny image models:
equality with StableDiffusionImageVariationPipeline / StableDiffusionUpscalePipeline, batch invariance,
the model card's preprocessing, and tiled upscaling (size, seams)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import smooth_image
from PIL import Image

from batch.sampling.image import (
    UpscaleRequest,
    blend_weights,
    card_preprocess,
    pipeline_preprocess,
    tile_starts,
    upscale,
    variation,
)
from batch.models.load import load_model, make_scheduler
from batch.sampling.txt2img import SamplingParams
from test_sampling import maxdiff, nontrivial

STEPS = 3


@pytest.fixture(scope="module")
def var_model(tiny_variation_dir):
    return load_model(str(tiny_variation_dir), task="variation")


@pytest.fixture(scope="module")
def var_pipe(tiny_variation_dir):
    from diffusers import StableDiffusionImageVariationPipeline

    pipe = StableDiffusionImageVariationPipeline.from_pretrained(tiny_variation_dir, local_files_only=True,
                                                                 safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def up_model(tiny_upscale_dir):
    return load_model(str(tiny_upscale_dir), task="upscale")


@pytest.fixture(scope="module")
def up_pipe(tiny_upscale_dir):
    from diffusers import StableDiffusionUpscalePipeline

    pipe = StableDiffusionUpscalePipeline.from_pretrained(tiny_upscale_dir, local_files_only=True, safety_checker=None,
                                                          feature_extractor=None, watermarker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def u8(images) -> np.ndarray:
    return (np.asarray(images) * 255).round().astype(np.uint8)


def run_variation(model, pixel_values, seeds, guidance=3.0, size=64):
    return variation(model, make_scheduler(model.default_scheduler, model.scheduler_config), pixel_values, seeds,
                     SamplingParams(height=size, width=size, num_inference_steps=STEPS, guidance_scale=guidance))


# --- variations --------------------------------------------------------------------------------------

@pytest.mark.parametrize("guidance", [3.0, 1.0])
def test_variation_equals_diffusers_for_the_same_preprocessed_tensor(var_model, var_pipe, guidance):
    img = smooth_image(40, 56)
    pv = card_preprocess([img])
    ours = run_variation(var_model, pv, [5], guidance)[0]
    ref = u8(var_pipe(image=pv, height=64, width=64, num_inference_steps=STEPS, guidance_scale=guidance,
                      generator=torch.Generator("cpu").manual_seed(5), output_type="np").images[0])
    assert nontrivial(ours)
    assert maxdiff(ours, ref) <= 1


def test_variation_pipeline_preprocessing_equals_diffusers_pil_path(var_model, var_pipe):
    img = smooth_image(48, 32, seed=3)
    ours = run_variation(var_model, pipeline_preprocess(var_model.feature_extractor, [img]), [9])[0]
    ref = u8(var_pipe(image=Image.fromarray(img), height=64, width=64, num_inference_steps=STEPS, guidance_scale=3.0,
                      generator=torch.Generator("cpu").manual_seed(9), output_type="np").images[0])
    assert maxdiff(ours, ref) <= 1


def test_card_preprocessing_is_bicubic_without_antialias():
    """On a high-frequency image the card's no-antialias resize differs clearly from an antialiased one;
    on both, the values are the CLIP-normalised interpolation of the [0, 1] image."""
    checker = ((np.indices((512, 512)).sum(0) % 2) * 255).astype(np.uint8)
    img = np.repeat(checker[..., None], 3, axis=2)
    ours = card_preprocess([img])[0]
    x = torch.from_numpy(img).permute(2, 0, 1).float()[None] / 255
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    no_aa = (F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False, antialias=False) - mean) / std
    aa = (F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False, antialias=True) - mean) / std
    assert ours.shape == (3, 224, 224)
    torch.testing.assert_close(ours, no_aa[0], rtol=0, atol=1e-6)
    assert (ours - aa[0]).abs().mean() > 0.5  # aliasing keeps the checkerboard's contrast; antialiasing greys it
    assert aa[0].std() < 0.5 * ours.std()


def test_variation_batch_invariance(var_model):
    imgs = [smooth_image(40, 40, s) for s in range(3)]
    pv = card_preprocess(imgs)
    batched = run_variation(var_model, pv, [11, 12, 13])
    for i in range(3):
        alone = run_variation(var_model, pv[i:i + 1], [11 + i])[0]
        assert maxdiff(batched[i], alone) <= 1
    assert maxdiff(batched[0], batched[1]) > 10  # different inputs and seeds give different images


# --- x4 upscaling ------------------------------------------------------------------------------------

def run_upscale(model, requests, guidance=9.0, **kw):
    return upscale(model, lambda: make_scheduler(model.default_scheduler, model.scheduler_config), requests,
                   num_inference_steps=STEPS, guidance_scale=guidance, **kw)


def test_upscale_single_tile_equals_diffusers(up_model, up_pipe):
    img = smooth_image(16, 24, seed=2)
    ours = run_upscale(up_model, [UpscaleRequest(img, "a cat", "blurry", 30, 7)])[0]
    ref = u8(up_pipe("a cat", image=Image.fromarray(img), negative_prompt="blurry", num_inference_steps=STEPS,
                     guidance_scale=9.0, noise_level=30, generator=torch.Generator("cpu").manual_seed(7),
                     output_type="np").images[0])
    assert ours.shape == (64, 96, 3)
    assert nontrivial(ours)
    assert maxdiff(ours, ref) <= 1


def test_upscale_batch_invariance_across_sizes_and_noise_levels(up_model):
    reqs = [UpscaleRequest(smooth_image(16, 16, 0), "a", None, 20, 1),
            UpscaleRequest(smooth_image(24, 16, 1), "b", "c", 50, 2),
            UpscaleRequest(smooth_image(16, 16, 2), "", None, 0, 3)]
    batched = run_upscale(up_model, reqs, tiles_per_call=4)
    for r, b in zip(reqs, batched):
        alone = run_upscale(up_model, [r])[0]
        assert b.shape == (r.image.shape[0] * 4, r.image.shape[1] * 4, 3)
        assert maxdiff(b, alone) <= 1


def test_upscale_pads_odd_sizes_and_returns_exactly_4x(up_model):
    out = run_upscale(up_model, [UpscaleRequest(smooth_image(13, 10), "", None, 20, 0)], guidance=1.0)[0]
    assert out.shape == (52, 40, 3)


def test_tile_starts_cover_with_overlap():
    assert tile_starts(100, 128, 32) == [0]
    for size, tile, overlap in [(512, 128, 32), (64, 16, 4), (130, 128, 32), (100, 24, 0)]:
        starts = tile_starts(size, tile, overlap)
        assert starts[0] == 0 and starts[-1] == size - tile
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # neighbours share >= overlap
    w = blend_weights(64, 16, True, True)
    assert w[0] < 0.05 and w[-1] < 0.05 and (w[16:48] == 1).all()
    assert (blend_weights(64, 16, False, False) == 1).all()
    # two tiles overlapping by exactly the ramp cross-fade: weights sum to 1 across the overlap
    left, right = blend_weights(32, 8, False, True), blend_weights(32, 8, True, False)
    np.testing.assert_allclose(left[-8:] + right[:8], 1.0, atol=1e-6)


@pytest.fixture(scope="module")
def tiled(up_model):
    """A smooth 64x64 input (4x the 16 px tile) upscaled untiled, tiled with overlap, tiled without."""
    img = smooth_image(64, 64, seed=5)
    req = [UpscaleRequest(img, "", None, 20, 3)]
    runs = {}
    for name, tile, overlap in (("untiled", 64, 0), ("blended", 16, 4), ("hard", 16, 0)):
        runs[name] = run_upscale(up_model, req, guidance=1.0, tile_size=tile, tile_overlap=overlap,
                                 tiles_per_call=25)[0].astype(np.float64)
    return runs


def seam_ratio(out: np.ndarray, ref: np.ndarray, seams: list[int]) -> float:
    """How much more the tiled image departs from the whole-image result in a band of 8 output pixels
    (2 low-res pixels) at a seam than along a typical line: the worst band mean over the median line."""
    diff = np.abs(out - ref)
    lines = [diff.mean(axis=(0, 2)), diff.mean(axis=(1, 2))]  # per column, per row
    bands = [line[max(0, s - 2):s + 6].mean() for line in lines for s in seams]
    return float(max(bands) / np.median(np.concatenate(lines)))


def test_tiled_upscale_has_the_right_size_and_no_visible_seam(tiled):
    assert tiled["blended"].shape == tiled["untiled"].shape == (256, 256, 3)
    # 1. tiles start from the same noise as the whole image, so the tiled result stays close to it
    assert np.abs(tiled["blended"] - tiled["untiled"]).mean() < 0.5 * tiled["untiled"].std()
    # 2. seams: with blending, no column/row at a tile boundary deviates much more than a typical one...
    hard_seams = [4 * s for s in tile_starts(64, 16, 0)[1:]]
    blend_seams = [4 * s for s in tile_starts(64, 16, 4)[1:]] + [4 * (s + 16) for s in tile_starts(64, 16, 4)[:-1]]
    assert seam_ratio(tiled["blended"], tiled["untiled"], blend_seams + hard_seams) < 1.45
    # 3. ...while abutting tiles without overlap show exactly such a band (the check can fail)
    assert seam_ratio(tiled["hard"], tiled["untiled"], hard_seams) > 1.45


def test_upscale_nan_fp16_decode_is_rescued_per_image(tiny_upscale_dir):
    """x4 upscaling honours ``nan_fallback`` as txt2img does: a VAE whose fp16 decode overflows (NaN ->
    black) is re-decoded in fp32; one flag per output image, set when any of its tiles was rescued."""
    model = load_model(str(tiny_upscale_dir), task="upscale")
    with torch.no_grad():
        model.vae.post_quant_conv.weight.mul_(3e4)  # fp16 activations overflow (the x4 fp16 failure)
    reqs = [UpscaleRequest(smooth_image(24, 24, seed=1), "a cat", None, 20, 5),  # 4 tiles of 16 px
            UpscaleRequest(smooth_image(16, 16, seed=2), "a dog", None, 20, 6)]  # one tile
    kw = dict(guidance=1.0, tile_size=16, tile_overlap=8)
    reference = run_upscale(model, reqs, **kw)  # fp32 VAE: finite and not black
    assert all(img.max() > 0 for img in reference)
    model.vae.to(torch.float16)
    flags: list[bool] = []
    with np.errstate(invalid="ignore"):
        broken = run_upscale(model, reqs, **kw, rescued=flags)
    assert flags == [False, False] and all(img.max() == 0 for img in broken)
    rescued: list[bool] = []
    fixed = run_upscale(model, reqs, **kw, nan_fallback=True, rescued=rescued)
    assert rescued == [True, True]
    for a, b in zip(fixed, reference):
        assert a.shape == b.shape and np.abs(a.astype(int) - b).max() <= 1
    assert model.vae.dtype == torch.float16

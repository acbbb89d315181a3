"""Speed switches and the fp16 black-image triage: off is bit-identical, on stays within 1/255 (CPU fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batch.spec.base import Optimizations
from batch.models.load import load_model, make_scheduler
from batch.sampling.txt2img import SamplingParams, decode, txt2img
from batch.models.speed import apply_optimizations
from batch.models.tiny import tiny_components

PARAMS = SamplingParams(height=64, width=64, num_inference_steps=4, guidance_scale=7.5)
PROMPTS, NEGS, SEEDS = ["a red cube", "a blue sphere"], [None, "blurry"], [3, 4]


def _generate(opts: Optimizations | None) -> np.ndarray:
    model = load_model("tiny", dtype="float32", device="cpu")
    if opts is not None:
        apply_optimizations(model, opts)
    return txt2img(model, make_scheduler("pndm", model.scheduler_config), PROMPTS, NEGS, SEEDS, PARAMS)


@pytest.fixture(scope="module")
def plain():
    return _generate(None)


def test_default_switches_change_nothing(plain):
    assert np.array_equal(_generate(Optimizations()), plain)


@pytest.mark.parametrize("opts", [
    Optimizations(attention="math"),
    Optimizations(channels_last=True),
    Optimizations(fuse_qkv=True),
    Optimizations(attention="math", channels_last=True, fuse_qkv=True, vae_dtype="float32", cudnn_benchmark=True),
    # inductor's C++ backend on CPU: about a minute to compile the tiny UNet (slow: not in `make test-fast`)
    pytest.param(Optimizations(compile=True), marks=pytest.mark.slow),
], ids=["math-attention", "channels-last", "fused-qkv", "all-eager", "compile"])
def test_switches_on_stay_within_one_level(plain, opts, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # process-wide switch: restored after
    assert np.abs(_generate(opts).astype(int) - plain).max() <= 1


def test_applied_switches_are_reported():
    model = load_model("tiny", dtype="float32", device="cpu")
    done = apply_optimizations(model, Optimizations(channels_last=True, fuse_qkv=True))
    assert done == {"attention": "sdpa", "fuse_qkv": True, "channels_last": True}
    conv = model.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)


def _overflowing_vae():
    """The tiny VAE with one layer scaled so fp16 activations overflow (the SD2.1 / x4 fp16 failure)."""
    vae = tiny_components()["vae"].eval()
    with torch.no_grad():
        vae.post_quant_conv.weight.mul_(3e4)
    return vae


def test_nan_fp16_decode_is_rescued_by_an_fp32_redecode():
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    vae = _overflowing_vae()
    reference = decode(vae, latents)  # fp32: finite and not black
    assert all(img.max() > 0 for img in reference)
    vae16 = vae.to(torch.float16)
    with np.errstate(invalid="ignore"):
        broken = decode(vae16, latents.half())
    assert all(img.max() == 0 for img in broken)  # NaN quantises to an all-black image
    rescued: list[bool] = []
    fixed = decode(vae16, latents.half(), fallback=True, rescued=rescued)
    assert rescued == [True, True, True]
    assert np.abs(fixed.astype(int) - reference).max() <= 1  # fp16-rounded weights, fp32 arithmetic
    assert vae16.dtype == torch.float16  # the VAE is back in its own dtype afterwards


def test_healthy_fp16_decode_is_left_alone():
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    vae16 = tiny_components()["vae"].eval().to(torch.float16)
    rescued: list[bool] = []
    out = decode(vae16, latents.half(), fallback=True, rescued=rescued)
    assert rescued == [False, False] and np.array_equal(out, decode(vae16, latents.half()))

"""Shared helpers for the benchmarks: random-weight models at real or CPU-sized architectures, result lines.

Random weights are fine for speed: cost depends on the architecture, not the weights. The configs below are
the published ones (SD v1-4 / SD 2.1 ``unet``/``vae``/``text_encoder`` config.json values).
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import sys
from importlib import metadata
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SD1_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD2_UNET = dict(SD1_UNET, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                use_linear_projection=True)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
              block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
OPENCLIP_H = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                  num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512)
# CPU benchmark UNet: big enough that one denoising step takes >= 50 ms on 2 cores (issue 6), small to build.
CPU_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(128, 256),
                cross_attention_dim=32, attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def save_model(directory: Path, arch: str) -> Path:
    """Write a random-weight diffusers folder: ``cpu`` (CPU_UNET + tiny rest), ``sd1``, ``sd2``."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from batch.models.tiny import tiny_components

    torch.manual_seed(0)
    comps = tiny_components("v_prediction" if arch == "sd2" else "epsilon")
    if arch == "cpu":
        comps["unet"] = UNet2DConditionModel(**CPU_UNET)
    else:
        comps["unet"] = UNet2DConditionModel(**(SD2_UNET if arch == "sd2" else SD1_UNET))
        comps["vae"] = AutoencoderKL(**SD_VAE)
        tok = comps["tokenizer"]  # byte-level tokenizer; ids stay below the real vocabulary size
        cfg = dict(OPENCLIP_H if arch == "sd2" else CLIP_L, bos_token_id=tok.bos_token_id,
                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        comps["text_encoder"] = CLIPTextModel(CLIPTextConfig(**cfg))
    pipe = StableDiffusionPipeline(**comps, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def environment() -> dict:
    versions = {}
    for name in ("torch", "diffusers", "transformers", "ray"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
            "machine": platform.machine(), "cpus": __import__("os").cpu_count(), "gpu": gpu, **versions}


def emit(result: dict) -> None:
    """Print the machine-readable result line (``RESULT {json}``) that BENCHMARKS.md quotes."""
    print("RESULT " + json.dumps({**result, "env": environment()}, sort_keys=True), flush=True)

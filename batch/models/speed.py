"""Speed switches applied to a loaded model: attention kernel, memory layout, fused QKV, torch.compile.

Each switch is off by default (``config.Optimizations``), so the default path is bit-identical to plain
diffusers; with them on, outputs stay within 1/255 on CPU fp32 (``tests/test_speed.py``).

1. attention: ``sdpa`` is diffusers' default ``AttnProcessor2_0`` (``F.scaled_dot_product_attention``, which
   picks flash / memory-efficient kernels on GPU); ``math`` is the classic ``AttnProcessor`` (reference).
2. channels_last: NHWC layout for the UNet and VAE, which cuDNN's tensor-core convolutions prefer.
3. fuse_qkv: ``unet.fuse_qkv_projections()``: one GEMM instead of three per self-attention.
4. compile: ``torch.compile`` of the UNet's forward; recompiles per new latent shape, so buckets help.
5. cudnn_benchmark: cuDNN times its convolution algorithms for each new shape and keeps the fastest.
6. vae_dtype float32: the VAE runs in fp32 whatever the model dtype (the SD2.1 / x4 fp16 NaN failure mode).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from batch.spec.base import Optimizations


def apply_optimizations(model: Any, opts: Optimizations) -> dict[str, Any]:
    """Apply ``opts`` to ``model`` (a :class:`batch.models.load.LoadedModel`) in place; return what was done."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    done: dict[str, Any] = {}
    if opts.attention == "math":
        model.unet.set_attn_processor(AttnProcessor())
        model.vae.set_attn_processor(AttnProcessor())
        done["attention"] = "math"
    else:
        done["attention"] = "sdpa" if any(isinstance(p, AttnProcessor2_0)
                                          for p in model.unet.attn_processors.values()) else "other"
    if opts.fuse_qkv:
        model.unet.fuse_qkv_projections()
        done["fuse_qkv"] = True
    if opts.channels_last:
        model.unet.to(memory_format=torch.channels_last)
        model.vae.to(memory_format=torch.channels_last)
        done["channels_last"] = True
    if opts.vae_dtype == "float32" and model.vae.dtype != torch.float32:
        model.vae.to(dtype=torch.float32)
        done["vae_dtype"] = "float32"
    if opts.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True  # process-wide: the actor holds one model, so one setting
        done["cudnn_benchmark"] = True
    if opts.compile:
        t0 = time.perf_counter()
        model.unet = torch.compile(model.unet, mode=opts.compile_mode, fullgraph=False)
        done["compile"] = {"mode": opts.compile_mode, "wrap_seconds": time.perf_counter() - t0}
    return done

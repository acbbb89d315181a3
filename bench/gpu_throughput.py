"""GPU throughput at full size with random weights: sdbatch's sampler vs diffusers' plain pipeline.

For each architecture (SD1.x at 512, SD2.1 at 768, the x4 upscaler 128 -> 512), dtype (fp16, bf16) and
batch size (1, 8, 16, 32): images/s, seconds per denoising step, peak GPU memory, and for SD1.x the share
of the GPU's dense fp16 peak, taking 82.9 TFLOP per image (SD1.x, 512x512, 50 steps, CFG; issue 6).
Runs only where a GPU is present (``--smoke`` runs a tiny CPU version of the txt2img paths; the full-size
x4 upscaler is too big for a CPU check).

    .venv/bin/python bench/gpu_throughput.py [--arch sd1 sd2 x4] [--dtype float16 bfloat16]
        [--batch 1 8 16 32] [--steps 50] [--impl sdbatch diffusers] [--channels-last] [--fuse-qkv] [--compile]
        [--compile-mode M] [--cudnn-benchmark] [--peak-tflops N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import emit, save_model

from batch.spec.base import Optimizations
from batch.models.load import load_model, make_scheduler
from batch.sampling.txt2img import SamplingParams, txt2img
from batch.models.speed import apply_optimizations

SD1_TFLOP_PER_IMAGE = 82.9
DENSE_FP16_TFLOPS = {"H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0,
                     "H200": 989.4, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0}
SIZES = {"sd1": 512, "sd2": 768, "x4": 512, "cpu": 64}


def peak_tflops(override: float | None) -> float | None:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in DENSE_FP16_TFLOPS.items() if k in name), None)


def _timed(fn, repeats: int) -> tuple[float, float]:
    """(first call seconds, mean seconds of the next ``repeats`` calls)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return first, (time.perf_counter() - t0) / repeats


def bench_txt2img(folder: Path, arch: str, dtype: str, batch: int, steps: int, opts: Optimizations, device: str,
                  repeats: int, peak: float | None, impls: tuple[str, ...] = ("sdbatch", "diffusers")) -> None:
    size = SIZES[arch]
    prompts = [f"a photograph of an astronaut riding a horse, {i}" for i in range(batch)]
    params = SamplingParams(height=size, width=size, num_inference_steps=steps, guidance_scale=7.5)
    for impl in impls:
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        if impl == "sdbatch":
            model = load_model(str(folder), dtype=dtype, device=device)
            done = apply_optimizations(model, opts)
            sched = "pndm" if arch != "sd2" else "ddim"

            def run():
                txt2img(model, make_scheduler(sched, model.scheduler_config), prompts, [None] * batch,
                        list(range(batch)), params, nan_fallback=True)
        else:
            from diffusers import DDIMScheduler, StableDiffusionPipeline

            pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=getattr(torch, dtype)).to(device)
            pipe.set_progress_bar_config(disable=True)
            if arch == "sd2":
                pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
            done = {}

            def run():
                pipe(prompts, height=size, width=size, num_inference_steps=steps, guidance_scale=7.5,
                     generator=[torch.Generator("cpu").manual_seed(i) for i in range(batch)], output_type="np")
        first, mean = _timed(run, repeats)
        ips = batch / mean
        result = {"bench": "gpu_throughput", "impl": impl, "arch": arch, "size": size, "dtype": dtype,
                  "batch": batch, "steps": steps, "images_per_s": round(ips, 3),
                  "s_per_step": round(mean / steps, 4), "first_call_s": round(first, 2), "optimizations": done}
        if device == "cuda":
            result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if arch == "sd1" and peak and steps == 50:
            result["pct_of_dense_fp16_peak"] = round(100 * ips * SD1_TFLOP_PER_IMAGE / peak, 1)
        emit(result)
        del run
        if impl == "sdbatch":
            del model
        else:
            del pipe


def bench_upscaler(dtype: str, batch: int, steps: int, device: str, repeats: int) -> None:
    """The x4 upscaler's full-size UNet/VAE through diffusers' pipeline (128 -> 512, noise_level 20)."""
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from batch.models.tiny import tiny_tokenizer
    from common import OPENCLIP_H

    tok = tiny_tokenizer()
    unet = UNet2DConditionModel(sample_size=128, in_channels=7, out_channels=4, layers_per_block=2,
                                block_out_channels=(256, 512, 512, 1024), cross_attention_dim=1024,
                                attention_head_dim=8, num_class_embeds=1000, use_linear_projection=True,
                                down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
                                up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                        block_out_channels=(128, 256, 512), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, scaling_factor=0.08333)
    text = CLIPTextModel(CLIPTextConfig(**dict(OPENCLIP_H, bos_token_id=tok.bos_token_id,
                                                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)))
    pipe = StableDiffusionUpscalePipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                          low_res_scheduler=DDPMScheduler(num_train_timesteps=1000),
                                          scheduler=DDIMScheduler(prediction_type="v_prediction"),
                                          max_noise_level=350).to(device, getattr(torch, dtype))
    pipe.set_progress_bar_config(disable=True)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    low = torch.rand(batch, 3, 128, 128, device=device, dtype=getattr(torch, dtype)) * 2 - 1

    def run():
        pipe(["a photo"] * batch, image=low, num_inference_steps=steps, guidance_scale=9.0, noise_level=20,
             output_type="np")
    first, mean = _timed(run, repeats)
    result = {"bench": "gpu_throughput", "impl": "diffusers", "arch": "x4", "size": 512, "dtype": dtype,
              "batch": batch, "steps": steps, "images_per_s": round(batch / mean, 3),
              "s_per_step": round(mean / steps, 4), "first_call_s": round(first, 2)}
    if device == "cuda":
        result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    emit(result)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=["sd1", "sd2", "x4"], choices=["sd1", "sd2", "x4"])
    ap.add_argument("--dtype", nargs="+", default=["float16", "bfloat16"])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8, 16, 32])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--impl", nargs="+", default=["sdbatch", "diffusers"], choices=["sdbatch", "diffusers"],
                    help="txt2img implementations to time (the x4 upscaler runs through diffusers only)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--fuse-qkv", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--compile-mode", default="default",
                    choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
    ap.add_argument("--cudnn-benchmark", action="store_true")
    ap.add_argument("--peak-tflops", type=float, help="dense fp16 peak of this GPU, if not in the table")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run of every code path (no GPU needed)")
    args = ap.parse_args()

    if args.smoke:
        device, archs, dtypes, batches, steps, repeats = "cpu", ["cpu"], ["float32"], [1], 2, 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_throughput: no CUDA GPU here (use --smoke for a CPU check of the code paths)")
        device, archs, dtypes, batches, steps, repeats = "cuda", args.arch, args.dtype, args.batch, args.steps, args.repeats
    opts = Optimizations(channels_last=args.channels_last, fuse_qkv=args.fuse_qkv, compile=args.compile,
                         compile_mode=args.compile_mode, cudnn_benchmark=args.cudnn_benchmark)
    peak = peak_tflops(args.peak_tflops)
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            if arch == "x4":
                for dtype in dtypes:
                    for batch in batches:
                        bench_upscaler(dtype, batch, steps, device, repeats)
                continue
            folder = save_model(Path(tmp) / arch, arch)
            for dtype in dtypes:
                for batch in batches:
                    try:
                        bench_txt2img(folder, arch, dtype, batch, steps, opts, device, repeats, peak,
                                      tuple(args.impl))
                    except torch.cuda.OutOfMemoryError as err:
                        emit({"bench": "gpu_throughput", "arch": arch, "dtype": dtype, "batch": batch,
                              "error": f"out of memory: {err}"[:200]})


if __name__ == "__main__":
    main()

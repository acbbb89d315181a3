"""Text-to-image sampling: tensors in, tensors out (no Ray, no storage, no files).

One call generates a batch of images that share shape, steps, guidance and scheduler; each image has its
own seed. The math is that of diffusers' ``StableDiffusionPipeline.__call__`` step for step, so an image
made here equals the pipeline's output for the same model, parameters and
``generator=torch.Generator("cpu").manual_seed(seed)``:

1. encode prompts and negative prompts with the CLIP text encoder (padded/truncated to 77 tokens);
2. draw initial latents per image from its own CPU generator (diffusers' ``randn_tensor`` with a list
   of generators), scaled by the scheduler's ``init_noise_sigma``;
3. denoise with classifier-free guidance (Ho & Salimans 2022; the model cards' ``guidance_scale`` is
   ``w`` of Imagen eq. 2): the unconditional and text branches run as one batched UNet call and are
   combined as ``eps_u + w * (eps_t - eps_u)``; guidance is skipped when ``w <= 1``, as in diffusers;
4. decode ``latents / scaling_factor`` with the VAE and quantise ``round(255 * clamp(x/2 + 0.5, 0, 1))``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from batch.plan.seeds import generator_for


@dataclass(frozen=True)
class SamplingParams:
    """Parameters shared by every image of one sampler call."""

    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float


@torch.no_grad()
def encode_text(tokenizer, text_encoder, texts: list[str], device: torch.device) -> torch.Tensor:
    """CLIP last hidden states for ``texts``, padded/truncated to the tokenizer's max length (77)."""
    tokens = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt")
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        mask = tokens.attention_mask.to(device)
    embeds = text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
    return embeds.to(dtype=text_encoder.dtype, device=device)


def token_count(tokenizer, text: str | None) -> int:
    """Tokens ``text`` needs with start/end tokens, before truncation (to tell when it gets cut)."""
    return len(tokenizer(text or "", truncation=False).input_ids)


def truncation_warnings(tokenizer, fields: dict[str, str | None]) -> str | None:
    """``"prompt: truncated to 77 tokens (had N)"`` for each text the encoder will cut, or None."""
    limit = tokenizer.model_max_length
    notes = [f"{name}: truncated to {limit} tokens (had {n})" for name, text in fields.items()
             if text and (n := token_count(tokenizer, text)) > limit]
    return "; ".join(notes) or None


def initial_latents(seeds: list[int], shape: tuple[int, int, int], device: torch.device,
                    dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Per-image Gaussian latents, each from ``torch.Generator("cpu").manual_seed(seed)``."""
    generators = [generator_for(s) for s in seeds]
    return randn_tensor((len(seeds), *shape), generator=generators, device=device, dtype=dtype), generators


def _step_kwargs(scheduler, generators: list[torch.Generator]) -> dict:
    params = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = 0.0
    if "generator" in params:  # ancestral samplers draw fresh noise per step from each image's generator
        kwargs["generator"] = generators if len(generators) > 1 else generators[0]
    return kwargs


@torch.no_grad()
def denoise(unet, scheduler, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
            params: SamplingParams, generators: list[torch.Generator], *, image: torch.Tensor | None = None,
            class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Run the reverse diffusion; ``uncond`` is None when guidance is off (``guidance_scale <= 1``).

    ``image``/``class_labels``: the x4 upscaler's extra UNet inputs (the noised low-res image, concatenated
    to the scaled latents' channels, and its noise levels), already doubled by the caller under guidance.
    """
    scheduler.set_timesteps(params.num_inference_steps, device=latents.device)
    latents = latents * scheduler.init_noise_sigma
    embeds = torch.cat([uncond, cond]) if uncond is not None else cond
    step_kwargs = _step_kwargs(scheduler, generators)
    unet_kwargs = {} if class_labels is None else {"class_labels": class_labels}
    for t in scheduler.timesteps:
        model_in = torch.cat([latents] * 2) if uncond is not None else latents
        model_in = scheduler.scale_model_input(model_in, t)
        if image is not None:
            model_in = torch.cat([model_in, image], dim=1)
        eps = unet(model_in, t, encoder_hidden_states=embeds, **unet_kwargs, return_dict=False)[0]
        if uncond is not None:
            eps_u, eps_t = eps.chunk(2)
            eps = eps_u + params.guidance_scale * (eps_t - eps_u)
        latents = scheduler.step(eps, t, latents, **step_kwargs, return_dict=False)[0]
    return latents


def _broken(images: torch.Tensor) -> list[int]:
    """Indices of decoded images (in [-1, 1] space) with NaN/inf values or nothing but black."""
    finite = torch.isfinite(images).flatten(1).all(dim=1)
    black = (images / 2 + 0.5).clamp(0, 1).flatten(1).amax(dim=1) <= 0
    return [i for i in range(images.shape[0]) if not finite[i] or black[i]]


def flatten_nonfinite(images: torch.Tensor) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] with any NaN/inf value become flat black (-1 everywhere) instead of
    quantising their NaNs to arbitrary bytes: a flat image is what the sampler stage fails as non-finite
    (``batch.run.stages``), so a broken image is never stored as ``ok``."""
    bad = ~torch.isfinite(images).flatten(1).all(dim=1)
    if bool(bad.any()):
        images = images.clone()
        images[bad] = -1.0
    return images


def quantize_on_device(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) values in [0, 1] -> (N, H, W, 3) uint8 on the same device: ``round(255 * x)`` in float32
    with round-half-to-even, the same IEEE operations as :func:`decode`'s NumPy path, so the same bytes."""
    return (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def to_host_pinned(images: torch.Tensor) -> np.ndarray:
    """Copy a device tensor into a page-locked host buffer (``non_blocking``, then wait for the stream)."""
    host = torch.empty(images.shape, dtype=images.dtype, pin_memory=True)
    host.copy_(images, non_blocking=True)
    torch.cuda.current_stream(images.device).synchronize()
    return host.numpy()


@torch.no_grad()
def decode(vae, latents: torch.Tensor, fallback: bool = False, rescued: list[bool] | None = None,
           pinned: bool = False) -> np.ndarray:
    """VAE-decode latents to uint8 images, shape (N, H, W, 3).

    ``fallback``: with a VAE in fp16/bf16, images whose decode holds NaN/inf or is all black (the SD2.1
    and x4-upscaler fp16 overflow, which quantises to a black image) are decoded again with the VAE in
    fp32; one flag per image (True: re-decoded) is appended to ``rescued`` when given.
    ``pinned`` (CUDA): quantise on the device and copy the uint8 pixels out through pinned memory (same bytes).
    """
    scaled = (latents / vae.config.scaling_factor).to(vae.dtype)
    images = flatten_nonfinite(decode_scaled(vae, scaled, fallback, rescued))
    images = (images / 2 + 0.5).clamp(0, 1)
    if pinned:
        return to_host_pinned(quantize_on_device(images))
    images = images.cpu().permute(0, 2, 3, 1).float().numpy()
    return (images * 255).round().astype(np.uint8)


def decode_scaled(vae, scaled: torch.Tensor, fallback: bool = False,
                  rescued: list[bool] | None = None) -> torch.Tensor:
    """The VAE decode of already scaled latents (in the VAE's dtype) with :func:`decode`'s fp32 fallback;
    returns the decoder's output in [-1, 1] (the VAE's dtype, or float32 when an image was re-decoded)."""
    images = vae.decode(scaled, return_dict=False)[0]
    flags = [False] * images.shape[0]
    if fallback and vae.dtype != torch.float32:
        bad = _broken(images.float())
        if bad:
            dtype = vae.dtype
            vae.to(dtype=torch.float32)
            try:
                redo = vae.decode(scaled[bad].float(), return_dict=False)[0]
            finally:
                vae.to(dtype=dtype)
            images = images.float()
            images[bad] = redo
            for i in bad:
                flags[i] = True
    if rescued is not None:
        rescued.extend(flags)
    return images


def uses_guidance(unet, guidance_scale: float) -> bool:
    """Classifier-free guidance runs when ``w > 1`` (and the UNet is not guidance-distilled)."""
    return guidance_scale > 1 and unet.config.time_cond_proj_dim is None


@torch.no_grad()
def txt2img(model, scheduler, prompts: list[str], negative_prompts: list[str | None], seeds: list[int],
            params: SamplingParams, nan_fallback: bool = False, rescued: list[bool] | None = None,
            pinned: bool = False) -> np.ndarray:
    """Generate ``len(prompts)`` images (uint8, N x H x W x 3); image ``i`` is seeded by ``seeds[i]``.

    ``model`` is a :class:`batch.models.load.LoadedModel` (or anything with its unet/vae/text_encoder/
    tokenizer/device/dtype/vae_scale_factor); ``scheduler`` is a fresh scheduler instance.
    ``nan_fallback``/``rescued``/``pinned``: see :func:`decode`.
    """
    if not (len(prompts) == len(negative_prompts) == len(seeds)) or not prompts:
        raise ValueError("prompts, negative_prompts and seeds must be non-empty and of equal length")
    f = model.vae_scale_factor
    if params.height % f or params.width % f:
        raise ValueError(f"height and width must be multiples of the VAE factor {f}")
    cond = encode_text(model.tokenizer, model.text_encoder, list(prompts), model.device)
    uncond = None
    if uses_guidance(model.unet, params.guidance_scale):
        uncond = encode_text(model.tokenizer, model.text_encoder, [n or "" for n in negative_prompts], model.device)
    shape = (model.unet.config.in_channels, params.height // f, params.width // f)
    latents, generators = initial_latents(seeds, shape, model.device, cond.dtype)
    latents = denoise(model.unet, scheduler, latents, cond, uncond, params, generators)
    return decode(model.vae, latents, fallback=nan_fallback, rescued=rescued, pinned=pinned)

"""Image-conditioned sampling (variations, x4 upscaling): tensors and arrays in, arrays out; no Ray, no I/O.

**Variations** follow ``StableDiffusionImageVariationPipeline.__call__`` step for step:

1. preprocess each input to the CLIP image encoder's 224x224 input (:func:`card_preprocess`, the model
   card's recipe, or :func:`pipeline_preprocess`, the model's ``CLIPImageProcessor``);
2. the image embedding (``image_embeds``, one token) is the UNet's context; the unconditional branch of
   classifier-free guidance uses an all-zero embedding, as diffusers does;
3. latents, denoising and decoding are those of text-to-image (``batch.sampling.txt2img``), each image seeded by
   its own ``torch.Generator("cpu").manual_seed(seed)``.

**x4 upscaling** follows ``StableDiffusionUpscalePipeline.__call__``:

1. the low-res image is scaled to [-1, 1] and noised by the low-res DDPM schedule at ``noise_level``
   (``add_noise``), the noise drawn from the image's generator *before* its initial latents;
2. the noise level is the UNet's class label; each step the UNet sees the 4 latent channels
   concatenated with the 3 noised low-res channels; CFG as for text (negative prompt or "");
3. the VAE (x4) decodes latents of the low-res size to an image four times larger.

**Tiling** (inputs larger than ``tile_size`` in either side): the input is covered by tiles of
``tile_size`` whose starts step by ``tile_size - tile_overlap`` (the last tile is aligned to the edge). The
image's noise and initial latents are drawn once at full size from its generator and cropped per tile, so
overlapping tiles start from the same noise; each tile is denoised and decoded alone (memory bounded by
the tiles per call, never by the image), and the decoded tiles are blended with weights that ramp
linearly from ~0 to 1 over the ``4 * tile_overlap`` output pixels at every *inner* tile edge (edges on
the image border keep weight 1): a cross-fade that hides seams. An input of at most ``tile_size`` per
side is one tile and equals diffusers' own output. Sides that are not multiples of 8 are padded by edge
replication and the output cropped back to exactly four times the input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from batch.models.tiny import CLIP_MEAN, CLIP_STD
from batch.plan.seeds import derive_row_seed, generator_for
from batch.sampling.txt2img import (
    SamplingParams,
    decode,
    decode_scaled,
    flatten_nonfinite,
    denoise,
    encode_text,
    initial_latents,
    uses_guidance,
)

CLIP_SIZE = 224
UPSCALE_FACTOR = 4
PAD_MULTIPLE = 8


# --- variations --------------------------------------------------------------------------------------

def card_preprocess(images: list[np.ndarray]) -> torch.Tensor:
    """The model card's preprocessing: to float in [0, 1], resize to 224x224 **bicubic without
    antialiasing** (``torch.nn.functional.interpolate``, as torchvision's tensor ``Resize(antialias=False)``),
    normalise with CLIP mean/std. Returns (N, 3, 224, 224) float32."""
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    out = []
    for img in images:
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0  # ToTensor
        x = F.interpolate(x[None], size=(CLIP_SIZE, CLIP_SIZE), mode="bicubic", align_corners=False,
                          antialias=False)[0]
        out.append((x - mean) / std)
    return torch.stack(out)


def pipeline_preprocess(feature_extractor, images: list[np.ndarray]) -> torch.Tensor:
    """The pipeline's own path: the model's ``CLIPImageProcessor`` on PIL images (short-side resize,
    centre crop, CLIP mean/std). Returns (N, 3, 224, 224)."""
    from PIL import Image

    return feature_extractor(images=[Image.fromarray(i) for i in images], return_tensors="pt").pixel_values


def preprocess_for_variation(model, images: list[np.ndarray], how: str) -> torch.Tensor:
    """``how`` is ``card`` or ``pipeline`` (the spec's ``defaults.preprocessing``)."""
    if how == "card":
        return card_preprocess(images)
    if how == "pipeline":
        if model.feature_extractor is None:
            raise ValueError("preprocessing 'pipeline' needs the model's feature_extractor, and it has none")
        return pipeline_preprocess(model.feature_extractor, images)
    raise ValueError(f"preprocessing must be 'card' or 'pipeline', got {how!r}")


@torch.no_grad()
def variation(model, scheduler, pixel_values: torch.Tensor, seeds: list[int], params: SamplingParams,
              nan_fallback: bool = False, rescued: list[bool] | None = None) -> np.ndarray:
    """Variations of preprocessed images ``pixel_values`` (N, 3, 224, 224); uint8 (N, H, W, 3).

    ``model`` is a :class:`batch.models.load.LoadedModel` loaded with ``task="variation"``;
    ``nan_fallback``/``rescued``: see :func:`batch.sampling.txt2img.decode`.
    """
    if pixel_values.shape[0] != len(seeds) or not seeds:
        raise ValueError("pixel_values and seeds must be non-empty and of equal length")
    f = model.vae_scale_factor
    if params.height % f or params.width % f:
        raise ValueError(f"height and width must be multiples of the VAE factor {f}")
    enc = model.image_encoder
    embeds = enc(pixel_values.to(device=model.device, dtype=enc.dtype)).image_embeds.unsqueeze(1)
    uncond = torch.zeros_like(embeds) if uses_guidance(model.unet, params.guidance_scale) else None
    shape = (model.unet.config.in_channels, params.height // f, params.width // f)
    latents, generators = initial_latents(seeds, shape, model.device, embeds.dtype)
    latents = denoise(model.unet, scheduler, latents, embeds, uncond, params, generators)
    return decode(model.vae, latents, fallback=nan_fallback, rescued=rescued)


# --- x4 upscaling ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class UpscaleRequest:
    """One image to upscale: uint8 (h, w, 3) pixels and the parameters that may differ per image."""

    image: np.ndarray
    prompt: str
    negative_prompt: str | None
    noise_level: int
    seed: int


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` covering ``size`` with at least ``overlap`` shared pixels."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    n = math.ceil((size - overlap) / stride)
    return sorted({min(i * stride, size - tile) for i in range(n)})


def blend_weights(length: int, ramp: int, ramp_start: bool, ramp_end: bool) -> np.ndarray:
    """1-D blend weights of a tile: a linear ramp over ``ramp`` pixels at each inner edge, 1 elsewhere."""
    w = np.ones(length, dtype=np.float32)
    if ramp > 0:
        r = (np.arange(min(ramp, length), dtype=np.float32) + 0.5) / ramp
        if ramp_start:
            w[: len(r)] = np.minimum(w[: len(r)], r)
        if ramp_end:
            w[length - len(r):] = np.minimum(w[length - len(r):], r[::-1])
    return w


def _to_model_range(img: np.ndarray) -> torch.Tensor:
    """uint8 (h, w, 3) -> float32 (3, h, w) in [-1, 1], the arithmetic of diffusers' VaeImageProcessor."""
    x = torch.from_numpy(img.astype(np.float32) / 255.0).permute(2, 0, 1)
    return 2.0 * x - 1.0


def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if ph or pw:
        x = F.pad(x[None], (0, pw, 0, ph), mode="replicate")[0]
    return x


@torch.no_grad()
def upscale_tiles(model, scheduler, low_res: torch.Tensor, image_noise: torch.Tensor, latents: torch.Tensor,
                  cond: torch.Tensor, uncond: torch.Tensor | None, noise_levels: list[int],
                  num_inference_steps: int, guidance_scale: float, generators: list[torch.Generator],
                  nan_fallback: bool = False, rescued: list[bool] | None = None) -> torch.Tensor:
    """Upscale a batch of equally sized tiles; returns decoded float images (N, 3, 4h, 4w) in [-1, 1].

    ``low_res`` (N, 3, h, w) in [-1, 1]; ``image_noise`` (N, 3, h, w) and ``latents`` (N, C, h, w) are
    standard normal draws; ``cond``/``uncond`` text embeddings per tile (``uncond`` None: no guidance).
    ``nan_fallback``/``rescued``: see :func:`batch.sampling.txt2img.decode` (one flag per tile).
    """
    dev = model.device
    levels = torch.tensor(noise_levels, dtype=torch.long, device=dev)
    image = model.low_res_scheduler.add_noise(low_res.to(dev, cond.dtype), image_noise.to(dev, cond.dtype), levels)
    if uncond is not None:
        image, levels = torch.cat([image] * 2), torch.cat([levels] * 2)
    params = SamplingParams(height=4 * low_res.shape[-2], width=4 * low_res.shape[-1],
                            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
    latents = denoise(model.unet, scheduler, latents.to(dev, cond.dtype), cond, uncond, params, generators,
                      image=image, class_labels=levels)
    vae = model.vae
    return decode_scaled(vae, latents.to(vae.dtype) / vae.config.scaling_factor, nan_fallback, rescued).float().cpu()


@dataclass
class _Tile:
    image: int  # index of the request
    y: int
    x: int
    low_res: torch.Tensor
    noise: torch.Tensor
    latents: torch.Tensor
    generator: torch.Generator


@torch.no_grad()
def upscale(model, new_scheduler: Callable[[], object], requests: list[UpscaleRequest], num_inference_steps: int,
            guidance_scale: float, tile_size: int = 128, tile_overlap: int = 32, tiles_per_call: int = 4,
            progress: Callable[[int], None] | None = None, nan_fallback: bool = False,
            rescued: list[bool] | None = None) -> list[np.ndarray]:
    """x4-upscale every request; returns uint8 (4h, 4w, 3) arrays (tiling rules in the module docstring).

    ``nan_fallback``/``rescued``: see :func:`batch.sampling.txt2img.decode`; one flag per request is appended to
    ``rescued`` (True when any of its tiles was re-decoded in fp32).

    Tiles of equal shape from all requests are denoised together, at most ``tiles_per_call`` per UNet
    batch, each with a fresh scheduler from ``new_scheduler``; each tile's noise comes from its own
    image's seed only, so results do not depend on which requests share a call.
    """
    if not requests:
        return []
    if not 0 <= tile_overlap < tile_size:
        raise ValueError(f"tile_overlap must be in [0, tile_size), got {tile_overlap} for tile_size {tile_size}")
    lat_ch = model.vae.config.latent_channels
    use_cfg = uses_guidance(model.unet, guidance_scale)
    dev = model.device

    # 1. text embeddings per image (one encoder call for all)
    cond_all = encode_text(model.tokenizer, model.text_encoder, [r.prompt or "" for r in requests], dev)
    uncond_all = None
    if use_cfg:
        uncond_all = encode_text(model.tokenizer, model.text_encoder, [r.negative_prompt or "" for r in requests], dev)

    # 2. per image: pad, draw full-size noise then latents from its generator (diffusers' order), cut tiles
    tiles: list[_Tile] = []
    layouts = []
    for i, r in enumerate(requests):
        img = _pad_to(_to_model_range(r.image), PAD_MULTIPLE)
        _, hp, wp = img.shape
        gen = generator_for(r.seed)
        noise = torch.randn((1, 3, hp, wp), generator=gen, dtype=cond_all.dtype)[0]
        lat = torch.randn((1, lat_ch, hp, wp), generator=gen, dtype=cond_all.dtype)[0]
        th, tw = min(tile_size, hp), min(tile_size, wp)
        ys, xs = tile_starts(hp, th, tile_overlap), tile_starts(wp, tw, tile_overlap)
        single = len(ys) == 1 and len(xs) == 1
        layouts.append((hp, wp, th, tw, ys, xs))
        for j, (y, x) in enumerate((y, x) for y in ys for x in xs):
            # one tile: keep the image's generator (the scheduler's own draws continue it, as in diffusers);
            # several: each tile's scheduler noise from a seed derived from (image seed, tile index)
            tg = gen if single else generator_for(derive_row_seed(r.seed, f"tile-{j}"))
            tiles.append(_Tile(i, y, x, img[:, y:y + th, x:x + tw], noise[:, y:y + th, x:x + tw],
                               lat[:, y:y + th, x:x + tw], tg))

    # 3. denoise + decode tiles of one shape together, tiles_per_call at a time; blend into the outputs
    acc = [torch.zeros(3, hp * UPSCALE_FACTOR, wp * UPSCALE_FACTOR) for hp, wp, *_ in layouts]
    wsum = [torch.zeros(1, hp * UPSCALE_FACTOR, wp * UPSCALE_FACTOR) for hp, wp, *_ in layouts]
    order = sorted(range(len(tiles)), key=lambda k: (tuple(tiles[k].low_res.shape), k))
    groups: list[list[int]] = []
    for k in order:
        if groups and tiles[groups[-1][0]].low_res.shape == tiles[k].low_res.shape and len(groups[-1]) < tiles_per_call:
            groups[-1].append(k)
        else:
            groups.append([k])
    image_rescued = [False] * len(requests)
    for group in groups:
        ts = [tiles[k] for k in group]
        tile_rescued: list[bool] = []
        idx = torch.tensor([t.image for t in ts], device=cond_all.device)
        out = upscale_tiles(
            model, new_scheduler(), torch.stack([t.low_res for t in ts]), torch.stack([t.noise for t in ts]),
            torch.stack([t.latents for t in ts]), cond_all[idx], None if uncond_all is None else uncond_all[idx],
            [requests[t.image].noise_level for t in ts], num_inference_steps, guidance_scale,
            [t.generator for t in ts], nan_fallback=nan_fallback, rescued=tile_rescued)
        for t, flag in zip(ts, tile_rescued):
            image_rescued[t.image] |= flag
        for t, pix in zip(ts, out):
            hp, wp, th, tw, ys, xs = layouts[t.image]
            s = UPSCALE_FACTOR
            ramp = tile_overlap * s
            wy = blend_weights(th * s, ramp, t.y > 0, t.y + th < hp)
            wx = blend_weights(tw * s, ramp, t.x > 0, t.x + tw < wp)
            w = torch.from_numpy(np.outer(wy, wx))[None]
            ys_, xs_ = slice(t.y * s, (t.y + th) * s), slice(t.x * s, (t.x + tw) * s)
            acc[t.image][:, ys_, xs_] += pix * w
            wsum[t.image][:, ys_, xs_] += w
        if progress is not None:
            progress(len(ts))

    # 4. normalise, quantise as diffusers does, crop the padding away
    if rescued is not None:
        rescued.extend(image_rescued)
    results = []
    for i, r in enumerate(requests):
        img = (flatten_nonfinite((acc[i] / wsum[i])[None])[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy()
        h, w = r.image.shape[:2]
        results.append((img * 255).round().astype(np.uint8)[: h * UPSCALE_FACTOR, : w * UPSCALE_FACTOR])
    return results

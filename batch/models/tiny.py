"""Tiny randomly initialised Stable Diffusion models: the offline test double for the real ones.

The architecture is the real one (diffusers' ``UNet2DConditionModel`` and ``AutoencoderKL``, transformers'
``CLIPTextModel``), only narrower and shallower, so every code path that loads, samples and decodes a
real checkpoint runs unchanged on it. Weights are drawn from a fixed seed, so the ``tiny`` preset is the
same model on every machine, and ``batch.models.load.save_tiny_model`` writes a standard diffusers folder
(``model_index.json`` + safetensors) that ``StableDiffusionPipeline.from_pretrained(dir)`` loads.
"""

from __future__ import annotations


from typing import Any

import torch

TINY_SEED = 0
# the ``_class_name`` of each tiny preset's own scheduler (what ``scheduler: model`` means for it)
TINY_SCHEDULER_CLASS = {"txt2img": "PNDMScheduler", "variation": "PNDMScheduler", "upscale": "DDIMScheduler"}
TINY_REVISION = "tiny-v1"  # bump when the configs below change: it is recorded in every metadata row
TINY_SIZE = 64  # default image side for the tiny model (latent 8x8 with the x8 VAE below)

# SD v1-4's scheduler config (scheduler/scheduler_config.json on the hub): PNDM in PLMS mode.
SD14_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
}


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable unicode character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_tokenizer():
    """A byte-level CLIP tokenizer with no merges: every byte of a word is one token (514-entry vocab).

    Built in code because no vocabulary can be downloaded here; it tokenises any text, pads and truncates
    to 77 tokens exactly as CLIP's does, which is all the sampler relies on.
    """
    from transformers import CLIPTokenizer

    alphabet = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_components(prediction_type: str = "epsilon", seed: int = TINY_SEED) -> dict:
    """Build the tiny txt2img components deterministically (same weights for the same arguments)."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG as it was
        return _build(prediction_type, seed)


def _unet(seed: int, **arch: Any):
    """A tiny ``UNet2DConditionModel`` (two blocks of 32/64 channels, one layer each), drawn from ``seed``."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                                cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32, **arch)


def _vae(seed: int, blocks: int, **arch: Any):
    """A tiny ``AutoencoderKL`` of ``blocks`` blocks (x2 each after the first), drawn from ``seed``."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,) + (16,) * (blocks - 1),
                         down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks, latent_channels=4, layers_per_block=1,
                         norm_num_groups=8, **arch)


def _build(prediction_type: str, seed: int) -> dict:
    from diffusers import PNDMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer()
    unet = _unet(seed, sample_size=TINY_SIZE // 8, in_channels=4,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = _vae(seed + 1, blocks=4, sample_size=TINY_SIZE)  # 4 blocks: the same x8 downsampling as SD's VAE
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = PNDMScheduler.from_config({**SD14_SCHEDULER_CONFIG, "prediction_type": prediction_type})
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


# --- image tasks -------------------------------------------------------------------------------------

TINY_UPSCALE_SIZE = 32  # default low-res input side for the tiny upscaler (output 128)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# stabilityai/stable-diffusion-x4-upscaler: DDIM with v-prediction; the low-res image is noised with DDPM.
X4_SCHEDULER_CONFIG = {
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "v_prediction",
}
X4_LOW_RES_SCHEDULER_CONFIG = {
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "variance_type": "fixed_small",
}
X4_MAX_NOISE_LEVEL = 350
X4_VAE_SCALING = 0.08333


def tiny_variation_components(seed: int = TINY_SEED) -> dict:
    """Tiny ``StableDiffusionImageVariationPipeline`` components (lambdalabs/sd-image-variations layout):
    the txt2img UNet and x8 VAE, a CLIP vision encoder whose ``projection_dim`` equals the UNet's
    ``cross_attention_dim`` (its image embedding is the UNet's one-token context), and a
    ``CLIPImageProcessor`` configured like the real model's (224 px, bicubic, CLIP mean/std)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.random.fork_rng(devices=[]):
        base = _build("epsilon", seed)
        torch.manual_seed(seed + 3)
        image_encoder = CLIPVisionModelWithProjection(
            CLIPVisionConfig(hidden_size=32, intermediate_size=37, projection_dim=base["unet"].config.cross_attention_dim,
                             num_hidden_layers=2, num_attention_heads=4, image_size=224, patch_size=32)
        ).eval().requires_grad_(False)
    feature_extractor = CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
        crop_size={"height": 224, "width": 224}, do_rescale=True, do_normalize=True,
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True,
    )
    return {"unet": base["unet"], "vae": base["vae"], "image_encoder": image_encoder,
            "feature_extractor": feature_extractor, "scheduler": base["scheduler"]}


def tiny_upscale_components(seed: int = TINY_SEED) -> dict:
    """Tiny ``StableDiffusionUpscalePipeline`` components (stabilityai x4-upscaler layout): a UNet taking
    7 channels (4 latent + 3 noised low-res RGB) with a class embedding for the noise level, a 3-block
    VAE (x4: latents are the low-res size, the decoded image four times larger), the tiny text encoder,
    DDIM v-prediction and the low-res DDPM schedule, ``max_noise_level`` 350."""
    from diffusers import DDIMScheduler, DDPMScheduler

    with torch.random.fork_rng(devices=[]):
        base = _build("epsilon", seed)
        # as the real x4 UNet: 7 input channels (4 latent + 3 noised low-res RGB), no attention at full latent
        # resolution (= the low-res input size), the noise level as the class label
        unet = _unet(seed + 4, sample_size=TINY_UPSCALE_SIZE, in_channels=7,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), num_class_embeds=1000)
        # 3 blocks: x4 between latents and pixels
        vae = _vae(seed + 5, blocks=3, sample_size=TINY_UPSCALE_SIZE * 4, scaling_factor=X4_VAE_SCALING)
    for module in (unet, vae):
        module.eval().requires_grad_(False)
    return {"unet": unet, "vae": vae, "text_encoder": base["text_encoder"], "tokenizer": base["tokenizer"],
            "scheduler": DDIMScheduler.from_config(X4_SCHEDULER_CONFIG),
            "low_res_scheduler": DDPMScheduler.from_config(X4_LOW_RES_SCHEDULER_CONFIG),
            "max_noise_level": X4_MAX_NOISE_LEVEL}



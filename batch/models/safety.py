"""The Stable Diffusion safety checker (the SD v1 model cards' intended-use filter) and its policies.

A model folder that ships ``safety_checker/`` (diffusers' ``StableDiffusionSafetyChecker``: a CLIP vision
tower + projection compared by cosine similarity against 17 concept and 3 special-care embeddings, each with
a threshold) and ``feature_extractor/`` (CLIP image preprocessing) gets it run on every generated image,
exactly as ``StableDiffusionPipeline.run_safety_checker`` does: uint8 images -> PIL -> feature extractor ->
checker -> one boolean per image. The spec's ``safety_policy`` then decides:

* ``flag`` (default): keep the image, record ``nsfw = true`` in its metadata row;
* ``blackout``: replace the image by black pixels, as diffusers' pipeline does, and record ``nsfw = true``;
* ``drop``: write no image; the row is ``failed`` with error ``nsfw: ...``.

Models without a checker (the ``tiny`` preset, folders without the two components) record ``nsfw = null``.
Weights load from safetensors only, unless ``allow_pickle``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

SAFETY_COMPONENTS = ("safety_checker", "feature_extractor")
POLICIES = ("flag", "blackout", "drop")


def has_safety_checker(folder: Path | None) -> bool:
    """True when a model folder ships both the checker and its feature extractor."""
    return folder is not None and all((Path(folder) / c).is_dir() for c in SAFETY_COMPONENTS)


def _image_processor_class():
    try:  # transformers 5: the PIL/numpy backend (the default one needs torchvision)
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil
    except ImportError:  # transformers 4
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor


class SafetyChecker:
    """A loaded checker + feature extractor; ``__call__(images)`` returns one nsfw flag per image."""

    def __init__(self, checker, feature_extractor, device: torch.device, dtype: torch.dtype):
        self.checker = checker.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.feature_extractor = feature_extractor
        self.device, self.dtype = device, dtype

    @classmethod
    def load(cls, folder: Path, device: torch.device, dtype: torch.dtype, allow_pickle: bool = False,
             variant: str | None = None) -> "SafetyChecker":
        """Load ``folder/safety_checker`` and ``folder/feature_extractor`` (safetensors unless allowed)."""
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

        from batch.models.weights import ModelError, check_component_weights

        sc_dir = Path(folder) / "safety_checker"
        check_component_weights(Path(folder), "safety_checker", allow_pickle)
        kwargs: dict[str, Any] = {"use_safetensors": None if allow_pickle else True}
        if variant and any(f".{variant}." in p.name for p in sc_dir.iterdir()):
            kwargs["variant"] = variant
        try:
            checker = StableDiffusionSafetyChecker.from_pretrained(sc_dir, **kwargs)
            extractor = _image_processor_class().from_pretrained(Path(folder) / "feature_extractor")
        except (OSError, ValueError) as err:
            raise ModelError(f"model folder {folder}: cannot load the safety checker: {err}") from None
        return cls(checker, extractor, device, dtype)

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> list[bool]:
        """NSFW flag per image of an (N, H, W, 3) uint8 batch (diffusers' ``run_safety_checker`` steps)."""
        from PIL import Image

        # 1. feature extractor on PIL images (diffusers converts its [0,1] floats to uint8 PIL first: same input)
        clip_input = self.feature_extractor([Image.fromarray(im) for im in images], return_tensors="pt")
        pixel_values = clip_input["pixel_values"].to(device=self.device, dtype=self.dtype)
        # 2. the checker on a copy (its forward blacks out flagged images in place)
        _, flags = self.checker(clip_input=pixel_values, images=images.copy())
        return [bool(f) for f in flags]


    @torch.no_grad()
    def concept_cosines(self, images: np.ndarray) -> np.ndarray:
        """Cosine similarity of each image's embedding to each concept embedding, shape (N, 17): the
        scores the checker compares with its per-concept thresholds (``concept_embeds_weights``)."""
        from PIL import Image

        from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

        clip_input = self.feature_extractor([Image.fromarray(im) for im in images], return_tensors="pt")
        pixel_values = clip_input["pixel_values"].to(device=self.device, dtype=self.dtype)
        embeds = self.checker.visual_projection(self.checker.vision_model(pixel_values)[1])
        return cosine_distance(embeds, self.checker.concept_embeds).float().cpu().numpy()


def apply_policy(images: np.ndarray, flags: list[bool], policy: str) -> tuple[np.ndarray, list[bool]]:
    """Return (images to keep, keep mask) under ``policy``; blackout zeroes flagged images as diffusers does."""
    if policy not in POLICIES:
        raise ValueError(f"safety_policy must be one of {POLICIES}, got {policy!r}")
    if policy == "blackout" and any(flags):
        images = images.copy()
        images[np.asarray(flags, dtype=bool)] = 0
    keep = [not (policy == "drop" and f) for f in flags]
    return images, keep


def tiny_safety_checker(seed: int = 0, image_size: int = 32):
    """A tiny randomly initialised ``StableDiffusionSafetyChecker`` (CLIP vision, hidden size 32) and a
    matching feature extractor: the offline stand-in for SD v1's checker, same class and same code path."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=100, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=8),
        projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        checker = StableDiffusionSafetyChecker(config).eval()
        # real checkers hold distinct concept embeddings; random ones make the tiny checker's cosines vary
        checker.concept_embeds.data = torch.randn_like(checker.concept_embeds)
        checker.special_care_embeds.data = torch.randn_like(checker.special_care_embeds)
    extractor = _image_processor_class()(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    return checker, extractor


def save_tiny_safety_checker(model_dir: str | Path, concept_threshold: float | None = None,
                             special_threshold: float | None = None, seed: int = 0) -> Path:
    """Add a tiny checker to a diffusers model folder (``safety_checker/`` + ``feature_extractor/``,
    safetensors) and register it in ``model_index.json``. Thresholds, when given, set every concept's
    (resp. special-care concept's) threshold: -2 flags every image, 2 none (cosines lie in [-1, 1])."""
    import json

    model_dir = Path(model_dir)
    checker, extractor = tiny_safety_checker(seed)
    if concept_threshold is not None:
        checker.concept_embeds_weights.data.fill_(concept_threshold)
    if special_threshold is not None:
        checker.special_care_embeds_weights.data.fill_(special_threshold)
    checker.save_pretrained(model_dir / "safety_checker", safe_serialization=True)
    extractor.save_pretrained(model_dir / "feature_extractor")
    index_path = model_dir / "model_index.json"
    index = json.loads(index_path.read_text())
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return model_dir

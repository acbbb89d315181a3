"""The Stable Diffusion safety checker (the SD v1 model cards' intended-use filter) and its policies.

The checker is diffusers' ``StableDiffusionSafetyChecker`` (a CLIP vision tower + projection compared by
cosine similarity against 17 concept and 3 special-care embeddings, each with a threshold) with its CLIP
image preprocessing (the "feature extractor"). Which one runs is the spec's ``safety_checker``
(:func:`batch.models.weights.locate_safety_checker` finds it; :func:`batch.models.load.load_model` loads
it for every task and model):

* ``model`` (default): the model's own, when its folder ships ``safety_checker/`` + ``feature_extractor/``
  (SD v1-x); none otherwise (SD 2.x, the ``tiny`` preset);
* ``none``: no checker;
* a hub id or local folder holding one, e.g. ``CompVis/stable-diffusion-safety-checker`` (the standalone
  SD v1 checker) to check SD 2.1's outputs, which ships none.

It runs on every generated image exactly as ``StableDiffusionPipeline.run_safety_checker`` does: uint8
images -> PIL -> feature extractor -> checker -> one boolean per image. The spec's ``safety_policy`` then
decides:

* ``flag`` (default): keep the image, record ``nsfw = true`` in its metadata row;
* ``blackout``: replace the image by black pixels, as diffusers' pipeline does, and record ``nsfw = true``;
* ``drop``: write no image; the row is ``failed`` with error ``nsfw: ...``.

Without a checker metadata records ``nsfw = null``; with one, ``safety_checker`` and
``safety_checker_revision`` name it. The dry run (``model: none``) loads nothing, no checker either.
Weights load from safetensors only, unless ``allow_pickle``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from batch.models.weights import CheckerLocation, ModelError, check_weights_in

POLICIES = ("flag", "blackout", "drop")


def _image_processor_class():
    try:  # transformers 5: the PIL/numpy backend (the default one needs torchvision)
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil
    except ImportError:  # transformers 4
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor


class SafetyChecker:
    """A loaded checker + feature extractor; ``__call__(images)`` returns one nsfw flag per image."""

    def __init__(self, checker, feature_extractor, device: torch.device, dtype: torch.dtype,
                 source: str | None = None, revision: str | None = None):
        self.checker = checker.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.feature_extractor = feature_extractor
        self.device, self.dtype = device, dtype
        self.source, self.revision = source, revision  # metadata safety_checker / safety_checker_revision

    @classmethod
    def load(cls, where: CheckerLocation, device: torch.device, dtype: torch.dtype,
             allow_pickle: bool = False) -> "SafetyChecker":
        """Load the checker at ``where`` (:func:`batch.models.weights.locate_safety_checker` or
        :func:`~batch.models.weights.model_safety_checker`) onto ``device`` in ``dtype``; safetensors
        unless ``allow_pickle``."""
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

        sc_dir = Path(where.checker_dir)
        check_weights_in(sc_dir, f"safety_checker {where.source} ({sc_dir})", allow_pickle)
        kwargs: dict[str, Any] = {"use_safetensors": None if allow_pickle else True}
        if where.variant and any(f".{where.variant}." in p.name for p in sc_dir.iterdir()):
            kwargs["variant"] = where.variant
        try:
            checker = StableDiffusionSafetyChecker.from_pretrained(sc_dir, **kwargs)
            extractor = _image_processor_class().from_pretrained(Path(where.extractor_dir))
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise ModelError(f"safety_checker {where.source}: cannot load it as a StableDiffusionSafetyChecker "
                             f"with a CLIP image processor: {type(err).__name__}: {err}") from None
        return cls(checker, extractor, device, dtype, where.source, where.revision)

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


def _tiny_with_thresholds(concept_threshold: float | None, special_threshold: float | None, seed: int):
    checker, extractor = tiny_safety_checker(seed)
    if concept_threshold is not None:
        checker.concept_embeds_weights.data.fill_(concept_threshold)
    if special_threshold is not None:
        checker.special_care_embeds_weights.data.fill_(special_threshold)
    return checker, extractor


def save_tiny_safety_checker(model_dir: str | Path, concept_threshold: float | None = None,
                             special_threshold: float | None = None, seed: int = 0) -> Path:
    """Add a tiny checker to a diffusers model folder (``safety_checker/`` + ``feature_extractor/``,
    safetensors) and register it in ``model_index.json``. Thresholds, when given, set every concept's
    (resp. special-care concept's) threshold: -2 flags every image, 2 none (cosines lie in [-1, 1])."""
    import json

    model_dir = Path(model_dir)
    checker, extractor = _tiny_with_thresholds(concept_threshold, special_threshold, seed)
    checker.save_pretrained(model_dir / "safety_checker", safe_serialization=True)
    extractor.save_pretrained(model_dir / "feature_extractor")
    index_path = model_dir / "model_index.json"
    index = json.loads(index_path.read_text())
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return model_dir


def save_tiny_standalone_checker(directory: str | Path, concept_threshold: float | None = None,
                                 special_threshold: float | None = None, seed: int = 0) -> Path:
    """Write a tiny checker in the standalone layout of ``CompVis/stable-diffusion-safety-checker``:
    ``config.json`` + ``model.safetensors`` + ``preprocessor_config.json`` at the folder's root (the spec's
    ``safety_checker: <folder>``). Thresholds as :func:`save_tiny_safety_checker`."""
    directory = Path(directory)
    checker, extractor = _tiny_with_thresholds(concept_threshold, special_threshold, seed)
    checker.save_pretrained(directory, safe_serialization=True)
    extractor.save_pretrained(directory)
    return directory

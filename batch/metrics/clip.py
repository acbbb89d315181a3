"""CLIP score: how well an image matches its prompt, per image ``100 * max(cos(E_image, E_text), 0)``.

This is the CLIP score of Hessel et al. 2021 ("CLIPScore", with w = 100 as in the diffusion model cards and
torchmetrics): the cosine of the projected CLIP image and text embeddings, clipped at 0, times 100. The model is
transformers' ``CLIPModel`` (default :data:`DEFAULT_CLIP`, ViT-L/14 as in SD's model cards), images go through
the model's own ``CLIPImageProcessor`` (shortest side resized bicubic to 224, centre crop, CLIP mean/std), and
prompts are tokenised with the model's tokenizer, truncated to 77 tokens (CLIP's context length).

Embeddings are computed from the vision/text towers and projections directly (``pooler_output`` then
``visual_projection``/``text_projection``), which is what ``get_image_features``/``get_text_features`` compute,
independently of how the installed transformers wraps their return value.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
MAX_TOKENS = 77


def clip_image_processor_class():
    """transformers' PIL-based CLIP image processor (the default one needs torchvision, unusable here)."""
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


class ClipScorer:
    """One loaded CLIP model; ``__init__`` loads (local folder or hub id via the HF cache), methods embed/score."""

    def __init__(self, model: str = DEFAULT_CLIP, revision: str | None = None, device: str = "cpu",
                 dtype: torch.dtype = torch.float32):
        import os

        from transformers import AutoTokenizer, CLIPModel

        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        kw = dict(revision=revision, local_files_only=offline)
        self.model = CLIPModel.from_pretrained(model, use_safetensors=True, dtype=dtype, **kw).to(device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(model, **kw)
        self.processor = clip_image_processor_class().from_pretrained(model, **kw)
        self.device, self.dtype, self.name = torch.device(device), dtype, model

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(N, D) unit-norm image embeddings of (H, W, 3) uint8 images."""
        pixels = self.processor(images=[np.asarray(i) for i in images], return_tensors="pt")["pixel_values"]
        pooled = self.model.vision_model(pixel_values=pixels.to(self.device, self.dtype)).pooler_output
        emb = self.model.visual_projection(pooled).float()
        return emb / emb.norm(dim=-1, keepdim=True)

    def tokenize(self, prompts: Sequence[str]) -> dict:
        """Token ids padded and truncated to 77 (longer prompts lose their tail, as in CLIP)."""
        return self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_TOKENS,
                              return_tensors="pt")

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """(N, D) unit-norm text embeddings."""
        tok = self.tokenize(prompts)
        out = self.model.text_model(input_ids=tok["input_ids"].to(self.device),
                                    attention_mask=tok["attention_mask"].to(self.device))
        emb = self.model.text_projection(out.pooler_output).float()
        return emb / emb.norm(dim=-1, keepdim=True)

    def scores(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> np.ndarray:
        """Per-image CLIP scores (float64, in [0, 100])."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if not len(images):
            return np.zeros(0)
        return score_from_embeddings(self.image_embeddings(images), self.text_embeddings(prompts))


def score_from_embeddings(image_emb, text_emb) -> np.ndarray:
    """``100 * max(cos, 0)`` row by row (embeddings need not be normalised)."""
    a = torch.as_tensor(image_emb, dtype=torch.float64)
    b = torch.as_tensor(text_emb, dtype=torch.float64)
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    return (100.0 * cos.clamp(min=0)).numpy()


def clip_score(images: Sequence[np.ndarray], prompts: Sequence[str], model: str | ClipScorer = DEFAULT_CLIP,
               device: str = "cpu") -> np.ndarray:
    """Per-image CLIP score ``100 * max(cos(image_emb, text_emb), 0)`` of (H, W, 3) uint8 images and their
    prompts (truncated to 77 tokens). ``model``: a :class:`ClipScorer` or a model folder / hub id to load."""
    scorer = model if isinstance(model, ClipScorer) else ClipScorer(model, device=device)
    return scorer.scores(images, prompts)

"""Random-weight metric networks for offline tests and the demo (no weights can be downloaded here).

* :func:`save_random_inception`: the real FID Inception architecture with Kaiming-initialised convolutions,
  saved as a plain state dict (``torch.save``), the same format as ``pt_inception-2015-12-05-6726825d.pth``,
  so the real loading code reads it.
* :func:`save_tiny_clip`: a small ``CLIPModel`` (32-px images, 2 layers) with the byte-level tokenizer of
  :mod:`batch.models.tiny` and a ``CLIPImageProcessor`` for 32-px crops, saved with ``save_pretrained``.

Their scores mean nothing; they exercise every code path with real models.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_CLIP_IMAGE = 32


def save_random_inception(path: str | Path, seed: int = 0) -> Path:
    from batch.metrics.inception import random_inception

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_inception(seed).state_dict(), path)
    return path


def tiny_clip(seed: int = 0):
    """(model, tokenizer, image processor) of a tiny random CLIP."""
    from transformers import CLIPConfig, CLIPModel

    from batch.metrics.clip import clip_image_processor_class
    from batch.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(image_size=TINY_CLIP_IMAGE, patch_size=8, hidden_size=32, intermediate_size=37,
                  num_hidden_layers=2, num_attention_heads=4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    proc = clip_image_processor_class()(size={"shortest_edge": TINY_CLIP_IMAGE},
                              crop_size={"height": TINY_CLIP_IMAGE, "width": TINY_CLIP_IMAGE})
    return model, tok, proc


def save_tiny_clip(directory: str | Path, seed: int = 0) -> Path:
    directory = Path(directory)
    model, tok, proc = tiny_clip(seed)
    model.save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
    proc.save_pretrained(directory)
    return directory

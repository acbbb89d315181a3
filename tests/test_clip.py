"""CLIP score against a direct cosine computation through CLIPModel's own forward, clipping, truncation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batch.metrics import clip_score
from batch.metrics.clip import MAX_TOKENS, ClipScorer, score_from_embeddings
from batch.metrics.tiny import save_tiny_clip


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    return str(save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip"))


@pytest.fixture(scope="module")
def scorer(tiny_clip_dir):
    return ClipScorer(tiny_clip_dir)


def images(n, seed=0, size=40):
    return [np.random.default_rng(seed + i).integers(0, 256, (size, size + 8, 3), dtype=np.uint8) for i in range(n)]


def test_scores_equal_direct_cosine_from_the_model_forward(scorer, tiny_clip_dir):
    imgs, prompts = images(4), ["a red cube", "a dog on a beach", "zzz", "an astronaut riding a horse"]
    got = clip_score(imgs, prompts, model=tiny_clip_dir)
    # independent path: CLIPModel.forward's logits_per_image = exp(logit_scale) * cos(image_emb, text_emb)
    tok = scorer.tokenizer(prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    pix = scorer.processor(images=imgs, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = scorer.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=pix)
        cos = (out.logits_per_image.diagonal() / scorer.model.logit_scale.exp()).double().numpy()
    assert got.shape == (4,)
    np.testing.assert_allclose(got, 100 * np.clip(cos, 0, None), rtol=1e-5, atol=1e-4)
    assert (got >= 0).all() and (got <= 100).all()
    np.testing.assert_allclose(scorer.scores(imgs, prompts), got, rtol=1e-6)  # loaded scorer == by name


def test_negative_cosine_is_clipped_to_zero():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    b = np.array([[-1.0, 0.1], [1.0, 1.0], [0.0, 1.0]])
    np.testing.assert_allclose(score_from_embeddings(a, b), [0.0, 100.0, 100.0])


def test_prompts_truncate_to_77_tokens(scorer):
    long = "a very long prompt " * 40  # byte-level tokenizer: far beyond 77 tokens
    tok = scorer.tokenize([long, "short"])
    assert tok["input_ids"].shape == (2, MAX_TOKENS)
    img = images(1, seed=5)
    # everything past the 77th token is ignored
    assert scorer.scores(img, [long])[0] == pytest.approx(scorer.scores(img, [long + " and then a cat"])[0], abs=1e-9)


def test_mismatched_lengths_raise(scorer):
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        scorer.scores(images(2), ["x"])


def test_prompts_over_77_tokens_keep_the_end_of_text_token(scorer):
    """Truncation keeps EOT at position 76 (as OpenAI ``clip.tokenize(truncate=True)``; torchmetrics drops it):
    the text embedding is pooled at EOT, so a truncated prompt is still read through its end token."""
    tok = scorer.tokenize(["a very long prompt " * 40])
    ids = tok["input_ids"][0].tolist()
    assert ids[-1] == scorer.tokenizer.eos_token_id and ids[0] == scorer.tokenizer.bos_token_id


@pytest.mark.parametrize("n,n_boot", [(200, 1000), (1000, 1000), pytest.param(10_000, 300, marks=pytest.mark.slow)])
def test_clip_bootstrap_interval_covers_the_population_mean(n, n_boot):
    """Coverage of the CLIP-score interval (percentile bootstrap of a mean, nominal 95%): 100 trials of N
    per-image scores from a skewed distribution with a known mean (15 + Gamma(2, 3): mean 21); at least 90
    intervals contain it."""
    from batch.metrics.fid import bootstrap_mean

    rng = np.random.default_rng(n)
    hits = 0
    for trial in range(100):
        v = 15 + rng.gamma(2.0, 3.0, n)
        lo, hi = bootstrap_mean(v, n_boot, seed=trial)
        hits += lo <= 21.0 <= hi
    assert hits >= 90, f"{hits} of 100 intervals contain the mean"

"""The metric settings of an evaluation: FID, CLIP score, and the feature stage's compute (``StatsSpec``).

``sdbatch fid-stats`` needs only these; the evaluation spec (``batch.eval.spec.EvalSpec``) extends them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from batch.metrics.clip import DEFAULT_CLIP
from batch.metrics.inception import FID_WEIGHTS_URL
from batch.spec.base import _Strict


class FidSettings(_Strict):
    weights: str = FID_WEIGHTS_URL  # path or http(s) URL of pt_inception-2015-12-05-6726825d.pth
    reference_size: int = Field(512, ge=8)  # reference images: centre crop, bicubic to this side
    stats_cache: str | None = None  # where reference statistics are cached; null: ~/.cache/sdbatch/fid-stats
    bootstrap: int = Field(50, ge=0)  # resamples for the FID interval (each costs two 2048x2048 eigen-solves)


class ClipSettings(_Strict):
    model: str = DEFAULT_CLIP
    revision: str | None = None
    bootstrap: int = Field(1000, ge=0)  # resamples for the CLIP-score interval


class FeatureSettings(_Strict):
    """Compute for the feature stage (same meaning as the job spec's fields)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    actors: int | Literal["auto"] = "auto"
    gpus_per_actor: float | None = Field(None, ge=0)
    cpus_per_actor: float | None = Field(None, gt=0)
    batch_size: int = Field(32, ge=1)  # images per network call
    rows_per_block: int = Field(256, ge=1)  # images per Ray block


class StatsSpec(_Strict):
    """What ``sdbatch fid-stats`` needs: the FID settings, the feature stage's compute, storage."""

    fid: FidSettings = Field(default_factory=FidSettings)
    features: FeatureSettings = Field(default_factory=FeatureSettings)
    storage_options: dict[str, Any] = Field(default_factory=dict)
    ray_address: str | None = None
    progress: bool = True

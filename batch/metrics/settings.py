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
    # resize path into the network (clean-fid's names): pytorch-fid's bilinear without antialias, or PIL bicubic
    resize: Literal["legacy_pytorch", "clean"] = "legacy_pytorch"
    stats_cache: str | None = None  # where reference statistics are cached; null: ~/.cache/sdbatch/fid-stats
    jackknife_blocks: int = Field(20, ge=0)  # groups of the FID jackknife interval (0: no interval)


class KidSettings(_Strict):
    """Kernel Inception Distance (torch-fidelity's defaults: 100 subsets of 1000; smaller sets lower m)."""

    subsets: int = Field(100, ge=0)  # 0: no KID
    subset_size: int = Field(1000, ge=2)


class ClipSettings(_Strict):
    model: str = DEFAULT_CLIP
    revision: str | None = None
    bootstrap: int = Field(1000, ge=0)  # resamples for the CLIP-score interval (percentile bootstrap of a mean)


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

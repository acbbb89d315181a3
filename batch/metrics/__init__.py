"""Image-generation metrics: FID (:mod:`batch.metrics.fid`, :mod:`batch.metrics.inception`) and CLIP score
(:mod:`batch.metrics.clip`). Pure computations; the Ray stage that runs them lives in
:mod:`batch.metrics.extract` and is wired in :mod:`batch.run.pipeline`."""

from batch.metrics.clip import clip_score
from batch.metrics.fid import frechet_distance

__all__ = ["clip_score", "frechet_distance"]

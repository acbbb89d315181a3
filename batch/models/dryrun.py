"""The dry-run "model" (``model: none``): no weights, no torch modules, only the identity a metadata row records.

:func:`batch.models.load.load_model` returns a :class:`DryRunModel` for ``model: none``; the sampler stage
then makes each image with :func:`batch.sampling.dryrun.dry_run_image` (seeded noise tiles) instead of
diffusion. Metadata rows say so: ``model`` ``none``, ``model_revision`` :data:`DRY_RUN_REVISION` (bumped
whenever the dry-run pixels change), ``prediction_type``/``scheduler_class``/``dtype`` ``none``,
``device`` ``cpu`` (the pixels are made on the actor's CPU even when the actor holds GPUs: the pool keeps
the spec's shape, see README "Dry run").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DRY_RUN_MODEL = "none"
DRY_RUN_REVISION = "dryrun-1"  # the pixel recipe's version (batch.sampling.dryrun)


@dataclass
class DryRunModel:
    """What the sampler stage reads from a model, for a run that loads none (see the module docstring)."""

    task: str = "txt2img"
    model_id: str = DRY_RUN_MODEL
    revision: str = DRY_RUN_REVISION
    device: str = "cpu"
    dtype: str = "none"
    prediction_type: str = "none"
    scheduler_config: Any = None
    safety_checker: Any = None
    max_noise_level: int | None = None  # upscale rows: the schema's limit (350) applies
    tokenizer: Any = None
    dry_run: bool = True

    @property
    def default_scheduler(self) -> str:
        """Rows asking for the model's own scheduler keep ``model``: there is no model to resolve it against."""
        return "model"

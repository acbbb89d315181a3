"""Model loading and the scheduler registry.

A spec's ``model`` is one of:

* ``tiny``: the built-in tiny random-weight model (``batch.models.tiny``), built in-process, deterministically;
* ``none``: the dry run, no weights at all (``batch.models.dryrun``: seeded noise images through the same pipeline);
* a local diffusers folder (has ``model_index.json``), e.g. one written by ``sdbatch make-tiny-model``;
* a hub id ``org/name`` (optionally ``revision``), resolved through ``huggingface_hub.snapshot_download``,
  which honours ``HF_HOME``/``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE=1``; the resolved commit is recorded.

Weights load with safetensors only; pickled ``.bin``/``.ckpt`` weights are refused unless the spec sets
``allow_pickle: true`` (unpickling can run arbitrary code). The spec's ``safety_checker`` (the model's own, none,
or a hub id / folder: :func:`batch.models.weights.checker_for`) is loaded with every task's model, the
``tiny`` preset included; the dry run loads none. The prediction type (``epsilon`` for SD1.x,
``v_prediction`` for SD2.x) is read from the model's scheduler config and kept by every scheduler built
from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from batch.models.dryrun import DryRunModel
from batch.models.tiny import TINY_REVISION
from batch.models.weights import (COMPONENTS, IMAGE_TASK_COMPONENTS, SAFETY_MODEL, SCHEDULER_NAME_FOR_CLASS,
                                  ModelError, checker_for, locate)
from batch.tasks import TASKS


# name -> (diffusers class, config overrides). PLMS is PNDM without the Runge-Kutta warm-up steps.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "pndm": ("PNDMScheduler", {}),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "lms": ("LMSDiscreteScheduler", {}),
}
_NAME_FOR_CLASS = SCHEDULER_NAME_FOR_CLASS


@dataclass
class LoadedModel:
    """Everything the sampler needs, plus the identity recorded in every metadata row."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict[str, Any]  # the model's own scheduler config (with "_class_name")
    model_id: str
    revision: str
    device: torch.device
    dtype: torch.dtype
    # Image tasks (None for txt2img): see load_model(task=...).
    task: str = "txt2img"
    image_encoder: Any = None  # variation: CLIPVisionModelWithProjection
    feature_extractor: Any = None  # variation: CLIPImageProcessor (the "pipeline" preprocessing)
    low_res_scheduler: Any = None  # upscale: DDPM schedule that noises the low-res input
    max_noise_level: int | None = None  # upscale: largest accepted noise_level (350 for the x4 model)
    safety_checker: Any = None  # batch.models.safety.SafetyChecker (spec safety_checker), or None
    dry_run: bool = False  # True only for batch.models.dryrun.DryRunModel (model: none)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def default_scheduler(self) -> str:
        """Our name for the model's own scheduler (``pndm`` for SD v1-4, ``ddim``/``euler`` for others)."""
        cls = self.scheduler_config.get("_class_name", "")
        if cls not in _NAME_FOR_CLASS:
            raise ModelError(f"model scheduler {cls!r} has no sdbatch name; choose one of {list(SCHEDULERS)}")
        return _NAME_FOR_CLASS[cls]


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """``auto`` is float16 on cuda and float32 on cpu (fp16 matmuls are slow or missing on CPUs)."""
    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def make_scheduler(name: str, model_config: dict[str, Any]):
    """A fresh scheduler (schedulers are stateful) of kind ``name`` built from the model's config."""
    import diffusers

    if name not in SCHEDULERS:
        raise ModelError(f"scheduler must be one of {list(SCHEDULERS)}, got {name!r}")
    cls_name, overrides = SCHEDULERS[name]
    cls = getattr(diffusers, cls_name)
    return cls.from_config({**dict(model_config), **overrides})


def scheduler_class_name(name: str) -> str:
    return SCHEDULERS[name][0]


def load_model(model: str, *, revision: str | None = None, dtype: str = "auto", device: str = "cpu",
               allow_pickle: bool = False, variant: str | None = None,
               task: str = "txt2img", safety_checker: str = SAFETY_MODEL,
               safety_checker_revision: str | None = None) -> LoadedModel | DryRunModel:
    """Load the components of ``task`` onto ``device`` in ``dtype`` (eval mode, no grad).

    The task (``batch.tasks.TASKS``) names the diffusers pipeline class the weights load with and the
    weighted components: ``txt2img`` unet, vae, text_encoder, tokenizer (``StableDiffusionPipeline``);
    ``variation`` unet, vae, image_encoder, feature_extractor (``StableDiffusionImageVariationPipeline``);
    ``upscale`` unet, vae, text_encoder, tokenizer, low_res_scheduler, max_noise_level
    (``StableDiffusionUpscalePipeline``). ``model: tiny`` is the tiny preset of ``task``; ``model: none``
    loads nothing and returns a :class:`~batch.models.dryrun.DryRunModel` (the dry run).

    ``safety_checker`` / ``safety_checker_revision`` (the spec's fields) choose the checker loaded alongside,
    on the same device and dtype: ``model`` the model folder's own if it ships one, ``none`` no checker, or
    a hub id / local folder (:func:`batch.models.weights.checker_for`). The dry run loads no checker.
    """
    if task not in TASKS:
        raise ModelError(f"task must be one of {list(TASKS)}, got {task!r}")
    spec = TASKS[task]
    kind, folder, resolved = locate(model, revision, allow_pickle, variant)
    if kind == "none":
        return DryRunModel(task=task)
    torch_dtype = resolve_dtype(dtype, device)
    weighted = spec.model.weight_components
    if kind == "tiny":
        comps = spec.model.tiny_components("epsilon")
    else:
        import diffusers

        cls_name = spec.model.pipeline_class
        try:
            pipe = getattr(diffusers, cls_name).from_pretrained(
                folder,
                torch_dtype=torch_dtype,
                use_safetensors=None if allow_pickle else True,
                variant=variant,
                safety_checker=None,
                local_files_only=True,
                **spec.model.pipeline_kwargs,
            )
        except (OSError, ValueError, TypeError) as err:
            raise ModelError(f"model {model} ({folder}, variant {variant}): cannot load as {cls_name}: {err}") from None
        comps = {c: getattr(pipe, c, None) for c in COMPONENTS + IMAGE_TASK_COMPONENTS}
        comps["max_noise_level"] = getattr(pipe.config, "max_noise_level", None) if task == "upscale" else None
        missing = [c for c in weighted if comps.get(c) is None]
        if missing:
            raise ModelError(f"model {model} ({folder}): no {missing} component(s) for task {task}")
    dev = torch.device(device)
    for name in weighted:
        module = comps[name]
        if kind == "tiny" and torch_dtype != torch.float32:  # from_pretrained already applied torch_dtype
            module = module.to(dtype=torch_dtype)
        comps[name] = module.to(device=dev).eval().requires_grad_(False)
    if task == "upscale" and torch_dtype == torch.float16 and getattr(comps["vae"].config, "force_upcast", False):
        # the x4 VAE overflows in float16: diffusers' upscale pipeline decodes it in float32 ("upcast_vae")
        comps["vae"] = comps["vae"].to(dtype=torch.float32)
    safety = None
    where = checker_for(safety_checker, safety_checker_revision, allow_pickle, folder, model, resolved, variant)
    if where is not None:
        from batch.models.safety import SafetyChecker

        safety = SafetyChecker.load(where, dev, torch_dtype, allow_pickle)
    sched_config = dict(comps["scheduler"].config)
    sched_config["_class_name"] = type(comps["scheduler"]).__name__
    return LoadedModel(
        unet=comps["unet"], vae=comps["vae"], text_encoder=comps.get("text_encoder"),
        tokenizer=comps.get("tokenizer"),
        scheduler_config=json.loads(json.dumps(sched_config, default=str)), model_id=model, revision=resolved,
        device=dev, dtype=torch_dtype, task=task, image_encoder=comps.get("image_encoder"),
        feature_extractor=comps.get("feature_extractor"), low_res_scheduler=comps.get("low_res_scheduler"),
        max_noise_level=comps.get("max_noise_level"),
        safety_checker=safety,
    )


def save_tiny_model(directory: str | Path, task: str = "txt2img", prediction_type: str = "epsilon") -> Path:
    """Write the tiny model of ``task`` as a standard diffusers folder (model_index.json + safetensors).

    It loads with the task's pipeline class (``StableDiffusionPipeline``, ``StableDiffusionImageVariationPipeline``,
    ``StableDiffusionUpscalePipeline``); ``prediction_type`` applies to txt2img (the upscaler is
    v-prediction and the variation model epsilon, as the real ones).
    """
    import diffusers

    if task not in TASKS:
        raise ValueError(f"task: must be one of {list(TASKS)}, got {task!r}")
    layout = TASKS[task].model
    pipe = getattr(diffusers, layout.pipeline_class)(**layout.tiny_components(prediction_type), safety_checker=None,
                                                     **layout.pipeline_kwargs)
    directory = Path(directory)
    pipe.save_pretrained(directory, safe_serialization=True)
    (directory / "sdbatch_tiny.json").write_text(
        json.dumps({"revision": TINY_REVISION, "task": task,
                    "prediction_type": pipe.scheduler.config.prediction_type}) + "\n"
    )
    return directory

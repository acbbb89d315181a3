"""Where a model's weights are and whether they may be loaded: ``tiny``, ``none``, a local folder or a hub id.

Weights load with safetensors only; a component folder with only pickled ``.bin``/``.ckpt`` weights is
refused unless the spec sets ``allow_pickle: true`` (unpickling can run arbitrary code). Hub ids resolve
through ``huggingface_hub.snapshot_download`` (honouring ``HF_HUB_OFFLINE``), downloading only the
components and weight variant asked for; the resolved commit (or a local folder's fingerprint) is the
``model_revision`` recorded in every metadata row.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from batch.models.dryrun import DRY_RUN_MODEL, DRY_RUN_REVISION
from batch.models.tiny import TINY_REVISION
from batch.tasks import TASKS

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Components of the image tasks (variation: image encoder + CLIP image processor; upscale: low-res schedule).
IMAGE_TASK_COMPONENTS = ("image_encoder", "feature_extractor", "low_res_scheduler")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
# sdbatch's scheduler name of a model's own scheduler class (its scheduler_config.json ``_class_name``)
SCHEDULER_NAME_FOR_CLASS = {"PNDMScheduler": "pndm", "DDIMScheduler": "ddim", "EulerDiscreteScheduler": "euler",
                            "EulerAncestralDiscreteScheduler": "euler_a", "DPMSolverMultistepScheduler": "dpmpp_2m",
                            "LMSDiscreteScheduler": "lms"}


class ModelError(ValueError):
    """The model cannot be located or loaded as asked."""


def locate(model: str, revision: str | None, allow_pickle: bool, variant: str | None = None,
           resolve_hub: bool = True) -> tuple[str, Path | None, str | None]:
    """Return (kind, local folder, resolved revision) for a spec's ``model``; kind is tiny, none, local or hub.

    ``none`` is the dry run (:mod:`batch.models.dryrun`): no weights; its revision is the pixel recipe's.

    With ``resolve_hub=False`` a hub id is only checked for form (no download; folder and revision None).
    """
    if model == "tiny":
        return "tiny", None, TINY_REVISION
    if model == DRY_RUN_MODEL:
        return "none", None, DRY_RUN_REVISION
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ModelError(f"model {model}: folder has no model_index.json (not a diffusers pipeline folder)")
        check_weight_format(path, allow_pickle)
        return "local", path, fingerprint(path)
    if not HUB_ID.match(model):
        raise ModelError(f"model {model!r}: not 'tiny', not an existing folder, and not a hub id like 'org/name'")
    if not resolve_hub:
        return "hub", None, None
    from huggingface_hub import snapshot_download

    # Only the components we load, only the weight variant asked for (SD repos also hold root .ckpt files
    # and both fp32 and fp16 copies of every component).
    suffixes = ["safetensors"] + (["bin", "ckpt"] if allow_pickle else [])
    weights = [f"*.{variant}.{x}" if variant else f"*.{x}" for x in suffixes]
    patterns = ["model_index.json"] + [f"{c}/*.json" for c in COMPONENTS + IMAGE_TASK_COMPONENTS] + ["tokenizer/*.txt"]
    weighted = sorted({c for t in TASKS.values() for c in t.model.weight_components})
    patterns += [f"{c}/{w}" for c in weighted for w in weights]
    patterns += ["safety_checker/*.json"] + [f"safety_checker/{w}" for w in weights]  # feature_extractor: above
    ignore = None if variant else ["*.fp16.*", "*.non_ema.*", "*.ema.*"]
    try:
        folder = Path(snapshot_download(model, revision=revision, allow_patterns=patterns, ignore_patterns=ignore))
    except Exception as err:
        raise ModelError(f"model {model} (revision {revision or 'main'}): cannot resolve from the hub or its "
                         f"cache ({type(err).__name__}: {err})") from None
    check_weight_format(folder, allow_pickle)
    return "hub", folder, folder.name  # snapshot folders are named by the commit hash


def check_weight_format(folder: Path, allow_pickle: bool) -> None:
    """Refuse pickled weights unless allowed: each weighted component must have a .safetensors file.

    The weighted components are those of the folder's task: ``image_encoder`` replaces ``text_encoder``
    when ``model_index.json`` lists one (image variation models have no text encoder)."""
    components = TASKS["txt2img"].model.weight_components
    try:
        index = json.loads((folder / "model_index.json").read_text())
        if isinstance(index, dict) and index.get("image_encoder") and not index.get("text_encoder"):
            components = TASKS["variation"].model.weight_components
    except (OSError, ValueError):
        pass
    for comp in components:
        check_component_weights(folder, comp, allow_pickle)


def check_component_weights(folder: Path, comp: str, allow_pickle: bool) -> None:
    """``folder/comp`` must exist and hold .safetensors weights, or pickled ones where ``allow_pickle``."""
    d = folder / comp
    if not d.is_dir():
        raise ModelError(f"model folder {folder}: missing component folder {comp}/")
    files = [p.name for p in d.iterdir()]
    if any(f.endswith(".safetensors") for f in files):
        return
    pickled = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if not pickled:
        raise ModelError(f"model folder {folder}: {comp}/ has no weights")
    if not allow_pickle:
        raise ModelError(
            f"model folder {folder}: {comp}/ has only pickled weights {pickled}; refusing to unpickle "
            "(it can run arbitrary code). Convert to safetensors, or set allow_pickle: true if you trust it."
        )


def fingerprint(folder: Path) -> str:
    """``local-<sha256[:16]>`` over every config/tokenizer file's bytes and each weight file's size and
    first and last MiB: cheap to compute at actor start, and it changes when a folder's contents do."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        h.update(str(p.relative_to(folder)).encode())
        if p.suffix in (".json", ".txt"):
            h.update(p.read_bytes())
        else:
            size = p.stat().st_size
            h.update(str(size).encode())
            with p.open("rb") as f:
                h.update(f.read(1 << 20))
                f.seek(max(0, size - (1 << 20)))
                h.update(f.read(1 << 20))
    return "local-" + h.hexdigest()[:16]

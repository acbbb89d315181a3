"""Where a model's weights are and whether they may be loaded: ``tiny``, ``none``, a local folder or a hub id.

Weights load with safetensors only; a component folder with only pickled ``.bin``/``.ckpt`` weights is
refused unless the spec sets ``allow_pickle: true`` (unpickling can run arbitrary code). Hub ids resolve
through ``huggingface_hub.snapshot_download`` (honouring ``HF_HUB_OFFLINE``), downloading only the
components and weight variant asked for; the resolved commit (or a local folder's fingerprint) is the
``model_revision`` recorded in every metadata row.

A safety checker (spec ``safety_checker``) is located here too (:func:`locate_safety_checker`): the model's
own (a diffusers folder's ``safety_checker/`` + ``feature_extractor/``), or a hub id / local folder holding
one in either layout (a standalone checker: ``config.json`` + weights + ``preprocessor_config.json`` at its
root, as ``CompVis/stable-diffusion-safety-checker``; or a diffusers model folder). Same safetensors rule.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
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
    check_weights_in(d, f"model folder {folder}: {comp}/", allow_pickle)


def check_weights_in(d: Path, what: str, allow_pickle: bool) -> None:
    """Folder ``d`` (named ``what`` in errors) must hold .safetensors weights, or pickled ones if allowed."""
    files = [p.name for p in d.iterdir()]
    if any(f.endswith(".safetensors") for f in files):
        return
    pickled = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if not pickled:
        raise ModelError(f"{what} has no weights")
    if not allow_pickle:
        raise ModelError(
            f"{what} has only pickled weights {pickled}; refusing to unpickle "
            "(it can run arbitrary code). Convert to safetensors, or set allow_pickle: true if you trust it."
        )


# ---- the safety checker's location ------------------------------------------------------------------------

SAFETY_COMPONENTS = ("safety_checker", "feature_extractor")
SAFETY_MODEL, SAFETY_NONE = "model", "none"  # spec safety_checker: the model's own checker / no checker


@dataclass(frozen=True)
class CheckerLocation:
    """Where a safety checker's weights (``checker_dir``: a ``StableDiffusionSafetyChecker`` config + weights)
    and its CLIP image preprocessing (``extractor_dir``: ``preprocessor_config.json``) are, and its identity
    as metadata records it: ``source`` (the spec's location, or the model id for a model's own checker) and
    ``revision`` (hub commit, ``local-`` fingerprint, or the model's revision)."""

    checker_dir: Path
    extractor_dir: Path
    source: str
    revision: str | None
    variant: str | None = None  # weight variant (a model's own checker follows the model's ``variant``)


def ships_safety_checker(folder: Path | None) -> bool:
    """True when a diffusers model folder ships its own checker: ``safety_checker/`` + ``feature_extractor/``."""
    return folder is not None and all((Path(folder) / c).is_dir() for c in SAFETY_COMPONENTS)


def checker_layout(folder: Path) -> tuple[Path, Path] | None:
    """(checker folder, feature extractor folder) of ``folder`` in either layout, or None if it holds neither:
    a diffusers model folder (``safety_checker/`` + ``feature_extractor/``) or a standalone checker
    (``config.json`` + ``preprocessor_config.json`` at its root)."""
    folder = Path(folder)
    if ships_safety_checker(folder):
        return folder / "safety_checker", folder / "feature_extractor"
    if (folder / "config.json").is_file() and (folder / "preprocessor_config.json").is_file():
        return folder, folder
    return None


def model_safety_checker(folder: Path | None, model: str, revision: str | None,
                         variant: str | None = None) -> CheckerLocation | None:
    """The checker a model folder ships (``safety_checker/`` + ``feature_extractor/``), or None."""
    if not ships_safety_checker(folder):
        return None
    return CheckerLocation(Path(folder) / "safety_checker", Path(folder) / "feature_extractor", model, revision,
                           variant)


def checker_for(setting: str, revision: str | None, allow_pickle: bool, model_folder: Path | None, model: str,
                model_revision: str | None, variant: str | None = None) -> CheckerLocation | None:
    """The checker the spec's ``safety_checker`` (``setting``) selects for a located model: ``model`` its own
    (:func:`model_safety_checker`; none for ``tiny`` or a folder without one), ``none`` None, else
    :func:`locate_safety_checker` (``revision``: ``safety_checker_revision``)."""
    if setting == SAFETY_NONE:
        return None
    if setting == SAFETY_MODEL:
        return model_safety_checker(model_folder, model, model_revision, variant)
    return locate_safety_checker(setting, revision, allow_pickle)


def locate_safety_checker(location: str, revision: str | None, allow_pickle: bool,
                          resolve_hub: bool = True) -> CheckerLocation | None:
    """Locate the checker the spec's ``safety_checker`` names: a local folder or a hub id (``revision``:
    the spec's ``safety_checker_revision``), in either :func:`checker_layout`. Raises :class:`ModelError`
    naming the field when the location holds no checker or only pickled weights (unless ``allow_pickle``).
    With ``resolve_hub=False`` a hub id is only checked for form (returns None)."""
    what = f"safety_checker {location}"
    if location in (SAFETY_MODEL, SAFETY_NONE):
        raise ModelError(f"safety_checker: {location!r} names no location (the loader handles it)")
    path = Path(location).expanduser()
    if path.exists():
        if revision is not None:
            raise ModelError(f"safety_checker_revision: {revision!r} applies to hub ids; {location} is a local folder")
        return _checker_in(path, what, allow_pickle, location, None)
    if not HUB_ID.match(location):
        raise ModelError(f"safety_checker: {location!r} is not 'model', 'none', an existing folder, or a hub id "
                         "like 'org/name'")
    if not resolve_hub:
        return None
    from huggingface_hub import snapshot_download

    # Both layouts' files and nothing else (a diffusers repo named here must not download its UNet).
    weights = ["model*.safetensors", "model.safetensors.index.json"]
    if allow_pickle:
        weights += ["pytorch_model*.bin", "pytorch_model.bin.index.json"]
    patterns = ["config.json", "preprocessor_config.json", "model_index.json", *weights,
                "safety_checker/config.json", *[f"safety_checker/{w}" for w in weights],
                "feature_extractor/preprocessor_config.json"]
    try:
        folder = Path(snapshot_download(location, revision=revision, allow_patterns=patterns,
                                        ignore_patterns=["*.fp16.*"]))
    except Exception as err:
        raise ModelError(f"{what} (safety_checker_revision {revision or 'main'}): cannot resolve from the hub or "
                         f"its cache ({type(err).__name__}: {err})") from None
    return _checker_in(folder, what, allow_pickle, location, folder.name)  # snapshot folders: the commit hash


def _checker_in(folder: Path, what: str, allow_pickle: bool, source: str, revision: str | None) -> CheckerLocation:
    layout = checker_layout(folder)
    if layout is None:
        raise ModelError(f"{what}: no safety checker there (expected config.json + weights + "
                         "preprocessor_config.json at its root, or safety_checker/ + feature_extractor/ folders)")
    checker_dir, extractor_dir = layout
    check_weights_in(checker_dir, what if checker_dir == folder else f"{what}: safety_checker/", allow_pickle)
    if revision is None:  # a local folder: known by its checker's contents
        revision = fingerprint(folder, only=None if checker_dir == folder else SAFETY_COMPONENTS)
    return CheckerLocation(checker_dir, extractor_dir, source, revision)


def fingerprint(folder: Path, only: tuple[str, ...] | None = None) -> str:
    """``local-<sha256[:16]>`` over every config/tokenizer file's bytes and each weight file's size and
    first and last MiB: cheap to compute at actor start, and it changes when a folder's contents do.
    ``only``: just these subfolders (a checker inside a model folder)."""
    h = hashlib.sha256()
    roots = [folder] if only is None else [folder / o for o in only]
    for p in sorted(p for root in roots for p in root.rglob("*")):
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

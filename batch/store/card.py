"""The dataset card: ``README.md`` under a run's output prefix, written when the run finishes.

A Hugging Face style dataset card (YAML front matter, then markdown; https://huggingface.co/docs/hub/datasets-cards):
the model and its revision, the licence its model card names, the generation parameters, the counts and
the failure summary of the run, and how to load the outputs with Ray Data, Hugging Face ``datasets`` and
``webdataset``. :func:`dataset_card` is a pure function of the run record (whose spec is already redacted:
no storage secrets reach the card), the summary and the licence; :func:`write_dataset_card` gathers those
and writes the card.

Licences (:func:`model_license`): the Stable Diffusion models this project names carry the licence their
model cards state (CompVis/stable-diffusion-v1-4 and lambdalabs/sd-image-variations-diffusers: CreativeML
OpenRAIL-M; stabilityai/stable-diffusion-2-1 and stabilityai/stable-diffusion-x4-upscaler: CreativeML Open
RAIL++-M); a local model folder's ``README.md`` front matter ``license:`` is read when present; the tiny
preset has random weights and no licence; anything else is "unknown: see the model card".
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batch.store.io import Output

log = logging.getLogger(__name__)

CARD = "README.md"


@dataclass(frozen=True)
class License:
    """A model's licence: its name for people, and the Hugging Face licence identifier for the front matter."""

    name: str
    hf_id: str


OPENRAIL_M = License("CreativeML OpenRAIL-M", "creativeml-openrail-m")
OPENRAIL_PP_M = License("CreativeML Open RAIL++-M", "openrail++")
KNOWN_LICENSES = {
    "CompVis/stable-diffusion-v1-4": OPENRAIL_M,
    "lambdalabs/sd-image-variations-diffusers": OPENRAIL_M,
    "stabilityai/stable-diffusion-2-1": OPENRAIL_PP_M,
    "stabilityai/stable-diffusion-x4-upscaler": OPENRAIL_PP_M,
}
TINY_LICENSE = License("random weights, no licence", "other")
UNKNOWN_LICENSE = License("unknown: see the model card", "unknown")


def front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a markdown file (between the first two ``---`` lines), or {} if none."""
    import yaml

    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    try:
        end = next(i for i in range(1, len(lines)) if lines[i].strip() == "---")
        data = yaml.safe_load("\n".join(lines[1:end]))
    except (StopIteration, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def model_license(model: str, readme: str | None = None) -> License:
    """The licence of ``model`` (a spec's ``model``); ``readme`` is the model folder's ``README.md`` text,
    if it has one (its front matter's ``license:`` is used for models this module does not know)."""
    if model == "tiny":
        return TINY_LICENSE
    if model in KNOWN_LICENSES:
        return KNOWN_LICENSES[model]
    found = front_matter(readme).get("license") if readme else None
    if isinstance(found, str) and found.strip():
        known = {lic.hf_id: lic for lic in KNOWN_LICENSES.values()}
        return known.get(found.strip(), License(found.strip(), found.strip()))
    return UNKNOWN_LICENSE


def _yaml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid YAML scalar, whatever it holds


def _wds_lines(shards: str, image_ext: str) -> list[str]:
    """How the ``webdataset`` library opens the shards: local paths as they are, s3:// through ``pipe:``
    (the library opens local files and pipes; object stores go through a command that streams the object)."""
    tail = f"ds = wds.WebDataset(urls, shardshuffle=False).decode(\"pil\").to_tuple({image_ext!r}, \"json\")"
    if "://" not in shards or shards.startswith("file://"):
        path = shards.removeprefix("file://")
        return ["import glob, webdataset as wds", f"urls = sorted(glob.glob({path + '/*.tar'!r}))", tail]
    return ["import fsspec, webdataset as wds", f"fs, root = fsspec.core.url_to_fs({shards!r})",
            "urls = [f\"pipe:aws s3 cp s3://{p} -\" for p in sorted(fs.glob(root + '/*.tar'))]"
            "  # s3; gs: gsutil cat gs://{p}", tail]


def _loading(output: str, output_format: str, image_ext: str) -> list[str]:
    """The "How to load" section's lines for one output format."""
    meta = f"{output}/metadata"
    lines = ["## How to load", "",
             "Every image (and every failed manifest row) has one metadata row under `metadata/` "
             "(schema: `batch/store/schema.py`):", "", "```python", "import ray",
             f"meta = ray.data.read_parquet({meta!r})", "ok = meta.filter(lambda r: r[\"status\"] == \"ok\")",
             "```", ""]
    if output_format == "files":
        lines += ["Images are one object each under `images/`; the metadata column `uri` names it:", "",
                  "```python", f"images = ray.data.read_images({output + '/images'!r}, include_paths=True)",
                  "```", "", "Hugging Face `datasets` (metadata; images by `uri`):", "", "```python",
                  "from datasets import load_dataset",
                  f"meta = load_dataset(\"parquet\", data_files={meta + '/*.parquet'!r}, split=\"train\")", "```"]
        return lines
    shards = f"{output}/shards"
    if output_format == "webdataset":
        lines += [f"Images are in WebDataset tar shards under `shards/`: per sample `<key>.{image_ext}` (the image), "
                  "`<key>.json` (its generation parameters: prompt, seed, guidance scale, steps, scheduler, model) "
                  "and `<key>.txt` (the prompt). Per-shard counts are under `shards/_stats/` (skipped by the "
                  "readers below).", "",
                  "```python", f"shards = ray.data.read_webdataset({shards!r})  # columns __key__, {image_ext}, json, txt",
                  "```", "", "Hugging Face `datasets`:", "", "```python", "from datasets import load_dataset",
                  f"ds = load_dataset(\"webdataset\", data_files={shards + '/*.tar'!r}, split=\"train\")", "```", "",
                  "`webdataset`:", "", "```python"] + _wds_lines(shards, image_ext) + ["```", "",
                  f"Join to the metadata: a metadata row's `member` is the sample's `__key__ + \".{image_ext}\"` in "
                  "the shard its `uri` names."]
    else:
        lines += [f"Images are in Parquet shards under `shards/`, one row per image: the encoded bytes in column "
                  f"`{image_ext}`, with `key`, `caption` (the prompt), `sha256` and the generation parameters "
                  "(`id`, `image_index`, `prompt`, `negative_prompt`, `seed`, `height`, `width`, `guidance_scale`, "
                  "`num_inference_steps`, `scheduler`, `model`, `model_revision`, `nsfw`). Per-shard counts are "
                  "under `shards/_stats/` (skipped by the readers below).", "",
                  "```python", f"shards = ray.data.read_parquet({shards!r})", "```", "",
                  "Hugging Face `datasets`:", "", "```python", "from datasets import load_dataset",
                  f"ds = load_dataset(\"parquet\", data_files={shards + '/*.parquet'!r}, split=\"train\")", "```", "",
                  "Join to the metadata: a metadata row's `member` is the shard row's `key`."]
    return lines


def _checker_line(record: dict[str, Any]) -> str:
    """Which safety checker gave the metadata's ``nsfw`` (``record["safety_checker"]``, set when the run
    finishes from its metadata), and under which policy."""
    spec = record.get("spec") or {}
    ran = record.get("safety_checker")
    if not ran:
        setting = spec.get("safety_checker", "model")
        why = "the model ships none" if setting == "model" else "turned off" if setting == "none" else "none recorded"
        return f"none ({why}); metadata `nsfw` is null"
    return (f"`{ran.get('location')}` (revision `{ran.get('revision') or 'unknown'}`), policy "
            f"`{spec.get('safety_policy', 'flag')}`; its verdict is metadata `nsfw`")


def dataset_card(record: dict[str, Any], summary: dict[str, Any], licence: License,
                 model_revision: str | None = None) -> str:
    """The dataset card (markdown with YAML front matter) of a run.

    ``record`` is the run record (``run.json``: its ``spec`` is already redacted), ``summary`` the run's
    :class:`batch.run.stats.Summary` as a dict (counts, ``failure_reasons``, ``complete``), ``licence`` the
    model's (:func:`model_license`), ``model_revision`` the revision the images were generated with.
    """
    spec = record.get("spec") or {}
    output = str(spec.get("output") or "OUTPUT").rstrip("/")
    output_format = spec.get("output_format", "files")
    image_format = spec.get("image_format", "png")
    image_ext = {"png": "png", "webp": "webp", "jpeg": "jpg"}.get(image_format, image_format)
    data_files = {"files": "metadata/*.parquet", "webdataset": "shards/*.tar",
                  "parquet": "shards/*.parquet"}.get(output_format, "metadata/*.parquet")
    model = spec.get("model", "?")
    lines = ["---", f"license: {_yaml_str(licence.hf_id)}"]
    if licence.hf_id in ("other", "unknown"):
        lines.append(f"license_name: {_yaml_str(licence.name)}")
    lines += ["tags:", "- sdbatch", "- synthetic", "- text-to-image" if spec.get("task", "txt2img") == "txt2img"
              else f"- {spec.get('task')}", "configs:", "- config_name: default",
              f"  data_files: {_yaml_str(data_files)}", "---", ""]

    lines += [f"# Generated images: run {record.get('run_id', summary.get('run_id', '?'))}", "",
              "Images generated by sdbatch from a Parquet manifest of "
              f"{summary.get('rows', record.get('rows', 0))} rows.", "",
              "## Model", "",
              f"- model: `{model}`", f"- revision: `{model_revision or spec.get('revision') or 'unknown'}`",
              f"- licence (as named by the model card): {licence.name}",
              f"- task: {spec.get('task', 'txt2img')}; dtype: {spec.get('dtype', '?')}",
              f"- safety checker: {_checker_line(record)}", ""]

    defaults = {k: v for k, v in (spec.get("defaults") or {}).items() if k != "task" and v is not None}
    lines += ["## Parameters", "",
              "Per-row values in the manifest override these defaults; every image's own parameters are in its "
              "metadata row (and in its PNG `parameters` text chunk, AUTOMATIC1111's infotext form).", "",
              "| parameter | value |", "|---|---|"]
    for k in sorted(defaults):
        lines.append(f"| `defaults.{k}` | `{json.dumps(defaults[k])}` |")
    for k in ("seed", "batch_size", "output_format", "image_format", "images_per_shard", "safety_policy"):
        if k in spec:
            if spec[k] is not None:
                lines.append(f"| `{k}` | `{json.dumps(spec[k])}` |")
    lines += ["", f"- manifest sha256: `{record.get('manifest_sha256', '?')}`",
              f"- attempts: {len(record.get('attempts') or [])}", ""]

    lines += ["## Counts", "", "| | ok | failed | pending |", "|---|---|---|---|",
              f"| rows | {summary.get('rows_ok', 0)} | {summary.get('rows_failed', 0)} | "
              f"{summary.get('rows', 0) - summary.get('rows_ok', 0) - summary.get('rows_failed', 0)} |",
              f"| images | {summary.get('images_ok', 0)} | {summary.get('images_failed', 0)} | "
              f"{summary.get('images_pending', 0)} |", ""]
    if not summary.get("complete", True):
        lines += ["**Incomplete**: some planned images have no committed record (`_SUCCESS` not written); "
                  "`sdbatch resume` finishes the run and rewrites this card.", ""]
    reasons = sorted((summary.get("failure_reasons") or {}).items(), key=lambda kv: (-kv[1], kv[0]))
    lines += ["## Failures", ""]
    if reasons:
        lines += ["| count | reason |", "|---|---|"]
        lines += [f"| {n} | {reason.replace('|', '/')} |" for reason, n in reasons[:20]]
        if len(reasons) > 20:
            lines.append(f"| {sum(n for _, n in reasons[20:])} | ({len(reasons) - 20} other reasons) |")
        lines += ["", "Each failed row or image has a metadata row with `status == \"failed\"` and its `error`."]
    else:
        lines.append("None.")
    lines.append("")
    lines += _loading(output, output_format, image_ext)
    if len(record.get("attempts") or []) > 1:
        lines += ["", "This run had several attempts: a retried image has one metadata row per attempt. Keep the "
                  "latest (`batch.store.commit.read_metadata(OUTPUT)` does), or run `sdbatch compact OUTPUT` first."]
    return "\n".join(lines) + "\n"


def _model_readme(model: str) -> str | None:
    """The text of a local model folder's README.md, if ``model`` is such a folder and it has one."""
    path = Path(model).expanduser() / "README.md"
    try:
        return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None
    except OSError:
        return None


def generation_identity(out: Output) -> dict[str, str | None]:
    """``model_revision``, ``safety_checker`` and ``safety_checker_revision`` of the first committed metadata
    row that was sampled (has a ``model_revision``); every sampled row of a run has the same ones (run.json's
    identity fields). Reads parts, only these columns, until one has such a row; all None if none has."""
    import io

    import pyarrow.parquet as pq

    from batch.store.commit import metadata_parts

    names = ("model_revision", "safety_checker", "safety_checker_revision")
    for key in metadata_parts(out):
        part = pq.ParquetFile(io.BytesIO(out.get(key)))
        present = [c for c in names if c in part.schema_arrow.names]
        if "model_revision" not in present:
            continue
        rows = part.read(columns=present).to_pylist()
        found = next((r for r in rows if r.get("model_revision")), None)
        if found:
            return {c: found.get(c) for c in names}
    return dict.fromkeys(names)


def write_dataset_card(out: Output, spec: Any, summary: Any, record: dict[str, Any],
                       identity: dict[str, str | None] | None = None) -> str:
    """Write the run's dataset card to ``README.md`` under the output prefix; return its text.

    ``spec`` is the run's :class:`batch.spec.config.JobSpec` (its ``model`` locates a local model card),
    ``summary`` its Summary (or a dict of it), ``record`` the run record (the card shows its redacted spec),
    ``identity`` the run's :func:`generation_identity` when the caller has read it already (else read here).
    """
    summary_dict = summary if isinstance(summary, dict) else dict(summary.__dict__)
    licence = model_license(spec.model, _model_readme(spec.model) if spec.model != "tiny" else None)
    identity = identity if identity is not None else generation_identity(out)
    text = dataset_card(record, summary_dict, licence, identity["model_revision"])
    out.put(CARD, text.encode("utf-8"))
    return text

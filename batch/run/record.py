"""The run record (``run.json``): what a run is (its identity), what made it (versions), secrets redacted.

A later attempt on the same output must agree with the record on every identity field and on the
manifest's contents (:func:`check_same_run`), else it is refused: one output prefix holds one run.
"""

from __future__ import annotations

import datetime as dt
import platform
import re
import secrets
from importlib import metadata as importlib_metadata
from typing import Any


from batch.spec.config import JobSpec
from batch.store.commit import RunExistsError

VERSIONED_PACKAGES = ("sdbatch", "torch", "diffusers", "transformers", "ray", "pyarrow", "fsspec", "safetensors",
                      "pillow", "numpy")


# Spec fields that decide what a run produces: a later attempt on the same output must agree on them.
IDENTITY_FIELDS = ("task", "model", "revision", "variant", "allow_pickle", "defaults", "limits", "seed",
                   "allowed_input_prefixes",
                   # what is stored: a resumed run keeps one container, encoding and safety policy
                   "output_format", "image_format", "webp_lossless", "jpeg_quality", "safety_policy")


def package_versions() -> dict[str, str]:
    out = {}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["python"] = platform.python_version()
    return out


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


_SECRET = re.compile(r"key|secret|token|password|passwd|credential|session|auth", re.IGNORECASE)


_NOT_SECRET = {"endpoint_url", "region_name", "anon", "use_ssl"}


def redact(value: Any, name: str = "") -> Any:
    """Copy of ``value`` with secret-looking entries (access keys, tokens, passwords) replaced."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, name) for v in value]
    if name and name not in _NOT_SECRET and _SECRET.search(name) and value is not None:
        return "***"
    return value


def redact_arg(arg: str) -> str:
    """``--set storage_options.secret=X`` -> ``--set storage_options.secret=***``."""
    name, sep, _ = arg.partition("=")
    return f"{name}=***" if sep and _SECRET.search(name.rsplit(".", 1)[-1]) else arg


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# Identity fields added later, with the value a record written before them means (so older runs still resume).
# ``date`` decides pixels only with ``seed_per_day`` (then another day into the same prefix is another run).
# The safety checker decides ``nsfw`` (and, under blackout/drop, what is stored): one run keeps one checker.
LATER_IDENTITY_FIELDS = {"seed_per_day": False, "dedup_against": [], "safety_checker": "model",
                         "safety_checker_revision": None}


def _identity(spec_json: dict[str, Any]) -> dict[str, Any]:
    ident = {k: spec_json.get(k) for k in IDENTITY_FIELDS}
    ident |= {k: spec_json.get(k, default) for k, default in LATER_IDENTITY_FIELDS.items()}
    if ident["seed_per_day"]:
        ident["date"] = spec_json.get("date")
    return ident


def _differences(old: Any, new: Any, path: str = "") -> list[str]:
    """``"defaults.num_inference_steps: 1 -> 12"`` for every leaf where two spec dumps differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in _differences(old.get(k), new.get(k), f"{path}.{k}" if path else str(k))]
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


def check_same_run(record: dict[str, Any], spec: JobSpec, digest: str, output: str) -> None:
    """Refuse to add an attempt to a run that was started with other outputs in mind."""
    diffs = _differences(_identity(record.get("spec", {})), _identity(redact(spec.model_dump(mode="json"))))
    if record.get("manifest_sha256") != digest:
        diffs.append("manifest contents changed (sha256 differs)")
    if diffs:
        raise RunExistsError(
            f"output {output} holds run {record.get('run_id')} started with a different spec or manifest, so it "
            "cannot be resumed with this one:\n  " + "\n  ".join(diffs) + "\nUse a new output prefix.")

"""Regenerate the schemas vendored beside this file (tests/schemas/README.md names the sources).

    python tests/schemas/vendor.py --kuberay-git KUBERAY_CLONE/.git --kuberay-tag v1.5.1 \
        --k8s-wheel kubernetes_validate-1.37.0-py3-none-any.whl --k8s-version v1.33.0

KubeRay: the ``v1`` ``openAPIV3Schema`` of each CRD under ``ray-operator/config/crd/bases/`` at the tag, as
JSON. Kubernetes: the ``-local-strict`` JSON schemas that the ``kubernetes-validate`` wheel ships (a fork of
kubernetes-json-schema, generated from the Kubernetes OpenAPI document), one file per kind with only the
``$defs`` it reaches, so no 1.4 MB ``_definitions.json`` is needed. ``description`` texts are dropped from
both (they are documentation, not constraints) to keep the vendored files small.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import zipfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CRDS = ("rayclusters", "rayjobs", "rayservices")
K8S_KINDS = ("cronjob-batch-v1", "serviceaccount-v1", "role-rbac-v1", "rolebinding-rbac-v1", "configmap-v1")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")


def strip_descriptions(node, in_map: bool = False):
    """Drop every schema's ``description`` string; a *property* named ``description`` is kept."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if not in_map and key == "description" and isinstance(value, str):
                continue
            out[key] = strip_descriptions(value, in_map=(not in_map and key in _SCHEMA_MAPS))
        return out
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def kuberay(git_dir: str, tag: str) -> None:
    """Write ``kuberay-<tag>/<plural>.ray.io.json`` (the served ``v1`` schema) for each CRD."""
    out = HERE / f"kuberay-{tag}"
    out.mkdir(exist_ok=True)
    commit = subprocess.run(["git", "--git-dir", git_dir, "rev-parse", f"{tag}^{{commit}}"],
                            check=True, capture_output=True, text=True).stdout.strip()
    for plural in CRDS:
        text = subprocess.run(["git", "--git-dir", git_dir, "show",
                               f"{tag}:ray-operator/config/crd/bases/ray.io_{plural}.yaml"],
                              check=True, capture_output=True, text=True).stdout
        crd = yaml.safe_load(text)
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        doc = {"x-source": f"ray-project/kuberay {tag} ({commit}) "
                           f"ray-operator/config/crd/bases/ray.io_{plural}.yaml, versions[name=v1]",
               "kind": crd["spec"]["names"]["kind"],
               "openAPIV3Schema": strip_descriptions(version["schema"]["openAPIV3Schema"])}
        (out / f"{plural}.ray.io.json").write_text(json.dumps(doc, separators=(",", ":"), sort_keys=True))


def _refs(node, found: set[str]) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            found.add(ref.rsplit("/", 1)[-1])
        for v in node.values():
            _refs(v, found)
    elif isinstance(node, list):
        for v in node:
            _refs(v, found)


def _relink(node):
    if isinstance(node, dict):
        return {k: ("#/$defs/" + v.rsplit("/", 1)[-1] if k == "$ref" and isinstance(v, str) else _relink(v))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_relink(v) for v in node]
    return node


def kubernetes(wheel: str, version: str) -> None:
    """Write ``kubernetes-<version>/<kind>.json``: the kind's strict schema plus the ``$defs`` it reaches."""
    out = HERE / f"kubernetes-{version}"
    out.mkdir(exist_ok=True)
    base = f"kubernetes_validate/kubernetes-json-schema/{version}-local-strict/"
    with zipfile.ZipFile(wheel) as zf:
        defs = json.loads(zf.read(base + "_definitions.json"))["$defs"]
        for kind in K8S_KINDS:
            schema = json.loads(zf.read(base + f"{kind}.json"))
            needed, todo = set(), set()
            _refs(schema, todo)
            while todo:
                name = todo.pop()
                if name not in needed:
                    needed.add(name)
                    _refs(defs[name], todo)
            schema = _relink(schema)
            schema["$defs"] = {n: _relink(defs[n]) for n in sorted(needed)}
            schema["x-source"] = f"{Path(wheel).name} {base}{kind}.json"
            (out / f"{kind}.json").write_text(json.dumps(strip_descriptions(schema), separators=(",", ":"),
                                                         sort_keys=True))


def main() -> None:
    """Command line: see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kuberay-git", required=True)
    ap.add_argument("--kuberay-tag", required=True)
    ap.add_argument("--k8s-wheel", required=True)
    ap.add_argument("--k8s-version", required=True)
    args = ap.parse_args()
    kuberay(args.kuberay_git, args.kuberay_tag)
    kubernetes(args.k8s_wheel, args.k8s_version)


if __name__ == "__main__":
    main()

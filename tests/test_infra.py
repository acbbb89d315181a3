"""Every deployment manifest parses, and the fields that matter agree with the repository: one image
everywhere, GPU requests on the worker groups, autoscaling bounds, RayJobs that tear their cluster down,
entrypoints that name scripts under jobs/ and config files that exist, and a dated nightly prefix."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from batch.spec.config import load_spec

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "infra" / "k8s"
DAY = "2026-11-23"


def _docs() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            out.append((path.name, doc))
            if doc["kind"] == "ConfigMap":  # templates inside (the nightly RayJob), with the day filled in
                for text in doc.get("data", {}).values():
                    out.append((f"{path.name}:template", yaml.safe_load(text.replace("__DT__", DAY))))
    return out


def _cluster_specs():
    for name, doc in _docs():
        if doc["kind"] == "RayCluster":
            yield name, doc["spec"]
        elif doc["kind"] == "RayJob":
            yield name, doc["spec"]["rayClusterSpec"]


def _containers(spec):
    groups = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    return [(g, c) for g in groups for c in g["template"]["spec"]["containers"]]


def test_expected_manifests_exist():
    kinds = sorted(doc["kind"] for _, doc in _docs())
    assert kinds.count("RayJob") == 3 and kinds.count("RayCluster") == 1 and "CronJob" in kinds
    assert (REPO / "infra" / "Dockerfile").is_file() and (REPO / "infra" / "README.md").is_file()


def test_one_image_and_gpu_workers_with_autoscaling():
    images = set()
    specs = list(_cluster_specs())
    assert len(specs) == 4
    for name, spec in specs:
        assert spec["rayVersion"] == "2.60.0" and spec["enableInTreeAutoscaling"] is True, name
        for _, c in _containers(spec):
            images.add(c["image"])
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert "RAY_AUTH_MODE" in env, (name, c["name"])
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert "nvidia.com/gpu" not in head["resources"].get("limits", {}), name
        for g in spec["workerGroupSpecs"]:
            c = g["template"]["spec"]["containers"][0]
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1, name
            assert int(c["resources"]["requests"]["nvidia.com/gpu"]) == int(c["resources"]["limits"]["nvidia.com/gpu"])
            assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] and g["maxReplicas"] >= 1, name
            assert g["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert len(images) == 1 and re.fullmatch(r"[\w./-]+/sdbatch:[\w.-]+", images.pop())


@pytest.mark.parametrize("name, doc", [(n, d) for n, d in _docs() if d["kind"] == "RayJob"],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_rayjobs_point_at_repo_files_and_shut_down(name, doc):
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"] == "/home/ray/sdbatch"  # WORKDIR of the image
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python" and re.fullmatch(r"jobs/\w+\.py", argv[1])
    assert (REPO / argv[1]).is_file(), f"{name}: entrypoint {argv[1]} is not in the repository"
    config = argv[argv.index("--config") + 1]
    assert (REPO / config).is_file(), f"{name}: config {config} is not in the repository"
    if argv[1] == "jobs/generate.py":
        load_spec(REPO / config)  # and it is a valid job spec
        import importlib.util

        mod_spec = importlib.util.spec_from_file_location("jobs_generate", REPO / "jobs" / "generate.py")
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        run = module.run_argv(argv[2:])  # the flags parse into an sdbatch run command line
        from batch.cli import build_parser

        parsed = build_parser().parse_args(run)
        assert parsed.command == "run" and parsed.output and parsed.manifest
    elif argv[1] == "jobs/evaluate.py":  # issue 5's entry point: `sdbatch eval CONFIG` and its flags
        from batch.cli import build_parser

        rest = argv[2:argv.index("--config")] + argv[argv.index("--config") + 2:]
        parsed = build_parser().parse_args(["eval", config, *rest])
        assert parsed.output and parsed.coco_captions and parsed.coco_images


def test_nightly_is_dated_and_scheduled():
    docs = dict((d["kind"], d) for n, d in _docs() if n.startswith("nightly.yaml") and d["kind"] != "RayJob")
    template = next(d for n, d in _docs() if n == "nightly.yaml:template")
    argv = shlex.split(template["spec"]["entrypoint"])
    assert argv[argv.index("--date") + 1] == DAY and "--dated-output" in argv
    assert template["metadata"]["labels"]["sdbatch/dt"] == DAY and "generateName" in template["metadata"]
    import importlib.util

    mod_spec = importlib.util.spec_from_file_location("jobs_generate", REPO / "jobs" / "generate.py")
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    run = module.run_argv(argv[2:])
    assert run[run.index("--output") + 1].endswith(f"/dt={DAY}/")
    cron = docs["CronJob"]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid" and len(cron["schedule"].split()) == 5
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    script = pod["containers"][0]["args"][0]
    assert "date -u +%Y-%m-%d" in script and "kubectl create -f -" in script
    assert {"create"} <= set(docs["Role"]["rules"][0]["verbs"]) and docs["Role"]["rules"][0]["resources"] == ["rayjobs"]


def test_dockerfile_pins_torch_first_and_runs_as_non_root():
    text = (REPO / "infra" / "Dockerfile").read_text()
    base = re.search(r"ARG CUDA_IMAGE=(\S+)", text).group(1)
    assert base.startswith("nvidia/cuda:") and "runtime" in base
    torch_pin = re.search(r"^torch==(\S+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)
    assert f"ARG TORCH_VERSION={torch_pin}" in text
    i_torch = text.index('pip install "torch==${TORCH_VERSION}"')
    i_rest = text.index("pip install -c constraints.txt")
    assert i_torch < i_rest
    assert re.search(r"^USER ray$", text, re.M) and text.index("USER ray") < i_torch
    for path in re.findall(r"^COPY --chown=ray:ray (.+) \./?\S*$", text, re.M):
        for p in path.split():
            assert (REPO / p).exists(), p

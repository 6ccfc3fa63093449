"""Checks of the KubeRay manifests in k8s/, as the API server and the KubeRay operator would see them.

Each check runs on the YAML files as written ("files") and, where kubectl is installed, on what
`kubectl kustomize` builds from every overlay. The checkers return a list of problems; the tests at the
end feed them broken objects to show that they do catch what they are for.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
SCHEMA_DIR = Path(__file__).resolve().parent / "data" / "k8s"

CRD_SCHEMAS = {"RayCluster": "rayclusters.ray.io-v1.schema.json", "RayJob": "rayjobs.ray.io-v1.schema.json"}
# Kubernetes version whose core schemas (from kubernetes-validate) check PVCs and Pods.
K8S_VERSION = "1.32"
# Where the image keeps the repo (Dockerfile WORKDIR) and where the pods mount the shared volume.
IMAGE_WORKDIR = "/app"
MOUNT = "/mnt/bertjob"
PVC_NAME = "bertjob-data"
RUN_AS_USER = 1000
# Limits of the KubeRay operator (ray-operator/controllers/ray/utils/constant.go): longer names are
# rejected because the names of the pods and services derived from them would be too long.
MAX_NAME = {"RayCluster": 53, "RayJob": 47}
# KubeRay pastes the entrypoint unquoted into the submitter's `bash -c` line.
SHELL_METACHARACTERS = re.compile(r"[;&|$`<>()\\\n\"']")
SECRET_LIKE_ENV = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
# What each jobs/<stage>.py entrypoint must pass besides --config: its input, where it writes, and for
# training the checkpoint location and run name that let a rerun resume.
REQUIRED_FLAGS = {
    "pipeline": ("--input", "--output-dir", "--storage-path", "--name"),
    "prepare": ("--input", "--output-dir"),
    "train": ("--output-dir", "--storage-path", "--name"),
    "evaluate": ("--output-dir",),
    "infer": ("--output-dir",),
}


# --- discovery -----------------------------------------------------------------------------------------


def yaml_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def load_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kustomization_dirs(kind: str = "Kustomization") -> list[Path]:
    found = []
    for path in sorted(K8S.rglob("kustomization.yaml")):
        if (yaml.safe_load(path.read_text()) or {}).get("kind", "Kustomization") == kind:
            found.append(path.parent)
    return found


def rel(path: Path) -> str:
    return path.relative_to(K8S).as_posix()


OVERLAYS = [rel(d) for d in kustomization_dirs() if rel(d).startswith("overlays/")]
# "files": every object written in k8s/ (base and tools); the rest: what kubectl builds from an overlay.
SOURCES = ["files", *OVERLAYS]


def is_resource(doc: Any) -> bool:
    return (
        isinstance(doc, dict)
        and {"apiVersion", "kind", "metadata"} <= doc.keys()
        and doc["kind"] not in ("Kustomization", "Component")
    )


@cache
def kubectl_problem() -> str | None:
    """Why kustomize builds can't run here, or None."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return "kubectl is not installed (it ships kustomize, which builds the overlays)"
    out = subprocess.run([kubectl, "version", "--client"], capture_output=True, text=True, timeout=60).stdout
    match = re.search(r"Kustomize Version: v(\d+)", out)
    if match is None or int(match.group(1)) < 4:
        return f"this kubectl's kustomize is too old for components (need v4+): {out.strip()!r}"
    return None


@cache
def kustomize(directory: str) -> tuple[dict, ...]:
    proc = subprocess.run(
        ["kubectl", "kustomize", str(K8S / directory)], capture_output=True, text=True, timeout=120
    )
    if proc.returncode != 0:
        raise AssertionError(f"kubectl kustomize k8s/{directory} failed:\n{proc.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc is not None)


def objects(source: str) -> list[dict]:
    if source == "files":
        return [doc for path in yaml_files() for doc in load_docs(path) if is_resource(doc)]
    if (why := kubectl_problem()) is not None:
        pytest.skip(why)
    return copy.deepcopy(list(kustomize(source)))


def label(obj: dict) -> str:
    return f"{obj['kind']}/{obj['metadata'].get('name', '?')}"


# --- walking the Ray objects -----------------------------------------------------------------------------


def cluster_specs(obj: dict) -> Iterator[tuple[str, dict]]:
    if obj["kind"] == "RayCluster":
        yield label(obj), obj["spec"]
    elif obj["kind"] == "RayJob" and "rayClusterSpec" in obj["spec"]:
        yield f"{label(obj)} rayClusterSpec", obj["spec"]["rayClusterSpec"]


def ray_pod_specs(where: str, spec: dict) -> Iterator[tuple[str, dict]]:
    yield f"{where} head", spec["headGroupSpec"]["template"]["spec"]
    for group in spec.get("workerGroupSpecs", []):
        yield f"{where} group {group['groupName']}", group["template"]["spec"]


def pod_specs(obj: dict) -> Iterator[tuple[str, dict]]:
    """Every pod spec the object makes, with where it is."""
    if obj["kind"] == "Pod":
        yield label(obj), obj["spec"]
    for where, spec in cluster_specs(obj):
        yield from ray_pod_specs(where, spec)
    if obj["kind"] == "RayJob" and "submitterPodTemplate" in obj["spec"]:
        yield f"{label(obj)} submitter", obj["spec"]["submitterPodTemplate"]["spec"]


def containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod.get("containers", [])


def requests_gpu(container: dict) -> bool:
    resources = container.get("resources", {})
    return any("nvidia.com/gpu" in resources.get(kind, {}) for kind in ("requests", "limits"))


# --- checkers (each returns a list of problems) ----------------------------------------------------------


def strict_schema(schema: Any) -> Any:
    """The CRD's OpenAPI v3 schema as JSON Schema that, like the API server, rejects unknown fields."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in ("properties", "patternProperties"):
        if key in out:
            out[key] = {name: strict_schema(sub) for name, sub in out[key].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = strict_schema(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [strict_schema(sub) for sub in out[key]]
    if out.get("x-kubernetes-int-or-string") and not {"anyOf", "oneOf", "type"} & out.keys():
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@cache
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    schema = strict_schema(json.loads((SCHEMA_DIR / CRD_SCHEMAS[kind]).read_text()))
    return jsonschema.Draft7Validator(schema)


def crd_problems(obj: dict) -> list[str]:
    problems = [
        f"{label(obj)}: {'/'.join(map(str, err.absolute_path)) or '<root>'}: {err.message}"
        for err in sorted(crd_validator(obj["kind"]).iter_errors(obj), key=lambda e: list(map(str, e.path)))
    ]
    if obj.get("apiVersion") != "ray.io/v1":
        problems.append(f"{label(obj)}: apiVersion {obj.get('apiVersion')!r}, want ray.io/v1")
    return problems


def name_problems(obj: dict) -> list[str]:
    name = obj["metadata"].get("name", "")
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > MAX_NAME[obj["kind"]]:
        return [f"{label(obj)}: name must be a DNS-1035 label of at most {MAX_NAME[obj['kind']]} characters"]
    return []


def parse_quantity(value: Any) -> Decimal:
    text = str(value)
    match = re.fullmatch(r"([0-9.]+(?:[eE][-+]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?", text)
    if match is None:
        raise ValueError(f"not a Kubernetes quantity: {text!r}")
    scale = {
        None: 1, "m": Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
        "E": 10**18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    }[match.group(2)]  # fmt: skip
    return Decimal(match.group(1)) * scale


def resource_problems(where: str, resources: dict | None) -> list[str]:
    resources = resources or {}
    requests, limits = resources.get("requests", {}), resources.get("limits", {})
    problems = [
        f"{where}: no {kind}.{res}"
        for kind, values in (("requests", requests), ("limits", limits))
        for res in ("cpu", "memory")
        if res not in values
    ]
    for res in requests.keys() & limits.keys():
        try:
            if parse_quantity(limits[res]) < parse_quantity(requests[res]):
                problems.append(f"{where}: limits.{res} {limits[res]} < requests.{res} {requests[res]}")
        except ValueError as err:
            problems.append(f"{where}: {err}")
    if "nvidia.com/gpu" in requests and requests.get("nvidia.com/gpu") != limits.get("nvidia.com/gpu"):
        problems.append(f"{where}: nvidia.com/gpu must be in limits, equal to requests")
    return problems


def container_security_problems(where: str, security: dict | None, pod_security: dict) -> list[str]:
    security = security or {}
    effective = {**pod_security, **security}
    problems = []
    if effective.get("runAsNonRoot") is not True:
        problems.append(f"{where}: runAsNonRoot is not true")
    if effective.get("runAsUser") != RUN_AS_USER:
        problems.append(f"{where}: runAsUser is {effective.get('runAsUser')}, want {RUN_AS_USER}")
    if security.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}: allowPrivilegeEscalation is not false")
    if security.get("privileged"):
        problems.append(f"{where}: privileged")
    if "ALL" not in security.get("capabilities", {}).get("drop", []) or security.get("capabilities", {}).get(
        "add"
    ):
        problems.append(f"{where}: capabilities must drop ALL and add none")
    if effective.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
        problems.append(f"{where}: no seccompProfile RuntimeDefault (pod or container)")
    return problems


def env_problems(where: str, container: dict) -> list[str]:
    problems = []
    for env in container.get("env", []):
        if "value" in env and SECRET_LIKE_ENV.search(env["name"]):
            problems.append(f"{where}: env {env['name']} has an inline value; use a Secret (secretKeyRef)")
        ref = env.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None and ref.get("optional") is not True:
            problems.append(f"{where}: env {env['name']} secretKeyRef must be optional: true")
    for source in container.get("envFrom", []):
        if "secretRef" in source and source["secretRef"].get("optional") is not True:
            problems.append(f"{where}: envFrom secretRef {source['secretRef'].get('name')} must be optional")
    return problems


def security_problems(obj: dict) -> list[str]:
    problems = []
    if obj["kind"] == "Secret" and (obj.get("data") or obj.get("stringData")):
        problems.append(f"{label(obj)}: secret values in a manifest; create the Secret out of band")
    for where, pod in pod_specs(obj):
        pod_security = pod.get("securityContext", {})
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            if pod.get(key):
                problems.append(f"{where}: {key}")
        for volume in pod.get("volumes", []):
            if "hostPath" in volume:
                problems.append(f"{where}: hostPath volume {volume['name']}")
        for container in containers(pod):
            at = f"{where} container {container['name']}"
            problems += resource_problems(at, container.get("resources"))
            problems += container_security_problems(at, container.get("securityContext"), pod_security)
            problems += env_problems(at, container)
    for where, spec in cluster_specs(obj):
        auth = spec.get("authOptions") or {}
        if auth.get("mode") != "token":
            problems.append(f"{where}: authOptions.mode is {auth.get('mode')!r}, want 'token'")
        if obj["kind"] == "RayJob" and auth.get("enableK8sTokenAuth"):
            problems.append(f"{where}: KubeRay rejects enableK8sTokenAuth in a RayJob")
        if spec.get("enableInTreeAutoscaling") is not True:
            problems.append(f"{where}: enableInTreeAutoscaling is not true")
        autoscaler = spec.get("autoscalerOptions") or {}
        head_security = spec["headGroupSpec"]["template"]["spec"].get("securityContext", {})
        problems += resource_problems(f"{where} autoscaler", autoscaler.get("resources"))
        problems += container_security_problems(
            f"{where} autoscaler", autoscaler.get("securityContext"), head_security
        )
        problems += env_problems(f"{where} autoscaler", autoscaler)
    return problems


@cache
def dockerfile_ray_version() -> str:
    match = re.search(r"^ARG RAY_VERSION=(\S+)$", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    assert match, "Dockerfile has no `ARG RAY_VERSION=<version>`"
    return match.group(1)


@cache
def project_version() -> str:
    match = re.search(r'^version = "([^"]+)"$', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    assert match, "pyproject.toml has no version"
    return match.group(1)


def image_problems(obj: dict) -> list[str]:
    problems = []
    for where, spec in cluster_specs(obj):
        if spec.get("rayVersion") != dockerfile_ray_version():
            problems.append(
                f"{where}: rayVersion {spec.get('rayVersion')!r} != the image's Ray"
                f" {dockerfile_ray_version()} (Dockerfile ARG RAY_VERSION)"
            )
    version = re.escape(project_version())
    for where, pod in pod_specs(obj):
        for container in containers(pod):
            image = container.get("image", "")
            match = re.fullmatch(rf"(?:[\w.\-:]+/)*bertjob:{version}(-gpu)?", image)
            if match is None:
                problems.append(
                    f"{where} container {container['name']}: image {image!r} is not"
                    f" bertjob:{project_version()}[-gpu] (the Dockerfile's image, tagged as the package)"
                )
            elif requests_gpu(container) and not match.group(1):
                problems.append(f"{where} container {container['name']}: asks for a GPU, runs the CPU image")
    return problems


def operator_problems(obj: dict, pvc_names: set[str]) -> list[str]:
    """What the KubeRay operator would reject or what would defeat the design (shared volume, retries)."""
    problems = name_problems(obj) if obj["kind"] in MAX_NAME else []
    for where, spec in cluster_specs(obj):
        for group in spec.get("workerGroupSpecs", []):
            low, high = group.get("minReplicas", 0), group.get("maxReplicas", 2**31)
            if not low <= group.get("replicas", low) <= high:
                problems.append(f"{where} group {group['groupName']}: not minReplicas <= replicas <= max")
        for pod_where, pod in ray_pod_specs(where, spec):
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            tolerates_gpu_nodes = any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", []))
            for container in pod.get("containers", []):
                if requests_gpu(container) and not tolerates_gpu_nodes:
                    problems.append(f"{pod_where}: {container['name']} asks for a GPU, no toleration")
            ray = pod["containers"][0]
            mounts = [m for m in ray.get("volumeMounts", []) if m["mountPath"] == MOUNT]
            volume = volumes.get(mounts[0]["name"], {}) if mounts else {}
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            if not claim:
                problems.append(f"{pod_where}: the Ray container doesn't mount a PVC at {MOUNT}")
            elif claim not in pvc_names:
                problems.append(f"{pod_where}: mounts PVC {claim!r}, which no manifest defines")
    if obj["kind"] == "RayJob":
        spec = obj["spec"]
        if "rayClusterSpec" not in spec:
            problems.append(f"{label(obj)}: no rayClusterSpec: a RayJob must work on its own")
        if spec.get("submissionMode", "K8sJobMode") != "K8sJobMode":
            problems.append(f"{label(obj)}: submissionMode is not K8sJobMode")
        if spec.get("shutdownAfterJobFinishes") is not True or not spec.get("ttlSecondsAfterFinished", 0) > 0:
            problems.append(f"{label(obj)}: needs shutdownAfterJobFinishes and ttlSecondsAfterFinished > 0")
        if not (spec.get("submitterConfig") or {}).get("backoffLimit", 0) >= 1:
            problems.append(f"{label(obj)}: submitterConfig.backoffLimit must be >= 1")
        if not spec.get("backoffLimit", 0) >= 1:
            problems.append(f"{label(obj)}: backoffLimit must be >= 1 (retry on a fresh cluster)")
        submitter = (spec.get("submitterPodTemplate") or {}).get("spec")
        if submitter is None:
            problems.append(f"{label(obj)}: no submitterPodTemplate (KubeRay's has no securityContext)")
        else:
            if submitter.get("restartPolicy") not in ("Never", "OnFailure"):
                problems.append(f"{label(obj)}: submitter restartPolicy must be Never or OnFailure")
            if "command" in submitter["containers"][0]:
                problems.append(
                    f"{label(obj)}: submitter has a command (KubeRay adds `ray job submit` if not)"
                )
    return problems


def parse_entrypoint(entrypoint: str) -> tuple[str, dict[str, str]]:
    """(script path, {--flag: value}) of `python SCRIPT --flag value ...`."""
    words = shlex.split(entrypoint)
    if len(words) < 2 or words[0] not in ("python", "python3"):
        raise ValueError(f"not `python SCRIPT ...`: {entrypoint!r}")
    rest = words[2:]
    if len(rest) % 2 or not all(word.startswith("--") for word in rest[::2]):
        raise ValueError(f"not `--flag value` pairs after the script: {rest}")
    return words[1], dict(zip(rest[::2], rest[1::2], strict=True))


def repo_path(path: str) -> Path:
    """A path of the image's working copy (relative to WORKDIR, or absolute under it) in this checkout."""
    if path.startswith(IMAGE_WORKDIR + "/"):
        path = path[len(IMAGE_WORKDIR) + 1 :]
    return REPO / path


def is_shared(path: str) -> bool:
    return path.startswith(MOUNT + "/") or path.startswith(("s3://", "gs://"))


def entrypoint_problems(obj: dict) -> list[str]:
    entrypoint = obj["spec"].get("entrypoint", "")
    if SHELL_METACHARACTERS.search(entrypoint):
        return [f"{label(obj)}: entrypoint has shell syntax, but KubeRay pastes it unquoted: {entrypoint!r}"]
    try:
        script, flags = parse_entrypoint(entrypoint)
    except ValueError as err:
        return [f"{label(obj)}: {err}"]
    problems = []
    stage = Path(script).stem
    if not re.fullmatch(r"(/app/)?jobs/\w+\.py", script):
        problems.append(f"{label(obj)}: script {script!r} is not jobs/<stage>.py")
    if obj["metadata"]["name"] != f"bertjob-{stage}":
        problems.append(f"{label(obj)}: runs {script} but is not named bertjob-{stage}")
    if not re.fullmatch(r"(/app/)?configs/[\w.-]+\.ya?ml", flags.get("--config", "")):
        problems.append(f"{label(obj)}: no --config configs/<name>.yaml")
    if stage not in REQUIRED_FLAGS:
        problems.append(f"{label(obj)}: {script} is not one of the stages {sorted(REQUIRED_FLAGS)}")
    for flag in REQUIRED_FLAGS.get(stage, ()):
        if flag not in flags:
            problems.append(f"{label(obj)}: {stage} needs {flag}")
    for flag in ("--input", "--output-dir", "--storage-path"):
        if flag in flags and not is_shared(flags[flag]):
            problems.append(f"{label(obj)}: {flag} {flags[flag]} is not on {MOUNT} or s3:// / gs://")
    return problems


def cluster_spec_problems(objs: list[dict]) -> list[str]:
    """Every RayJob's rayClusterSpec and every RayCluster's spec must be the same (no drift)."""
    specs = [(where, spec) for obj in objs for where, spec in cluster_specs(obj)]
    return [
        f"{where} differs from {specs[0][0]}: {first_difference(specs[0][1], spec)}"
        for where, spec in specs[1:]
        if spec != specs[0][1]
    ]


def first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(a.keys() | b.keys()):
            if a.get(key) != b.get(key):
                return first_difference(a.get(key), b.get(key), f"{path}/{key}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return first_difference(x, y, f"{path}/{i}")
    return f"{path or '/'}: {a!r} != {b!r}"


@cache
def load_config(path: str) -> dict:
    """A bertjob config as plain YAML (not bertjob.config: this test only needs num_workers and sizes)."""
    return yaml.safe_load(repo_path(path).read_text()) or {}


def training_settings(config: dict) -> dict:
    """The train stage's settings: the pipeline's shared ones, then its `train:` section (PipelineConfig.stage)."""
    shared = {key: config[key] for key in ("num_workers", "use_gpu") if key in config}
    return {"num_workers": 2, "use_gpu": False, **shared, **(config.get("train") or {})}


def worker_range(num_workers: Any) -> tuple[int, int] | None:
    """(min, max) of `num_workers`: an int is a fixed count, [min, max] an elastic range."""
    if isinstance(num_workers, int) and not isinstance(num_workers, bool):
        return (num_workers, num_workers)
    if isinstance(num_workers, list) and len(num_workers) == 2 and all(type(n) is int for n in num_workers):
        return (num_workers[0], num_workers[1]) if 1 <= num_workers[0] <= num_workers[1] else None
    return None


def training_group_problems(where: str, spec: dict, config_path: str, config: dict) -> list[str]:
    """The worker group that trains (GPU pods with use_gpu, else CPU pods) must offer exactly the
    config's worker range: min = max(1, minReplicas x per pod), max = maxReplicas x per pod, where per
    pod is the pod's GPUs (one each) or Ray's CPUs of the pod (num-cpus, else the CPU limit) //
    cpus_per_worker. minReplicas 0 (scale from zero) still means one worker: the autoscaler adds the
    first pod when training asks for it."""
    train = training_settings(config)
    wanted = worker_range(train["num_workers"])
    if wanted is None:
        return [f"{config_path}: num_workers {train['num_workers']!r} is neither an int nor [min, max]"]
    use_gpu = bool(train["use_gpu"])
    groups = [
        g
        for g in spec.get("workerGroupSpecs", [])
        if requests_gpu(g["template"]["spec"]["containers"][0]) == use_gpu
    ]
    if len(groups) != 1:
        return [f"{where}: {len(groups)} {'GPU' if use_gpu else 'CPU'} worker groups, want one to train on"]
    (group,) = groups
    limits = group["template"]["spec"]["containers"][0]["resources"].get("limits", {})
    if use_gpu:
        per_pod = int(limits.get("nvidia.com/gpu", 0))
    elif not train.get("cpus_per_worker"):
        return [
            f"{config_path}: train.cpus_per_worker unset, so the workers per pod depend on the nodes up at start"
        ]
    else:
        cpus = parse_quantity(group.get("rayStartParams", {}).get("num-cpus", limits.get("cpu", 0)))
        per_pod = int(cpus // Decimal(str(train["cpus_per_worker"])))
    if per_pod < 1:
        return [f"{where} group {group['groupName']}: a pod can't host one training worker of {config_path}"]
    low, high = group.get("minReplicas", 0), group.get("maxReplicas", 0)
    offered = (max(1, low * per_pod), high * per_pod)
    if offered != wanted:
        return [
            f"{where} group {group['groupName']}: minReplicas {low}, maxReplicas {high} x {per_pod} worker(s)"
            f" per pod give num_workers [{offered[0]}, {offered[1]}]; {config_path} trains on"
            f" [{wanted[0]}, {wanted[1]}]"
        ]
    return []


# --- tests -----------------------------------------------------------------------------------------------


def ray_objects(source: str) -> list[dict]:
    objs = [obj for obj in objects(source) if obj["kind"] in CRD_SCHEMAS]
    assert objs, f"no RayCluster or RayJob in {source}"
    return objs


def rayjobs(source: str) -> list[dict]:
    return [obj for obj in ray_objects(source) if obj["kind"] == "RayJob"]


def test_k8s_folder_has_yaml() -> None:
    assert len(yaml_files()) >= 10, "k8s/ should hold the base, the overlays and their components"
    assert {"overlays/cpu-local", "overlays/gpu"} <= set(OVERLAYS)


@pytest.mark.parametrize("path", yaml_files(), ids=rel)
def test_yaml_parses(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{rel(path)} has no YAML document"
    for doc in docs:
        assert isinstance(doc, (dict, list)), f"{rel(path)}: a document is a {type(doc).__name__}"


@pytest.mark.parametrize("directory", kustomization_dirs() + kustomization_dirs("Component"), ids=rel)
def test_kustomization_paths_exist(directory: Path) -> None:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    paths = kustomization.get("resources", []) + kustomization.get("components", [])
    paths += [patch["path"] for patch in kustomization.get("patches", []) if "path" in patch]
    assert paths, f"{rel(directory)} references nothing"
    missing = [p for p in paths if not (directory / p).exists()]
    assert not missing, f"{rel(directory)}: missing {missing}"


@pytest.mark.parametrize("directory", [rel(d) for d in kustomization_dirs()])
def test_kustomize_builds(directory: str) -> None:
    if (why := kubectl_problem()) is not None:
        pytest.skip(why)
    built = kustomize(directory)
    assert built and all(is_resource(doc) for doc in built), f"k8s/{directory} built no objects"


@pytest.mark.parametrize("source", SOURCES)
def test_ray_objects_match_kuberay_crds(source: str) -> None:
    problems = [p for obj in ray_objects(source) for p in crd_problems(obj)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("source", SOURCES)
def test_core_objects_match_kubernetes_schemas(source: str) -> None:
    import kubernetes_validate  # in the `test` extra; ships Kubernetes' JSON schemas, works offline

    core = [obj for obj in objects(source) if obj["kind"] not in CRD_SCHEMAS]
    problems = []
    for obj in core:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            problems.append(f"{label(obj)}: {'/'.join(map(str, err.path))}: {err.message}")
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(
                f"{label(obj)}: {obj['apiVersion']}/{obj['kind']} isn't in Kubernetes {K8S_VERSION}"
            )
    assert not problems, "\n".join(problems)
    if source == "files":
        assert {obj["kind"] for obj in core} >= {"PersistentVolumeClaim"}


@pytest.mark.parametrize("source", SOURCES)
def test_security(source: str) -> None:
    problems = [p for obj in objects(source) for p in security_problems(obj)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("source", SOURCES)
def test_ray_version_and_images_match_the_dockerfile(source: str) -> None:
    problems = [p for obj in objects(source) for p in image_problems(obj)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("source", SOURCES)
def test_kuberay_operator_rules_and_shared_storage(source: str) -> None:
    pvcs = {obj["metadata"]["name"] for obj in objects("files") if obj["kind"] == "PersistentVolumeClaim"}
    assert PVC_NAME in pvcs
    problems = [p for obj in objects(source) for p in operator_problems(obj, pvcs)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("source", SOURCES)
def test_entrypoints_are_plain_commands_on_shared_storage(source: str) -> None:
    problems = [p for obj in rayjobs(source) for p in entrypoint_problems(obj)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("source", SOURCES)
def test_entrypoint_scripts_and_configs_exist(source: str) -> None:
    missing = set()
    for obj in rayjobs(source):
        script, flags = parse_entrypoint(obj["spec"]["entrypoint"])
        for path in (script, flags["--config"]):
            if not repo_path(path).is_file():
                missing.add(f"{path} (entrypoint of {label(obj)})")
    assert not missing, "missing in the repo:\n" + "\n".join(sorted(missing))


def test_files_have_every_stage_and_one_cluster() -> None:
    objs = ray_objects("files")
    names = sorted(obj["metadata"]["name"] for obj in objs if obj["kind"] == "RayJob")
    stages = ["evaluate", "infer", "pipeline", "prepare", "train"]
    assert names == [f"bertjob-{s}" for s in stages]
    assert [obj["kind"] for obj in objs].count("RayCluster") == 1


@pytest.mark.parametrize("family", ["files", *sorted({o.split("/")[1] for o in OVERLAYS})])
def test_every_ray_cluster_spec_is_the_same(family: str) -> None:
    """The pipeline, the stages and the long-lived cluster of one overlay run on the same cluster spec."""
    if family == "files":
        objs = ray_objects("files")
    else:
        objs = [obj for o in OVERLAYS if o.split("/")[1] == family for obj in ray_objects(o)]
    assert len(objs) >= 6, f"{family}: expected 5 RayJobs and a RayCluster, got {[label(o) for o in objs]}"
    problems = cluster_spec_problems(objs)
    assert not problems, "\n".join(problems)


def gpu_capacity(objs: list[dict]) -> int:
    """The most GPUs the autoscaler may bring up in any one cluster spec of these objects."""
    capacities = [0]
    for obj in objs:
        for _, spec in cluster_specs(obj):
            total = 0
            for group in spec.get("workerGroupSpecs", []):
                limits = group["template"]["spec"]["containers"][0]["resources"].get("limits", {})
                total += group.get("maxReplicas", 0) * int(limits.get("nvidia.com/gpu", 0))
            capacities.append(total)
    return max(capacities)


@pytest.mark.parametrize("source", [o for o in OVERLAYS if o.startswith("overlays/cpu-local")])
def test_cpu_local_overlay_is_small_and_gpu_free(source: str) -> None:
    objs = objects(source)
    assert gpu_capacity(objs) == 0
    for obj in objs:
        if obj["kind"] == "RayJob":
            assert parse_entrypoint(obj["spec"]["entrypoint"])[1]["--config"] == "configs/k8s-cpu.yaml"
        if obj["kind"] == "PersistentVolumeClaim":
            assert obj["spec"]["accessModes"] == ["ReadWriteOnce"]  # kind's and minikube's storage
        for where, pod in pod_specs(obj):
            if where.endswith(" group gpu"):
                continue  # never started: maxReplicas 0 (gpu_capacity above)
            for container in containers(pod):
                requests = container["resources"]["requests"]
                assert parse_quantity(requests["cpu"]) <= 1, f"{where}: too big for a laptop"
                assert parse_quantity(requests["memory"]) <= 4 * 2**30, f"{where}: too big for a laptop"


@pytest.mark.parametrize("source", [o for o in OVERLAYS if o.startswith("overlays/gpu")])
def test_gpu_overlay_has_gpu_workers(source: str) -> None:
    objs = objects(source)
    assert gpu_capacity(objs) >= 1
    for obj in objs:
        if obj["kind"] == "RayJob":
            assert parse_entrypoint(obj["spec"]["entrypoint"])[1]["--config"] == "configs/k8s-gpu.yaml"
        for where, pod in pod_specs(obj):
            for container in containers(pod):
                assert container["image"].endswith("-gpu"), (
                    f"{where}: {container['image']} is not the GPU image"
                )


@pytest.mark.parametrize("source", [o for o in OVERLAYS if o.startswith("overlays/s3")])
def test_s3_overlay_keeps_every_path_in_the_bucket_and_the_credentials_in_a_secret(source: str) -> None:
    objs = objects(source)
    for obj in objs:
        if obj["kind"] == "RayJob":
            flags = parse_entrypoint(obj["spec"]["entrypoint"])[1]
            paths = {f: v for f, v in flags.items() if f in ("--input", "--output-dir", "--storage-path")}
            assert paths and all(v.startswith("s3://") for v in paths.values()), f"{label(obj)}: {paths}"
        for where, pod in pod_specs(obj):
            if where.endswith("submitter"):
                continue  # it only submits the job
            ray = pod["containers"][0]
            refs = {e["name"]: e.get("valueFrom", {}).get("secretKeyRef") for e in ray.get("env", [])}
            for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION"):
                assert refs.get(name), f"{where}: {name} does not come from a Secret (secretKeyRef)"


def family(source: str) -> str:
    """The overlay family (cpu-local, gpu, s3) of a source, whose objects share one cluster spec."""
    return source if source == "files" else source.split("/")[1]


def configs_of_family(source: str) -> set[str]:
    """The --config of every RayJob of the source's family (a cluster/ overlay has no RayJob of its own)."""
    return {
        parse_entrypoint(obj["spec"]["entrypoint"])[1]["--config"]
        for other in SOURCES
        if family(other) == family(source)
        for obj in rayjobs(other)
    }


@pytest.mark.parametrize("source", SOURCES)
def test_training_worker_group_matches_the_configs_num_workers(source: str) -> None:
    """Each RayJob's cluster trains with its own --config; the long-lived RayCluster with its family's.
    The rule is training_group_problems': the group's minReplicas/maxReplicas times the training workers
    one pod holds give the config's num_workers range (min at least 1)."""
    problems = []
    for obj in ray_objects(source):
        if obj["kind"] == "RayJob":
            paths = {parse_entrypoint(obj["spec"]["entrypoint"])[1]["--config"]}
        else:
            paths = configs_of_family(source)
        assert paths, f"{label(obj)}: no RayJob in its family says which config it trains with"
        for where, spec in cluster_specs(obj):
            for path in sorted(paths):
                problems += training_group_problems(where, spec, path, load_config(path))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("cluster", [o for o in OVERLAYS if o.endswith("/cluster")])
def test_gcs_ft_component_on_a_long_lived_cluster(cluster: str, tmp_path: Path) -> None:
    """components/gcs-ft is in no overlay (it needs your Redis): build it onto each cluster/ overlay."""
    if (why := kubectl_problem()) is not None:
        pytest.skip(why)
    to_k8s = Path(os.path.relpath(K8S, tmp_path))
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [(to_k8s / cluster).as_posix()],
        "components": [(to_k8s / "components/gcs-ft").as_posix()],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    (obj,) = copy.deepcopy(list(kustomize(str(tmp_path))))
    pvcs = {o["metadata"]["name"] for o in objects("files") if o["kind"] == "PersistentVolumeClaim"}
    problems = crd_problems(obj) + security_problems(obj) + image_problems(obj) + operator_problems(obj, pvcs)
    assert not problems, "\n".join(problems)
    options = obj["spec"]["gcsFaultToleranceOptions"]
    assert options["redisAddress"] and "value" not in options["redisPassword"]  # from a Secret only
    assert options["redisPassword"]["valueFrom"]["secretKeyRef"]["name"]


# --- the checkers catch what they are for ------------------------------------------------------------------


@pytest.fixture
def good_rayjob() -> dict:
    (obj,) = [o for o in ray_objects("files") if o["metadata"]["name"] == "bertjob-train"]
    assert not crd_problems(obj) and not security_problems(obj) and not entrypoint_problems(obj)
    return obj


def test_crd_check_rejects_unknown_and_mistyped_fields(good_rayjob: dict) -> None:
    cluster = good_rayjob["spec"]["rayClusterSpec"]
    cluster["authOption"] = {"mode": "token"}  # misspelled
    cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resource"] = {}  # misspelled, in a pod
    cluster["workerGroupSpecs"][0]["maxReplicas"] = "4"  # a string
    cluster["authOptions"]["mode"] = "Token"  # not in the enum
    problems = "\n".join(crd_problems(good_rayjob))
    needles = ("'authOption' was unexpected", "'resource' was unexpected", "'4' is not of type", "'Token'")
    for needle in needles:
        assert needle in problems


def test_crd_check_accepts_int_or_string_quantities(good_rayjob: dict) -> None:
    container = good_rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    container["resources"]["limits"]["cpu"] = 2  # an integer is a valid quantity
    assert crd_problems(good_rayjob) == []


def test_security_check_catches_missing_limits_root_and_inline_secrets(good_rayjob: dict) -> None:
    cluster = good_rayjob["spec"]["rayClusterSpec"]
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]
    del worker["containers"][0]["resources"]["limits"]
    worker["containers"][0]["env"] = [{"name": "AWS_SECRET_ACCESS_KEY", "value": "hunter2"}]
    worker["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    worker["securityContext"]["runAsUser"] = 0
    del worker["containers"][0]["securityContext"]["runAsUser"]
    cluster["authOptions"] = {"mode": "disabled"}
    good_rayjob["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["envFrom"] = [
        {"secretRef": {"name": "creds"}}
    ]
    problems = "\n".join(security_problems(good_rayjob))
    for needle in ("no limits.cpu", "AWS_SECRET_ACCESS_KEY", "allowPrivilegeEscalation", "runAsUser is 0",
                   "'disabled'", "creds must be optional"):  # fmt: skip
        assert needle in problems


def test_entrypoint_check_catches_shell_syntax_and_missing_resume_flags(good_rayjob: dict) -> None:
    spec = good_rayjob["spec"]
    spec["entrypoint"] = "cd /app && python jobs/train.py --config configs/k8s-cpu.yaml"
    assert "shell syntax" in "\n".join(entrypoint_problems(good_rayjob))
    spec["entrypoint"] = "python jobs/train.py --config configs/k8s-cpu.yaml --output-dir /tmp/run"
    problems = "\n".join(entrypoint_problems(good_rayjob))
    for needle in ("needs --storage-path", "needs --name", "/tmp/run is not on"):
        assert needle in problems


def test_image_and_operator_checks_catch_drift(good_rayjob: dict) -> None:
    cluster = good_rayjob["spec"]["rayClusterSpec"]
    cluster["rayVersion"] = "2.59.0"
    cluster["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["image"] = "bertjob:0.1.0"
    cluster["workerGroupSpecs"][1]["template"]["spec"]["tolerations"] = []
    cpu_pod = cluster["workerGroupSpecs"][0]["template"]["spec"]
    cpu_pod["volumes"][0]["persistentVolumeClaim"]["claimName"] = "x"
    good_rayjob["spec"]["shutdownAfterJobFinishes"] = False
    good_rayjob["metadata"]["name"] = "Bertjob_Train"
    problems = "\n".join(image_problems(good_rayjob) + operator_problems(good_rayjob, {PVC_NAME}))
    for needle in ("rayVersion '2.59.0'", "runs the CPU image", "no toleration", "PVC 'x'",
                   "shutdownAfterJobFinishes", "DNS-1035"):  # fmt: skip
        assert needle in problems
    other = copy.deepcopy(good_rayjob)
    other["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = "1"
    assert "num-cpus" in "\n".join(cluster_spec_problems([good_rayjob, other]))


def test_training_group_check_catches_a_range_the_group_cannot_offer(good_rayjob: dict) -> None:
    spec = good_rayjob["spec"]["rayClusterSpec"]
    config = {"train": {"num_workers": [1, 2], "cpus_per_worker": 2}}
    cpu_group = spec["workerGroupSpecs"][0]
    assert training_group_problems("x", spec, "c.yaml", config) == []
    cpu_group["maxReplicas"] = 4
    assert "give num_workers [1, 4]; c.yaml trains on [1, 2]" in "\n".join(
        training_group_problems("x", spec, "c.yaml", config)
    )
    cpu_group["maxReplicas"] = 2
    config["train"]["cpus_per_worker"] = 1  # two workers fit a 2-CPU pod: [2, 4]
    assert "[2, 4]" in "\n".join(training_group_problems("x", spec, "c.yaml", config))
    del config["train"]["cpus_per_worker"]
    assert "cpus_per_worker unset" in "\n".join(training_group_problems("x", spec, "c.yaml", config))
    gpu = {"use_gpu": True, "train": {"num_workers": 2}}  # fixed 2, but the GPU group is 0..2 pods
    assert "give num_workers [1, 2]" in "\n".join(training_group_problems("x", spec, "g.yaml", gpu))
    assert "neither" in "\n".join(training_group_problems("x", spec, "c.yaml", {"num_workers": [3, 1]}))

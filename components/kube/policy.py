"""Policy over rendered manifests: what must never reach a cluster from this repository.

Rules (each violation names the object, the path and the rule):
- `literal-secret`: a Secret with data/stringData, an env value that looks like a credential
  (by its name or an AWS/private-key pattern), a URI with user:password@ in it;
- `image-digest`: a container image that is not pinned by @sha256 digest;
- `restricted`: a pod template (workloads, and Kubeflow Trainer runtimes' replicated jobs) without the Pod Security "restricted" context: runAsNonRoot,
  seccompProfile RuntimeDefault (pod or container), and on every container
  allowPrivilegeEscalation false and capabilities drop ALL;
- `rbac-wildcard`: a Role/ClusterRole rule with "*" in verbs, resources or apiGroups;
- `namespace-pss`: a Namespace not labelled pod-security.kubernetes.io/enforce=restricted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from components.kube.schema import describe

_CREDENTIAL_NAME = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|ACCESS_KEY|PRIVATE_KEY|API_KEY|CREDENTIAL)", re.I)
_AWS_KEY = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
_PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")
_URI_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@", re.I)
_POD_PATHS = {  # kind -> path to the pod spec
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}


@dataclass(frozen=True)
class Violation:
    """One broken rule."""

    object: str  # Kind/name
    path: str  # where in the object
    rule: str  # literal-secret, image-digest, restricted, rbac-wildcard, namespace-pss
    message: str

    def __str__(self) -> str:
        return f"{self.object}: {self.path}: [{self.rule}] {self.message}"


def _strings(node: Any, path: str = ""):
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield from _strings(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _strings(value, f"{path}/{index}")
    elif isinstance(node, str):
        yield path, node


def _pod_spec(obj: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]] | None:
    path = _POD_PATHS.get(obj.get("kind", ""))
    if path is None:
        return None
    node: Any = obj
    for key in path:
        node = node.get(key, {}) if isinstance(node, Mapping) else {}
    return "/" + "/".join(path), node


def _check_pod(name: str, base: str, spec: Mapping[str, Any]) -> list[Violation]:
    out = []
    pod_context = spec.get("securityContext", {}) or {}
    containers = [("containers", c) for c in spec.get("containers", [])] + \
                 [("initContainers", c) for c in spec.get("initContainers", [])]
    for group, container in containers:
        where = f"{base}/{group}/{container.get('name', '?')}"
        image = container.get("image", "")
        if "@sha256:" not in image:
            out.append(Violation(name, f"{where}/image", "image-digest", f"image {image!r} is not pinned by digest"))
        context = container.get("securityContext", {}) or {}
        if context.get("allowPrivilegeEscalation") is not False:
            out.append(Violation(name, f"{where}/securityContext", "restricted", "allowPrivilegeEscalation must be false"))
        if "ALL" not in ((context.get("capabilities") or {}).get("drop") or []):
            out.append(Violation(name, f"{where}/securityContext", "restricted", "capabilities must drop ALL"))
        if context.get("privileged"):
            out.append(Violation(name, f"{where}/securityContext", "restricted", "privileged containers are forbidden"))
        if not (context.get("runAsNonRoot") or pod_context.get("runAsNonRoot")):
            out.append(Violation(name, f"{where}/securityContext", "restricted", "runAsNonRoot must be true"))
        seccomp = (context.get("seccompProfile") or pod_context.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(Violation(name, f"{where}/securityContext", "restricted",
                                 "seccompProfile must be RuntimeDefault (pod or container)"))
        for index, env in enumerate(container.get("env", []) or []):
            if "value" in env and _CREDENTIAL_NAME.search(env.get("name", "")) and env["value"]:
                out.append(Violation(name, f"{where}/env/{index}", "literal-secret",
                                     f"{env['name']} has a literal value; use valueFrom.secretKeyRef"))
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            out.append(Violation(name, f"{base}/{key}", "restricted", f"{key} is forbidden"))
    return out


def check(objects: Iterable[Mapping[str, Any]]) -> list[Violation]:
    """Every rule violation in `objects` (empty when the manifests are fit for the cluster)."""
    out: list[Violation] = []
    for obj in objects:
        name = describe(obj)
        kind = obj.get("kind")
        if kind == "Secret" and (obj.get("data") or obj.get("stringData")):
            out.append(Violation(name, "/data", "literal-secret",
                                 "a Secret with values is committed; create it with kubectl, reference it by name"))
        for path, text in _strings(obj):
            if _AWS_KEY.search(text):
                out.append(Violation(name, path, "literal-secret", "an AWS access key id"))
            if _PRIVATE_KEY.search(text):
                out.append(Violation(name, path, "literal-secret", "a private key block"))
            if _URI_WITH_PASSWORD.search(text):
                out.append(Violation(name, path, "literal-secret", "a URI with a password in it"))
        pod = _pod_spec(obj)
        if pod is not None:
            out.extend(_check_pod(name, *pod))
        if kind in ("TrainingRuntime", "ClusterTrainingRuntime"):  # Kubeflow Trainer: one pod per replicated job
            jobs = ((obj.get("spec") or {}).get("template") or {}).get("spec", {}).get("replicatedJobs", []) or []
            for index, job in enumerate(jobs):
                spec = ((job.get("template") or {}).get("spec") or {}).get("template", {}).get("spec", {})
                out.extend(_check_pod(name, f"/spec/template/spec/replicatedJobs/{index}/template/spec/template/spec",
                                      spec))
        if kind in ("Role", "ClusterRole"):
            for index, rule in enumerate(obj.get("rules", []) or []):
                for field in ("verbs", "resources", "apiGroups"):
                    if "*" in (rule.get(field) or []):
                        out.append(Violation(name, f"/rules/{index}/{field}", "rbac-wildcard",
                                             f"'*' in {field}: grant exactly what is needed"))
        if kind == "Namespace":
            labels = obj.get("metadata", {}).get("labels", {}) or {}
            if labels.get("pod-security.kubernetes.io/enforce") != "restricted":
                out.append(Violation(name, "/metadata/labels", "namespace-pss",
                                     "pod-security.kubernetes.io/enforce must be 'restricted'"))
    return out

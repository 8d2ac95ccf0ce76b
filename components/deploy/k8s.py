"""Kubernetes manifests for the inference service, and applying them through the API.

`render` builds plain dicts (ServiceAccount, Deployment, Service, HorizontalPodAutoscaler) from the
recipe, and checks every object by round-tripping it through the `kubernetes` client's models:
a field the API does not know, or a value of the wrong type, fails here with the object and field
named, not later in the cluster. `to_yaml` writes them for `kubectl apply -f`. `apply` creates or
updates each object with server-side apply (idempotent: applying the same objects twice changes
nothing) and waits for the Deployment's rollout.

What the pods get:
- `reelforge serve --model models:/NAME@ALIAS` (or a pinned `models:/NAME/VERSION`), listening on 8080;
- MLFLOW_TRACKING_URI from the secret `deploy.tracking_uri_secret` (secretKeyRef), and every other key
  of that secret (tracking token, S3 credentials, the API token) through envFrom: the manifests
  reference the secret, they never contain a value from it;
- the Pod Security "restricted" profile: non-root UID 10001 (the image's user), no privilege
  escalation, every capability dropped, RuntimeDefault seccomp, a read-only root filesystem with
  emptyDirs for /tmp and the model cache;
- readiness on /readyz (a model is loaded), liveness on /healthz, a startup probe that gives a large
  model time to download and load;
- an annotation with the model version on the pod template, so applying a new version rolls the pods.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from components.config import DeployConfig, ServeConfig

PORT = 8080  # the container port `reelforge serve` listens on
SERVICE_PORT = 80
RUN_AS_USER = 10001  # the image's non-root user (infra/docker/Dockerfile)
CACHE_DIR = "/var/cache/reelforge"  # emptyDir: downloaded model artifacts land here (TMPDIR)
FIELD_MANAGER = "reelforge-deploy"
VERSION_ANNOTATION = "reelforge.io/model-version"
URI_ANNOTATION = "reelforge.io/model-uri"
TRACKING_URI_KEY = "MLFLOW_TRACKING_URI"

# kind -> (apiVersion, the kubernetes client model that validates it)
KINDS: dict[str, tuple[str, str]] = {
    "ServiceAccount": ("v1", "V1ServiceAccount"),
    "Deployment": ("apps/v1", "V1Deployment"),
    "Service": ("v1", "V1Service"),
    "HorizontalPodAutoscaler": ("autoscaling/v2", "V2HorizontalPodAutoscaler"),
}
_TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds"}


class ManifestError(ValueError):
    """A rendered object the Kubernetes API would not accept as written (names the object and field)."""


class KubernetesDeployError(RuntimeError):
    """Applying or rolling out an object failed (names the object)."""


@dataclass(frozen=True)
class Target:
    """What the service serves: the model URI on its command line and the version it resolves to now."""

    model_name: str
    version: str
    model_uri: str  # models:/NAME@ALIAS (follows the alias) or models:/NAME/VERSION (pinned)
    follows_alias: str | None  # the alias when model_uri follows one

    @property
    def name(self) -> str:
        """Object name: <model>-<alias> for the alias-following service, <model>-v<version> for a pinned one."""
        suffix = self.follows_alias if self.follows_alias else f"v{self.version}"
        return dns_label(f"{self.model_name}-{suffix}")


def dns_label(text: str) -> str:
    """`text` as a DNS-1123 label (lowercase alphanumerics and '-', at most 63 characters)."""
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:63].strip("-")
    if not label:
        raise ManifestError(f"{text!r} has no characters usable in a Kubernetes object name")
    return label


def _label_value(text: str) -> str:
    """`text` as a label value (alphanumerics, '-', '_', '.', at most 63, alphanumeric at both ends)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63].strip("-_.")


def _tolerations(config: DeployConfig) -> list[dict[str, Any]]:
    out = []
    for index, toleration in enumerate(config.tolerations):
        unknown = set(toleration) - _TOLERATION_KEYS
        if unknown:
            raise ManifestError(f"deploy.tolerations[{index}]: unknown key(s) {sorted(unknown)}; "
                                f"allowed: {sorted(_TOLERATION_KEYS)}")
        item: dict[str, Any] = dict(toleration)
        if "tolerationSeconds" in item:  # the recipe holds strings; the API wants an integer
            try:
                item["tolerationSeconds"] = int(item["tolerationSeconds"])
            except ValueError:
                raise ManifestError(f"deploy.tolerations[{index}].tolerationSeconds must be an integer, "
                                    f"got {toleration['tolerationSeconds']!r}") from None
        out.append(item)
    return out


def render(config: DeployConfig, target: Target, image: str, serve: ServeConfig | None = None,
           recipe_name: str = "") -> list[dict[str, Any]]:
    """The ServiceAccount, Deployment, Service and HPA serving `target`, validated against the API's models.

    The Deployment leaves `spec.replicas` unset on purpose: the HPA owns the replica count, and an
    apply that set it would scale the service back to `deploy.replicas` on every new version.
    """
    if config.max_replicas < config.replicas:
        raise ManifestError(f"deploy.max_replicas ({config.max_replicas}) is below deploy.replicas ({config.replicas})")
    serve = serve or ServeConfig()
    name = target.name
    selector = {"app.kubernetes.io/name": dns_label(target.model_name), "app.kubernetes.io/instance": name}
    labels = {
        **selector,
        "app.kubernetes.io/component": "inference",
        "app.kubernetes.io/part-of": "reelforge",
        "app.kubernetes.io/managed-by": FIELD_MANAGER,
        **({"reelforge.io/recipe": _label_value(recipe_name)} if recipe_name else {}),
    }
    annotations = {VERSION_ANNOTATION: target.version, URI_ANNOTATION: target.model_uri}
    namespace = config.namespace

    def meta(extra_annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
        return {"name": name, "namespace": namespace, "labels": dict(labels),
                **({"annotations": dict(extra_annotations)} if extra_annotations else {})}

    resources: dict[str, dict[str, Any]] = {
        # No CPU limit: throttling a sampling loop only adds latency; memory is limited so a
        # leak ends in a restart, not a node under pressure.
        "requests": {"cpu": config.cpu, "memory": config.memory},
        "limits": {"memory": config.memory},
    }
    if config.gpus > 0:  # extended resources go in limits (requests must then equal them)
        resources["requests"]["nvidia.com/gpu"] = str(config.gpus)
        resources["limits"]["nvidia.com/gpu"] = str(config.gpus)
    env = [
        {"name": TRACKING_URI_KEY,
         "valueFrom": {"secretKeyRef": {"name": config.tracking_uri_secret, "key": TRACKING_URI_KEY}}},
        {"name": "MLFLOW_DISABLE_TELEMETRY", "value": "true"},
        {"name": "DO_NOT_TRACK", "value": "true"},
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        # The root filesystem is read-only: home and temp files go to /tmp, downloaded model
        # artifacts (MLflow stages them in TMPDIR) to the model-cache volume.
        {"name": "HOME", "value": "/tmp"},
        {"name": "TMPDIR", "value": CACHE_DIR},
        {"name": "XDG_CACHE_HOME", "value": f"{CACHE_DIR}/xdg"},
    ]
    container = {
        "name": "serve",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["reelforge"],
        "args": ["serve", "--model", target.model_uri, "--host", "0.0.0.0", "--port", str(PORT), *serve_args(serve)],
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "env": env,
        # The rest of the secret (MLFLOW_TRACKING_TOKEN, AWS_* for S3 artifacts, the API token
        # named by serve.auth_token_env) arrives as environment variables, by reference.
        "envFrom": [{"secretRef": {"name": config.tracking_uri_secret}}],
        "resources": resources,
        "startupProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 5,
                         "failureThreshold": max(1, int(config.startup_timeout_s // 5))},
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5,
                           "timeoutSeconds": 2, "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10,
                          "timeoutSeconds": 5, "failureThreshold": 3},
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"},
                         {"name": "model-cache", "mountPath": CACHE_DIR}],
    }
    pod_spec: dict[str, Any] = {
        "serviceAccountName": config.service_account,
        # The server never calls the Kubernetes API: no token in the pod.
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        # Long enough for in-flight requests to finish after the server stops accepting new ones.
        "terminationGracePeriodSeconds": int(max(30, serve.request_timeout_s + 10)),
        "containers": [container],
        "volumes": [
            {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
            {"name": "model-cache", "emptyDir": {"sizeLimit": config.model_cache_size}},
        ],
    }
    if config.node_selector:
        pod_spec["nodeSelector"] = dict(config.node_selector)
    tolerations = _tolerations(config)
    if tolerations:
        pod_spec["tolerations"] = tolerations
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(annotations),
        "spec": {
            "selector": {"matchLabels": dict(selector)},
            "revisionHistoryLimit": 5,
            "progressDeadlineSeconds": int(config.rollout_timeout_s),
            # Never below the current capacity during a rollout: a new pod joins (and loads the
            # model) before an old one leaves. With GPUs this needs one spare GPU per surge pod.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": dict(labels), "annotations": dict(annotations)},
                "spec": pod_spec,
            },
        },
    }
    # The service account may be shared by several services (champion and pinned versions): no instance label.
    shared_labels = {k: v for k, v in labels.items() if k != "app.kubernetes.io/instance"}
    service_account = {"apiVersion": "v1", "kind": "ServiceAccount",
                       "metadata": {"name": config.service_account, "namespace": namespace, "labels": shared_labels},
                       "automountServiceAccountToken": False}
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(annotations),
        "spec": {"type": "ClusterIP", "selector": dict(selector),
                 "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": "http", "protocol": "TCP"}]},
    }
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": meta(),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": config.replicas,
            "maxReplicas": config.max_replicas,
            # CPU utilisation is what every cluster can measure without a custom-metrics adapter;
            # with GPU serving, request queueing shows up as CPU load of the server process too.
            "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {
                "type": "Utilization", "averageUtilization": config.target_cpu_utilization}}}],
            # Scale down slowly: a GPU pod is expensive to bring back (model load).
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}},
        },
    }
    objects = [service_account, deployment, service, hpa]
    validate(objects)
    return objects


def serve_args(serve: ServeConfig) -> list[str]:
    """The recipe's serve section (limits, batching, auth variable) as `--set serve.KEY=VALUE` arguments,
    so the server in the pod runs with this recipe's settings, not the image's default recipe."""
    out: list[str] = []
    for key, value in serve.model_dump(mode="json").items():
        if key not in ("host", "port"):  # given as --host/--port
            out += ["--set", f"serve.{key}={json.dumps(value)}"]
    return out


def _diff(original: Any, round_trip: Any, path: str) -> str | None:
    """First place where `round_trip` lost or changed something of `original` (a JSON-style path)."""
    if isinstance(original, dict):
        if not isinstance(round_trip, dict):
            return f"{path} (expected an object)"
        for key, value in original.items():
            if key not in round_trip:
                return f"{path}.{key} (not a field of this object)"
            found = _diff(value, round_trip[key], f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(original, list):
        if not isinstance(round_trip, list) or len(round_trip) != len(original):
            return f"{path} (expected a list)"
        for index, (a, b) in enumerate(zip(original, round_trip)):
            found = _diff(a, b, f"{path}[{index}]")
            if found:
                return found
        return None
    if type(original) is not type(round_trip) or original != round_trip:
        return f"{path} ({original!r} has the wrong type or value; the API reads it as {round_trip!r})"
    return None


def validate(objects: Iterable[Mapping[str, Any]]) -> None:
    """Check each object against the kubernetes client's model of its kind; raise ManifestError naming it.

    The client's deserializer silently drops fields it does not know and coerces types, so each
    object goes through the model and back, and anything lost or changed on the way is an error.
    """
    from kubernetes.client import ApiClient

    api = ApiClient()
    for obj in objects:
        kind = obj.get("kind", "")
        label = f"{kind or '?'} {obj.get('metadata', {}).get('name', '?')}"
        if kind not in KINDS:
            raise ManifestError(f"{label}: unsupported kind (known: {', '.join(KINDS)})")
        api_version, model = KINDS[kind]
        if obj.get("apiVersion") != api_version:
            raise ManifestError(f"{label}: apiVersion {obj.get('apiVersion')!r}, expected {api_version!r}")

        class _Response:  # what ApiClient.deserialize reads: a body in .data
            data = json.dumps(obj)

        try:
            parsed = api.deserialize(_Response(), model)
        except (TypeError, ValueError) as error:
            raise ManifestError(f"{label}: not a valid {model}: {error}") from None
        problem = _diff(dict(obj), api.sanitize_for_serialization(parsed), "")
        if problem:
            raise ManifestError(f"{label}: {problem.lstrip('.')}")


def to_yaml(objects: Iterable[Mapping[str, Any]]) -> str:
    """The objects as one multi-document YAML file for `kubectl apply -f`."""
    return "---\n".join(yaml.safe_dump(dict(obj), sort_keys=False) for obj in objects)


def load_client_config() -> None:
    """Credentials for the API: the pod's service account in a cluster, else the user's kubeconfig."""
    from kubernetes import config as kube_config

    try:
        kube_config.load_incluster_config()
    except kube_config.ConfigException:
        try:
            kube_config.load_kube_config()
        except (kube_config.ConfigException, FileNotFoundError, TypeError) as error:
            raise KubernetesDeployError(
                "no Kubernetes credentials: not running in a cluster (no service-account token) and no usable "
                f"kubeconfig (~/.kube/config or $KUBECONFIG): {error}") from None


def _describe(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata", {})
    return f"{obj.get('kind')} {meta.get('namespace', '')}/{meta.get('name')}"


def _api_error(error: Exception) -> str:
    body = getattr(error, "body", None)
    try:
        message = json.loads(body).get("message") if body else None
    except (TypeError, ValueError):
        message = None
    status = getattr(error, "status", None)
    return f"HTTP {status}: {message or body or error}" if status else str(error)


def apply(objects: list[dict[str, Any]], rollout_timeout_s: float = 900.0,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Server-side apply every object (create or update, idempotently), then wait for the Deployment rollout.

    Returns the Deployment's status summary. Raises KubernetesDeployError naming the object that
    failed: refused by the API (RBAC, admission, a missing namespace) or not rolled out in time.
    """
    from kubernetes import client
    from kubernetes.dynamic import DynamicClient
    from kubernetes.dynamic.exceptions import DynamicApiError, ResourceNotFoundError

    load_client_config()
    api_client = client.ApiClient()
    try:
        dynamic = DynamicClient(api_client)
    except Exception as error:  # discovery is the first request: an unreachable API server fails here
        raise KubernetesDeployError(f"cannot reach the Kubernetes API at {api_client.configuration.host}: "
                                    f"{_api_error(error)}") from None
    deployment = None
    for obj in objects:
        what = _describe(obj)
        try:
            resource = dynamic.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
            # force_conflicts: this deploy step owns these objects; a hand edit (kubectl edit)
            # of a field we set is overwritten rather than blocking the rollout.
            dynamic.server_side_apply(resource, body=obj, namespace=obj["metadata"].get("namespace"),
                                      field_manager=FIELD_MANAGER, force_conflicts=True)
        except (DynamicApiError, ResourceNotFoundError) as error:
            raise KubernetesDeployError(f"applying {what} failed: {_api_error(error)}") from None
        except Exception as error:  # connection refused, TLS, timeouts
            raise KubernetesDeployError(f"applying {what} failed: {type(error).__name__}: {error}") from None
        log(f"applied {what}")
        if obj["kind"] == "Deployment":
            deployment = obj
    if deployment is None:
        return {}
    return wait_for_rollout(client.AppsV1Api(api_client), deployment["metadata"]["namespace"],
                            deployment["metadata"]["name"], rollout_timeout_s, log, core=client.CoreV1Api(api_client))


def pod_problems(core: Any, namespace: str, selector: Mapping[str, str]) -> list[str]:
    """Why the Deployment's pods are not ready, one line per waiting or failing container (best effort)."""
    try:
        pods = core.list_namespaced_pod(namespace, label_selector=",".join(f"{k}={v}" for k, v in selector.items()))
    except Exception as error:  # noqa: BLE001 - RBAC may not allow listing pods; the timeout still stands
        return [f"(pods not readable: {_api_error(error)})"]
    lines = []
    for pod in pods.items:
        name = pod.metadata.name
        for condition in pod.status.conditions or []:
            if condition.type == "PodScheduled" and condition.status != "True":
                lines.append(f"pod {name}: not scheduled: {condition.message or condition.reason}")
        for status in pod.status.container_statuses or []:
            waiting = status.state.waiting if status.state else None
            terminated = status.last_state.terminated if status.last_state else None
            if waiting:
                lines.append(f"pod {name}: container {status.name} waiting: {waiting.reason}"
                             + (f" ({waiting.message})" if waiting.message else ""))
            if terminated:
                lines.append(f"pod {name}: container {status.name} last exited with code {terminated.exit_code} "
                             f"({terminated.reason}), {status.restart_count} restarts")
            elif not status.ready and not waiting:
                lines.append(f"pod {name}: container {status.name} running, not ready (GET /readyz != 200)")
    return lines


def wait_for_rollout(apps: Any, namespace: str, name: str, timeout_s: float,
                     log: Callable[[str], None] = print, poll_s: float = 2.0, core: Any = None) -> dict[str, Any]:
    """Wait until Deployment `name` runs its newest template on every replica, as `kubectl rollout status` does.

    A rollout that stalls fails with the Deployment named and, when `core` (CoreV1Api) is given, why its
    pods are not ready (missing secret, image pull, crash loop, unschedulable GPU request).
    """

    def stalled(why: str, selector: Mapping[str, str]) -> KubernetesDeployError:
        details = pod_problems(core, namespace, selector) if core is not None else []
        return KubernetesDeployError(
            f"Deployment {namespace}/{name} {why}" + "".join(f"\n  {line}" for line in details)
            + f"\nsee `kubectl -n {namespace} describe deployment {name}` and its pods' events")

    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        try:
            current = apps.read_namespaced_deployment_status(name, namespace)
        except Exception as error:
            raise KubernetesDeployError(f"reading Deployment {namespace}/{name} failed: {_api_error(error)}") from None
        spec, status = current.spec, current.status
        desired = spec.replicas if spec.replicas is not None else 1
        summary = {"replicas": desired, "updated": status.updated_replicas or 0,
                   "available": status.available_replicas or 0, "total": status.replicas or 0,
                   "generation": current.metadata.generation, "observed": status.observed_generation}
        selector = (spec.selector.match_labels or {}) if spec.selector else {}
        for condition in status.conditions or []:
            if condition.type == "Progressing" and condition.reason == "ProgressDeadlineExceeded":
                raise stalled(f"did not roll out: {condition.message}", selector)
        # kubectl's rule: the controller saw this generation, every replica runs the new
        # template, no old pod is left, and every new pod is available.
        done = ((status.observed_generation or 0) >= (current.metadata.generation or 0)
                and summary["updated"] >= desired and summary["total"] <= summary["updated"]
                and summary["available"] >= summary["updated"])
        if done:
            return summary
        line = f"waiting for Deployment {namespace}/{name}: {summary['updated']}/{desired} updated, " \
               f"{summary['available']} available"
        if line != last:
            log(line)
            last = line
        if time.monotonic() > deadline:
            raise stalled(f"not rolled out after {timeout_s:.0f} s ({summary['updated']}/{desired} updated, "
                          f"{summary['available']} available)", selector)
        time.sleep(poll_s)

"""Deploy stage: Kubernetes manifests (checked through the kubernetes client's models), which URI the
service runs for a champion or a rejected version, and a real local smoke deploy of a registered model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from components.config import DeployConfig, ServeConfig, load_recipe
from components.deploy import k8s
from components.deploy.stage import DeployError, parse_model_uri, resolve, run, served_uri

IMAGE = "registry.example/reelforge:1.2.3"
SECRET_URI = "postgresql+psycopg2://mlflow:hunter2@db.internal/mlflow"  # must never reach a manifest


def _gpu_config(**extra) -> DeployConfig:
    return DeployConfig(
        target="kubernetes", gpus=2, replicas=2, max_replicas=6, cpu="8", memory="32Gi",
        node_selector={"cloud.example/pool": "h100"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                     {"key": "spot", "operator": "Equal", "value": "true", "effect": "NoExecute",
                      "tolerationSeconds": "120"}],
        **extra,
    )


def _typed(objects):
    """Each rendered object as the kubernetes client's model (what the API server would parse)."""
    from kubernetes.client import ApiClient

    api = ApiClient()

    class _Response:
        def __init__(self, obj):
            self.data = json.dumps(obj)

    return {o["kind"]: api.deserialize(_Response(o), k8s.KINDS[o["kind"]][1]) for o in objects}


CHAMPION = k8s.Target("reelforge", "7", "models:/reelforge@champion", "champion")


def test_rendered_gpu_deployment_has_probes_resources_scheduling_and_restricted_security() -> None:
    objects = k8s.render(_gpu_config(), CHAMPION, IMAGE, ServeConfig(max_batch=3), recipe_name="demo")
    assert [o["kind"] for o in objects] == ["ServiceAccount", "Deployment", "Service", "HorizontalPodAutoscaler"]
    typed = _typed(objects)
    deployment = typed["Deployment"]
    assert deployment.metadata.name == "reelforge-champion" and deployment.metadata.namespace == "reelforge"
    assert deployment.spec.replicas is None  # the HPA owns the count; an apply must not reset it
    pod = deployment.spec.template.spec
    (container,) = pod.containers
    assert container.image == IMAGE
    assert (container.command + container.args)[:8] == [
        "reelforge", "serve", "--model", "models:/reelforge@champion", "--host", "0.0.0.0", "--port", "8080"]
    # The pod's server runs with the recipe's serve section, not the image's default recipe.
    assert "serve.max_batch=3" in container.args and "serve.request_timeout_s=60.0" in container.args
    assert container.ports[0].container_port == 8080
    # The version rides on the pod template, so applying a new version rolls the pods.
    assert deployment.spec.template.metadata.annotations[k8s.VERSION_ANNOTATION] == "7"

    assert (container.readiness_probe.http_get.path, container.liveness_probe.http_get.path) == ("/readyz", "/healthz")
    assert container.readiness_probe.http_get.port == "http" == container.ports[0].name
    assert container.startup_probe.failure_threshold * container.startup_probe.period_seconds >= 600

    assert container.resources.requests == {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "2"}
    assert container.resources.limits == {"memory": "32Gi", "nvidia.com/gpu": "2"}
    assert pod.node_selector == {"cloud.example/pool": "h100"}
    assert [(t.key, t.effect, t.toleration_seconds) for t in pod.tolerations] == [
        ("nvidia.com/gpu", "NoSchedule", None), ("spot", "NoExecute", 120)]

    assert pod.security_context.run_as_non_root and pod.security_context.run_as_user == 10001
    assert pod.security_context.seccomp_profile.type == "RuntimeDefault"
    assert pod.automount_service_account_token is False and pod.service_account_name == "reelforge-serving"
    security = container.security_context
    assert security.run_as_non_root and security.read_only_root_filesystem
    assert security.allow_privilege_escalation is False and security.capabilities.drop == ["ALL"]
    assert security.seccomp_profile.type == "RuntimeDefault"
    # Read-only root: every writable path is an emptyDir.
    volumes = {v.name: v for v in pod.volumes}
    mounts = {m.mount_path: m.name for m in container.volume_mounts}
    assert set(mounts) == {"/tmp", k8s.CACHE_DIR}
    assert all(volumes[name].empty_dir is not None for name in mounts.values())
    env = {e.name: e for e in container.env}
    assert env["TMPDIR"].value == k8s.CACHE_DIR and env["HOME"].value == "/tmp"


def test_tracking_uri_comes_from_the_secret_by_reference_never_as_a_value(monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", SECRET_URI)  # what the deploying process itself uses
    config = _gpu_config(tracking_uri_secret="mlflow-prod")
    objects = k8s.render(config, CHAMPION, IMAGE)
    text = k8s.to_yaml(objects)
    assert "hunter2" not in text and SECRET_URI not in text
    container = _typed(objects)["Deployment"].spec.template.spec.containers[0]
    tracking = next(e for e in container.env if e.name == "MLFLOW_TRACKING_URI")
    assert tracking.value is None
    assert (tracking.value_from.secret_key_ref.name, tracking.value_from.secret_key_ref.key) == (
        "mlflow-prod", "MLFLOW_TRACKING_URI")
    assert [e.secret_ref.name for e in container.env_from] == ["mlflow-prod"]
    # Only non-secret settings are literal.
    assert {e.name for e in container.env if e.value is not None} == {
        "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "HF_HUB_OFFLINE", "HOME", "TMPDIR", "XDG_CACHE_HOME"}


def test_service_and_hpa_point_at_the_deployments_pods() -> None:
    objects = k8s.render(_gpu_config(target_cpu_utilization=60), CHAMPION, IMAGE)
    typed = _typed(objects)
    deployment, service, hpa = typed["Deployment"], typed["Service"], typed["HorizontalPodAutoscaler"]
    selector = deployment.spec.selector.match_labels
    template_labels = deployment.spec.template.metadata.labels
    assert selector.items() <= template_labels.items()
    assert service.spec.selector == selector
    assert deployment.metadata.labels == service.metadata.labels == hpa.metadata.labels == template_labels
    assert service.spec.ports[0].target_port == "http" and service.spec.ports[0].port == 80
    assert (hpa.spec.scale_target_ref.kind, hpa.spec.scale_target_ref.name) == ("Deployment", "reelforge-champion")
    assert (hpa.spec.min_replicas, hpa.spec.max_replicas) == (2, 6)
    assert hpa.spec.metrics[0].resource.name == "cpu"
    assert hpa.spec.metrics[0].resource.target.average_utilization == 60
    assert typed["ServiceAccount"].metadata.name == deployment.spec.template.spec.service_account_name
    # Every object in the configured namespace.
    assert {o["metadata"]["namespace"] for o in objects} == {"reelforge"}


def test_cpu_serving_requests_no_gpu_and_a_new_version_rolls_the_same_deployment() -> None:
    config = DeployConfig(target="kubernetes", gpus=0)
    first = k8s.render(config, CHAMPION, IMAGE)
    second = k8s.render(config, k8s.Target("reelforge", "8", "models:/reelforge@champion", "champion"), IMAGE)
    assert "nvidia.com/gpu" not in k8s.to_yaml(first)
    a, b = first[1], second[1]
    # Same object and selector (immutable in the API), different template: a rolling update.
    assert a["metadata"]["name"] == b["metadata"]["name"] and a["spec"]["selector"] == b["spec"]["selector"]
    assert a["spec"]["template"] != b["spec"]["template"]
    # A pinned version gets objects of its own, so it never replaces the champion's service.
    pinned = k8s.render(config, k8s.Target("reelforge", "9", "models:/reelforge/9", None), IMAGE)
    assert {o["metadata"]["name"] for o in pinned if o["kind"] != "ServiceAccount"} == {"reelforge-v9"}


def test_yaml_for_kubectl_reads_back_as_the_same_objects() -> None:
    objects = k8s.render(_gpu_config(), CHAMPION, IMAGE)
    assert list(yaml.safe_load_all(k8s.to_yaml(objects))) == objects


def test_manifest_mistakes_are_caught_and_named() -> None:
    with pytest.raises(k8s.ManifestError, match=r"deploy\.tolerations\[0\]: unknown key.*'operater'"):
        k8s.render(DeployConfig(tolerations=[{"key": "gpu", "operater": "Exists"}]), CHAMPION, IMAGE)
    with pytest.raises(k8s.ManifestError, match=r"tolerationSeconds must be an integer"):
        k8s.render(DeployConfig(tolerations=[{"key": "gpu", "tolerationSeconds": "soon"}]), CHAMPION, IMAGE)
    with pytest.raises(k8s.ManifestError, match="max_replicas"):
        k8s.render(DeployConfig(replicas=5, max_replicas=2), CHAMPION, IMAGE)
    # The validator itself: a field the API does not know, and a value of the wrong type.
    deployment = k8s.render(DeployConfig(), CHAMPION, IMAGE)[1]
    typo = json.loads(json.dumps(deployment))
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/readyz"}}
    with pytest.raises(k8s.ManifestError, match=r"Deployment reelforge-champion: .*readinesProbe \(not a field"):
        k8s.validate([typo])
    wrong_type = json.loads(json.dumps(deployment))
    wrong_type["spec"]["revisionHistoryLimit"] = "5"
    with pytest.raises(k8s.ManifestError, match=r"spec\.revisionHistoryLimit .*wrong type"):
        k8s.validate([wrong_type])


def test_apply_without_a_cluster_says_there_are_no_credentials(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    with pytest.raises(k8s.KubernetesDeployError, match="no Kubernetes credentials"):
        k8s.apply(k8s.render(DeployConfig(), CHAMPION, IMAGE))


def _deployment_status(generation: int, updated: int, available: int, total: int, stalled: bool = False):
    from kubernetes import client

    conditions = [client.V1DeploymentCondition(type="Progressing", status="False", reason="ProgressDeadlineExceeded",
                                               message='ReplicaSet "reelforge-champion-5d9" has timed out progressing.')
                  ] if stalled else []
    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name="reelforge-champion", generation=generation),
        spec=client.V1DeploymentSpec(replicas=2, selector=client.V1LabelSelector(match_labels={"app": "x"}),
                                     template=client.V1PodTemplateSpec()),
        status=client.V1DeploymentStatus(observed_generation=generation, updated_replicas=updated,
                                         available_replicas=available, replicas=total, conditions=conditions))


class _Reads:
    """The two API reads the rollout wait makes, answered from the kubernetes client's own model objects
    (there is no cluster here; the API calls themselves are the client library's)."""

    def __init__(self, deployments):
        self.deployments = list(deployments)

    def read_namespaced_deployment_status(self, name, namespace):
        return self.deployments.pop(0) if len(self.deployments) > 1 else self.deployments[0]

    def list_namespaced_pod(self, namespace, label_selector):
        from kubernetes import client

        assert label_selector == "app=x"
        waiting = client.V1ContainerState(waiting=client.V1ContainerStateWaiting(
            reason="CreateContainerConfigError", message='secret "reelforge-mlflow" not found'))
        return client.V1PodList(items=[client.V1Pod(
            metadata=client.V1ObjectMeta(name="reelforge-champion-5d9-abc"),
            status=client.V1PodStatus(container_statuses=[client.V1ContainerStatus(
                name="serve", ready=False, restart_count=0, image="i", image_id="", state=waiting)]))])


def test_rollout_wait_finishes_when_new_pods_are_available_and_explains_a_stall() -> None:
    rolling = [_deployment_status(2, 1, 2, 3), _deployment_status(2, 2, 1, 2), _deployment_status(2, 2, 2, 2)]
    lines = []
    done = k8s.wait_for_rollout(_Reads(rolling), "reelforge", "reelforge-champion", 30, lines.append, poll_s=0)
    assert done["updated"] == done["available"] == 2 and len(lines) == 2  # two waiting states, then done
    reads = _Reads([_deployment_status(3, 0, 2, 2, stalled=True)])
    with pytest.raises(k8s.KubernetesDeployError) as error:
        k8s.wait_for_rollout(reads, "reelforge", "reelforge-champion", 30, lines.append, poll_s=0, core=reads)
    message = str(error.value)
    assert "Deployment reelforge/reelforge-champion did not roll out" in message
    assert 'container serve waiting: CreateContainerConfigError (secret "reelforge-mlflow" not found)' in message


# --- which version the service runs (real SQLite registry) ---------------------------------------

def _registry_with_versions(name: str, count: int, champion: str | None) -> None:
    """`count` versions of `name` in the MLflow registry (metadata only), `champion` alias on one."""
    from components import tracking

    client = tracking.client()
    client.create_registered_model(name)
    for _ in range(count):
        client.create_model_version(name, source="file:///nonexistent/model")
    if champion:
        client.set_registered_model_alias(name, "champion", champion)


def test_champion_follows_the_alias_and_a_rejected_version_is_pinned_and_not_applied(
        mlflow_uri: str, tmp_path: Path) -> None:
    _registry_with_versions("reelforge", 2, champion="1")
    config = DeployConfig(target="kubernetes")
    champion, rejected = resolve(config, "models:/reelforge/1"), resolve(config, "models:/reelforge/2")
    assert champion.promoted and served_uri(config, champion) == "models:/reelforge@champion"
    assert not rejected.promoted and served_uri(config, rejected) == "models:/reelforge/2"
    assert resolve(config, "models:/reelforge@champion").version == "1"

    # The gate did not promote v2: nothing reaches the cluster (there is none here, so an apply
    # would fail), the champion keeps serving, and a pinned manifest is left for a canary.
    result = run(config, "models:/reelforge/2", tmp_path / "out", image=IMAGE, log=lambda _: None)
    assert result.status.startswith("not promoted: champion unchanged (champion is v1)")
    assert result.applied == [] and "nothing applied" in result.status
    manifest = list(yaml.safe_load_all(Path(result.manifests).read_text()))
    deployment = next(o for o in manifest if o["kind"] == "Deployment")
    assert deployment["metadata"]["name"] == "reelforge-v2"
    assert deployment["spec"]["template"]["spec"]["containers"][0]["args"][2] == "models:/reelforge/2"
    assert json.loads((tmp_path / "out" / "deployment.json").read_text())["version"] == "2"


def test_bad_model_uris_are_named(mlflow_uri: str) -> None:
    _registry_with_versions("reelforge", 1, champion=None)
    with pytest.raises(ValueError, match="model_uri 'runs:/abc/model' is not a registered model version"):
        parse_model_uri("runs:/abc/model")
    with pytest.raises(DeployError, match="model_uri models:/reelforge/5: not found in the registry"):
        resolve(DeployConfig(), "models:/reelforge/5")
    no_champion = resolve(DeployConfig(), "models:/reelforge/1")
    assert no_champion.champion_version is None and not no_champion.promoted


def test_cli_render_only_writes_manifests_for_kubectl(mlflow_uri: str, tmp_path: Path, capsys) -> None:
    from pipelines.cli import main

    _registry_with_versions("reelforge", 1, champion="1")
    code = main(["deploy", "--recipe", "tiny", "--model-uri", "models:/reelforge/1", "--render-only",
                 str(tmp_path / "manifests"), "--set", "deploy.gpus=1", "--workdir", str(tmp_path)])
    assert code == 0
    path = tmp_path / "manifests" / "reelforge-champion.yaml"
    assert f"kubectl apply -f {path}" in capsys.readouterr().out
    kinds = [o["kind"] for o in yaml.safe_load_all(path.read_text())]
    assert kinds == ["ServiceAccount", "Deployment", "Service", "HorizontalPodAutoscaler"]
    assert load_recipe("tiny").image in path.read_text()
    # A URI that is not a version is refused with a message, not a traceback.
    assert main(["deploy", "--recipe", "tiny", "--model-uri", "reelforge:1", "--render-only", str(tmp_path)]) == 1
    assert "model_uri 'reelforge:1'" in capsys.readouterr().err
    assert os.environ["MLFLOW_TRACKING_URI"] == mlflow_uri


# --- local smoke deploy: the real `reelforge serve`, a real registry ------------------------------

def _register_tiny(workdir: Path, name: str, versions: int, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Log a tiny model directory as the register step does (pyfunc from code, `model_dir` artifact) and
    register it `versions` times (versions with the same files: enough to tell them apart by number)."""
    import mlflow

    from components import tracking
    from components.register.stage import PYFUNC_FILE
    from tests.conftest import write_model_dir

    model_dir = write_model_dir(workdir / "model")
    experiment = tracking.ensure_experiment("deploy-test")
    uri = tracking.tracking_uri()
    # mlflow's fluent URIs are process-wide and exported as env vars: undo both after the test.
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        with mlflow.start_run(experiment_id=experiment):
            # Explicit requirements: inferring them imports the model in a subprocess (slow).
            info = mlflow.pyfunc.log_model(name="model", python_model=str(PYFUNC_FILE),
                                           artifacts={"model_dir": str(model_dir)}, pip_requirements=["mlflow"])
        return [str(mlflow.register_model(info.model_uri, name).version) for _ in range(versions)]
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.slow
def test_local_deploy_smoke_tests_the_real_server_and_stops_it(mlflow_uri: str, tmp_path: Path, monkeypatch) -> None:
    """Deploy through the runner (MLflow run with the smoke image) for the champion, and directly for a
    version the gate did not promote: both start `reelforge serve`, get a PNG, and leave no server behind."""
    import httpx
    from PIL import Image

    from components import tracking
    from components.runner import execute

    champion, candidate = _register_tiny(tmp_path, "reelforge", 2, monkeypatch)
    tracking.client().set_registered_model_alias("reelforge", "champion", champion)
    recipe = load_recipe("tiny", {"deploy.target": "local", "deploy.smoke_steps": 2, "deploy.ready_timeout_s": 180})

    out = tmp_path / "deployment"
    result = execute("deploy", recipe, {}, {"deployment": out}, model_uri=f"models:/reelforge/{champion}")
    meta = result.metadata
    assert meta["promoted"] is True and meta["served_uri"] == "models:/reelforge@champion"
    assert meta["version"] == champion and meta["smoke_latency_ms"] > 0
    assert "reelforge serve --model models:/reelforge@champion" in meta["serve_command"]
    assert meta["serve_command"].startswith(f"MLFLOW_TRACKING_URI={mlflow_uri} ")
    with Image.open(out / "smoke.png") as image:
        image.load()
        assert (image.format, image.size) == ("PNG", (16, 16))
    logged = {a.path for a in tracking.client().list_artifacts(meta["mlflow_run_id"])}
    assert {"smoke.png", "serve.log", "deployment.json"} <= logged
    record = json.loads((out / "deployment.json").read_text())
    assert _gone(record["server_pid"]) and record["server_stop"].startswith("graceful")
    with pytest.raises(httpx.ConnectError):  # nothing listens on the smoke port any more
        httpx.get(f"{meta['endpoint']}/readyz", timeout=2)

    # With an API token in the environment the server demands it; the smoke request sends it, and it is
    # written nowhere.
    monkeypatch.setenv(recipe.serve.auth_token_env, "s3cret-token")
    pinned = run(recipe.deploy, f"models:/reelforge/{candidate}", tmp_path / "candidate", serve=recipe.serve,
                 log=lambda _: None)
    assert pinned.status.startswith(f"not promoted: champion unchanged (champion is v{champion})")
    assert pinned.served_uri == f"models:/reelforge/{candidate}" and Path(pinned.smoke_png).is_file()
    assert _gone(pinned.server_pid)
    for written in (tmp_path / "candidate").iterdir():
        assert b"s3cret-token" not in written.read_bytes(), written


def test_a_server_that_cannot_load_the_model_fails_the_deploy_with_its_log(mlflow_uri: str, tmp_path: Path) -> None:
    """A version without model files: the error names the model and carries the server's log, and the
    server is stopped (never left running) whether it exits by itself or waits for a model."""
    _registry_with_versions("reelforge", 1, champion="1")
    config = DeployConfig(target="local", ready_timeout_s=60, stop_grace_s=5)
    with pytest.raises(DeployError, match=r"(?s)local deploy of models:/reelforge@champion: .*--- server log") as error:
        run(config, "models:/reelforge/1", tmp_path / "out", log=lambda _: None)
    assert error.value.server_pid is not None and _gone(error.value.server_pid)

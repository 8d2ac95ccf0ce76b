"""infra/k8s renders with `kubectl kustomize` and every object is valid Kubernetes (offline schemas, strict),
fit for the restricted namespace, and says what a cluster operator expects of it."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from components.kube import policy, schema
from components.kube.serving import serving_objects, serving_yaml

ROOT = Path(__file__).resolve().parents[2]
CRDS = [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "tests/data/trainer").glob("*.yaml"))]
CUSTOM_KINDS = ["TrainingRuntime"]  # Kubeflow Trainer's: validated against its CRD, not the core schemas
KUSTOMIZATIONS = ["base", "overlays/dev", "overlays/prod"]
pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (Debian package kubectl) renders kustomize")


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    out = {}
    for name in KUSTOMIZATIONS:
        result = subprocess.run(["kubectl", "kustomize", str(ROOT / "infra/k8s" / name)], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, f"kubectl kustomize {name}: {result.stderr}"
        out[name] = [o for o in yaml.safe_load_all(result.stdout) if o]
    return out


def _one(objects: list[dict], kind: str, name: str) -> dict:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].startswith(name)]
    return found


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_object_validates_against_the_kubernetes_schemas_and_the_policy(rendered, name: str) -> None:
    objects = rendered[name]
    assert schema.validate_objects(objects, custom_kinds=CUSTOM_KINDS) == []
    assert schema.validate_custom(objects, CRDS) == []
    assert [str(v) for v in policy.check(objects)] == []
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {"reelforge"}


def test_the_schema_check_is_strict(rendered) -> None:
    deployment = copy.deepcopy(_one(rendered["overlays/dev"], "Deployment", "mlflow"))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    deployment["spec"]["replica"] = 2  # a typo: unknown fields are errors, not ignored
    problems = schema.validate_objects([deployment])
    assert len(problems) == 1 and problems[0].startswith("Deployment/mlflow: ")
    assert schema.validate_objects([{"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
                                     "metadata": {"name": "x"}}]) != []


def test_namespace_is_restricted_and_mlflow_tracks_to_postgres_with_s3_artifacts_and_auth(rendered) -> None:
    for name in KUSTOMIZATIONS:
        namespace = _one(rendered[name], "Namespace", "reelforge")
        assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
        mlflow = _one(rendered[name], "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
        assert mlflow["command"] == ["mlflow", "server"]
        assert "--artifacts-destination=$(MLFLOW_ARTIFACTS_DESTINATION)" in mlflow["args"]
        assert "--serve-artifacts" in mlflow["args"] and "--app-name=basic-auth" in mlflow["args"]
        env = {e["name"]: e for e in mlflow["env"]}
        assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"] == "reelforge-mlflow-server"
    for name in ("overlays/dev", "overlays/prod"):
        config = _one(rendered[name], "ConfigMap", "reelforge-mlflow")
        assert config["data"]["artifacts-destination"].startswith("s3://")


def test_the_trainjob_runtime_runs_our_image_restricted_and_the_trainjob_names_it(rendered) -> None:
    from components.pretrain import trainjob

    runtime = _one(rendered["overlays/dev"], trainjob.RUNTIME_KIND, trainjob.RUNTIME)
    (job,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    pod = job["template"]["spec"]["template"]["spec"]
    assert job["name"] == trainjob.TRAINER_CONTAINER and pod["containers"][0]["name"] == trainjob.TRAINER_CONTAINER
    assert pod["containers"][0]["image"].startswith("ghcr.io/reelforge/reelforge@sha256:")
    broken = copy.deepcopy(runtime)
    broken["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0].pop("securityContext")
    assert {v.rule for v in policy.check([broken])} == {"restricted"}
    broken["spec"]["mlPolicy"]["torchh"] = {}
    assert schema.validate_custom([broken], CRDS)


def test_inference_service_requests_gpus_on_the_gpu_pool(rendered) -> None:
    pod = _one(rendered["overlays/prod"], "Deployment", "reelforge-champion")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert _one(rendered["overlays/prod"], "HorizontalPodAutoscaler", "reelforge-champion")["spec"]["minReplicas"] == 2


def test_dev_runs_its_own_stores_and_prod_uses_irsa_without_keys(rendered) -> None:
    dev_kinds = {(o["kind"], o["metadata"]["name"]) for o in rendered["overlays/dev"]}
    assert {("StatefulSet", "postgres"), ("StatefulSet", "minio")} <= dev_kinds
    prod = rendered["overlays/prod"]
    assert not [o for o in prod if o["kind"] == "StatefulSet"]
    for account in ("reelforge-mlflow", "reelforge-pipeline", "reelforge-serving"):
        annotations = _one(prod, "ServiceAccount", account)["metadata"]["annotations"]
        assert annotations["eks.amazonaws.com/role-arn"].endswith(f":role/{account}")
    for obj in prod:  # AWS credentials only ever by optional reference (absent in prod: IRSA answers)
        for path, env in _env_vars(obj):
            if env["name"].startswith("AWS_"):
                assert env["valueFrom"]["secretKeyRef"].get("optional") is True, path
    assert "s3-endpoint-url" not in _one(prod, "ConfigMap", "reelforge-mlflow")["data"]  # real S3, not MinIO


def _env_vars(obj: dict):
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    for container in spec.get("containers", []):
        for env in container.get("env", []):
            yield f"{obj['kind']}/{obj['metadata']['name']}/{container['name']}", env


def test_pipeline_rbac_is_exactly_trainjobs_and_the_serving_objects(rendered) -> None:
    role = _one(rendered["base"], "Role", "reelforge-pipeline")
    grants = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
              for resource in rule["resources"] for verb in rule["verbs"]}
    assert ("trainer.kubeflow.org", "trainjobs", "create") in grants
    assert ("apps", "deployments", "patch") in grants
    assert not [r for r in role["rules"] if "*" in r["verbs"] + r["resources"] + r["apiGroups"]]
    assert {g for g, _, _ in grants} == {"trainer.kubeflow.org", "", "apps", "autoscaling"}
    assert not [r for r in role["rules"] if {"patch", "update", "delete"} & set(r["verbs"])
                and r["apiGroups"] != ["trainer.kubeflow.org"] and not r.get("resourceNames")]
    assert not any(o["kind"] in ("ClusterRole", "ClusterRoleBinding") for o in rendered["base"])


def test_committed_serving_manifests_are_what_the_deploy_stage_renders() -> None:
    committed = (ROOT / "infra/k8s/base/serving.yaml").read_text()
    assert committed == serving_yaml(), "regenerate: python -m components.kube.serving > infra/k8s/base/serving.yaml"
    assert schema.validate_objects(serving_objects()) == []
    # Only the image digest is missing before kustomize pins it.
    assert {v.rule for v in policy.check(serving_objects())} == {"image-digest"}

"""What a cluster gets from the compiled IR: GPU resources, node pools, shm, secrets, retries, caching,
timeouts and the image, on exactly the tasks the recipe's `resources` section names."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from components.config import RecipeError, load_recipe
from pipelines.cli import main

DIGEST_IMAGE = "registry.example/reelforge@sha256:" + "b" * 64
GPU_TASKS = {"autoencoder", "quality-tune", "distill", "evaluate"}
S3_TASKS = {"ingest", "ingest-new", "pretrain", "pretrain-continue"}


def _compile(recipe: str, out: Path) -> dict[str, tuple[dict, dict]]:
    assert main(["compile", "--recipe", recipe, "--out", str(out), "--image", DIGEST_IMAGE]) == 0
    compiled = {}
    for path in out.glob("*.yaml"):
        docs = list(yaml.safe_load_all(path.read_text()))
        platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
        compiled[path.stem] = (docs[0], platform)
    return compiled


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    return _compile("cluster", tmp_path_factory.mktemp("cluster-ir"))


def _executor(spec: dict, task: str) -> str:
    return _all_tasks(spec)[task]["componentRef"]["name"].replace("comp-", "exec-")


def _all_tasks(spec: dict) -> dict[str, dict]:
    """Every container task, including those inside ParallelFor loops (their own DAG components)."""
    tasks = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    return {name: body for name, body in tasks.items() if not name.startswith("for-loop")}


def test_gpu_tasks_ask_for_gpus_on_the_gpu_pool_with_shm_and_cpu_tasks_do_not(cluster) -> None:
    spec, platform = cluster["reelforge-training"]
    for task in spec["root"]["dag"]["tasks"]:
        executor = _executor(spec, task)
        resources = spec["deploymentSpec"]["executors"][executor]["container"]["resources"]
        settings = platform.get(executor, {})
        assert resources["resourceCpuRequest"] and resources["resourceMemoryRequest"], task
        assert resources["resourceMemoryLimit"] == resources["resourceMemoryRequest"], task
        if task in GPU_TASKS:
            assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu", task
            assert int(resources["accelerator"]["resourceCount"]) == 1, task
            assert settings["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}, task
            assert settings["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]
            (shm,) = settings["emptyDirMounts"]
            assert shm["mountPath"] == "/dev/shm" and shm["medium"] == "Memory" and shm["sizeLimit"], task
        else:  # the pretrain tasks only launch the multi-node TrainJob: no GPU for the launcher
            assert "accelerator" not in resources, task
            assert "nodeSelector" not in settings and "tolerations" not in settings, task
            assert "emptyDirMounts" not in settings, task
    quality = spec["deploymentSpec"]["executors"]["exec-quality-tune"]["container"]["resources"]
    assert (quality["resourceCpuRequest"], quality["resourceMemoryRequest"]) == ("8", "64Gi")


def test_secrets_are_referenced_on_exactly_the_tasks_that_use_them(cluster) -> None:
    for name, (spec, platform) in cluster.items():
        for task in _all_tasks(spec):
            secrets = {s["secretName"]: {k["envVar"]: k["secretKey"] for k in s["keyToEnv"]}
                       for s in platform.get(_executor(spec, task), {}).get("secretAsEnv", [])}
            if task == "list-raw-shards":
                assert secrets == {}, (name, task)
                continue
            assert secrets["reelforge-mlflow"]["MLFLOW_TRACKING_URI"] == "MLFLOW_TRACKING_URI", (name, task)
            assert ("reelforge-s3" in secrets) == (task in S3_TASKS), (name, task)
        assert "curate-shard" in _all_tasks(spec) or name != "reelforge-curation"
    # Only names and keys: no value of any secret is in the IR.
    text = yaml.safe_dump([c for c in cluster.values()])
    assert "AKIA" not in text and "password:" not in text.lower()


def test_retries_back_off_on_training_and_upload_tasks_only(cluster) -> None:
    spec, _ = cluster["reelforge-training"]
    tasks = spec["root"]["dag"]["tasks"]
    retried = {task for task, body in tasks.items() if "retryPolicy" in body}
    assert retried == {"ingest", "autoencoder", "pretrain", "pretrain-continue", "quality-tune", "distill", "register",
                       "deploy"}
    assert tasks["pretrain"]["retryPolicy"] == {"maxRetryCount": 2, "backoffDuration": "300s", "backoffFactor": 2.0,
                                                "backoffMaxDuration": "1800s"}
    assert tasks["register"]["retryPolicy"]["maxRetryCount"] == 3


def test_caching_is_off_on_register_and_deploy_and_on_only_where_outputs_are_pure(cluster) -> None:
    training, _ = cluster["reelforge-training"]
    cached = {task for task, body in training["root"]["dag"]["tasks"].items()
              if body.get("cachingOptions", {}).get("enableCache")}
    assert cached == {"curate"}
    curation, _ = cluster["reelforge-curation"]
    assert not curation["root"]["dag"]["tasks"]["ingest"].get("cachingOptions", {}).get("enableCache")


def test_timeouts_and_one_pinned_image_everywhere(cluster) -> None:
    spec, platform = cluster["reelforge-training"]
    assert platform["exec-pretrain"]["activeDeadlineSeconds"] == "1209600"
    assert platform["exec-register"]["activeDeadlineSeconds"] == "3600"
    for name, (compiled, _) in cluster.items():
        images = {e["container"]["image"] for e in compiled["deploymentSpec"]["executors"].values()}
        assert images == {DIGEST_IMAGE}, name


def test_a_local_recipe_compiles_without_gpus_secrets_or_retries(tmp_path: Path, capsys) -> None:
    spec, platform = _compile("demo", tmp_path)["reelforge-training"]
    assert all("secretAsEnv" not in p and "nodeSelector" not in p for p in platform.values())
    assert all("accelerator" not in e["container"].get("resources", {}) for e in spec["deploymentSpec"]["executors"].values())
    assert not any("retryPolicy" in t for t in spec["root"]["dag"]["tasks"].values())
    assert "not pinned by digest" not in capsys.readouterr().err  # compiled with a digest


def test_an_image_tag_gets_a_warning(tmp_path: Path, capsys) -> None:
    assert main(["compile", "--recipe", "tiny", "--out", str(tmp_path), "--image", "ghcr.io/x/reelforge:latest"]) == 0
    assert "'ghcr.io/x/reelforge:latest' is not pinned by digest" in capsys.readouterr().err


@pytest.mark.parametrize("override, says", [
    ({"resources.tasks": {"pretrian": {"gpus": 1}}}, "unknown task(s) ['pretrian']"),
    ({"resources.tasks": {"distill": {"memory": "16GB"}}}, "resources.tasks.distill.memory: memory '16GB' is not"),
    ({"resources.tasks": {"distill": {"gpus": -1}}}, "resources.tasks.distill.gpus"),
    ({"resources.tasks": {"distill": {"cpu": "four"}}}, "cpu 'four' is not a Kubernetes quantity"),
    ({"resources.secrets": {"s3": None}}, "resources.secrets"),
    ({"resources.gpu_pool": {"tolerations": [{"key": "gpu", "operator": "In"}]}}, "operator must be Equal or Exists"),
])
def test_bad_resources_name_the_key(override: dict, says: str) -> None:
    with pytest.raises(RecipeError) as error:
        load_recipe("cluster", override)
    assert says in str(error.value)

"""Multi-node pretraining as a Kubeflow Trainer v2 TrainJob, launched and followed by the pretrain task.

When a pretraining stage asks for `num_nodes > 1`, the KFP task does not train itself. It:

1. builds a TrainJob (trainer.kubeflow.org/v1alpha1, Trainer v2.1) that runs the same image on
   `num_nodes` nodes under the `reelforge-torch` TrainingRuntime (infra/k8s). The runtime injects
   PET_NNODES / PET_NPROC_PER_NODE / PET_NODE_RANK / PET_MASTER_ADDR / PET_MASTER_PORT, which
   `torchrun` reads; each process runs `python -m components.pretrain.worker`, i.e. the same
   stage code with Lightning DDP/FSDP across `num_nodes x devices` GPUs;
2. hands over its inputs by URI (on a cluster KFP artifacts live in S3 under the pipeline root)
   and an output URI where global rank 0 uploads the model directory;
3. creates the job, or re-attaches when a retried task finds its job already there (the name is
   derived from the pipeline run and stage, so a retry never starts a second job); a job that
   already failed is deleted and created again, so a KFP retry really retries;
4. follows it, printing every condition change, and fails the task with the job's reason and
   message when it fails or exceeds the timeout; on success it downloads the model into the
   task's output. The finished job is left for inspection (delete it with kubectl, or let the
   cluster's TTL policy do it).

The job runs the image of the task's own pod (read from the API; the pipeline may be compiled with
`--image` other than recipe.image), falling back to recipe.image.
Node resources come from `resources.trainjob_node`, the GPU pool's node selector and
tolerations from `resources.gpu_pool`, credentials from `resources.secrets` (by reference).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from components.config import Recipe

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
# The namespaced TrainingRuntime in infra/k8s/base/trainingruntime.yaml: Trainer's torch-distributed
# runtime with the Pod Security "restricted" context our namespace enforces.
RUNTIME, RUNTIME_KIND = "reelforge-torch", "TrainingRuntime"
TRAINER_CONTAINER = "node"  # the runtime's replicated job and container name
WORKER_MODULE = "components.pretrain.worker"
RECIPE_ENV = "REELFORGE_RECIPE_JSON"
IN_TRAINJOB_ENV = "REELFORGE_IN_TRAINJOB"  # set in the job: its processes train, never launch another job


class TrainJobError(RuntimeError):
    """The TrainJob could not be created, failed, or ran past its timeout (names the job and why)."""


def job_name(pipeline_job_id: str, stage: str) -> str:
    """A DNS-1035 name (<= 63 chars) fixed by pipeline run and stage: a retried task finds its own job."""
    digest = hashlib.sha256(f"{pipeline_job_id}/{stage}".encode()).hexdigest()[:10]
    slug = re.sub(r"[^a-z0-9-]+", "-", stage.lower()).strip("-")[:30] or "stage"
    return f"reelforge-pretrain-{slug}-{digest}"


def build(recipe: Recipe, stage: str, image: str, namespace: str, inputs: Mapping[str, str], output_uri: str,
          pipeline_job_id: str = "", git_commit: str = "", pipeline_name: str = "reelforge-training") -> dict[str, Any]:
    """The TrainJob manifest for pretraining stage `stage` (inputs: artifact name -> URI)."""
    config = recipe.pretrain.train_config(stage)
    node = recipe.resources.trainjob_node
    pool = recipe.resources.gpu_pool
    resources: dict[str, dict[str, Any]] = {"requests": {}, "limits": {}}
    if node.cpu:
        resources["requests"]["cpu"] = node.cpu
    if node.memory:
        resources["requests"]["memory"] = resources["limits"]["memory"] = node.memory
    if node.gpus:
        resources["requests"][pool.accelerator] = resources["limits"][pool.accelerator] = node.gpus
    env = [{"name": RECIPE_ENV, "value": recipe.to_json()}, {"name": IN_TRAINJOB_ENV, "value": "1"},
           {"name": "REELFORGE_GIT_COMMIT", "value": git_commit or "unknown"}]
    for purpose in ("tracking", "storage"):
        secret = recipe.resources.secrets.get(purpose)
        for variable, key in (secret.env.items() if secret else ()):
            env.append({"name": variable, "valueFrom": {"secretKeyRef": {"name": secret.name, "key": key}}})
    args = [f"--stage={stage}", f"--output={output_uri}", f"--pipeline-job-id={pipeline_job_id}",
            f"--pipeline-name={pipeline_name}", *(f"--input={name}={uri}" for name, uri in sorted(inputs.items()))]
    spec: dict[str, Any] = {
        "runtimeRef": {"apiGroup": GROUP, "kind": RUNTIME_KIND, "name": RUNTIME},
        "trainer": {
            "image": image,
            "command": ["torchrun", "-m", WORKER_MODULE],  # torchrun takes nodes, rank and master from PET_*
            "args": args,
            "env": env,
            "numNodes": config.num_nodes,
            "numProcPerNode": config.devices,
            "resourcesPerNode": resources,
        },
        "labels": {"app.kubernetes.io/part-of": "reelforge", "reelforge.io/stage": f"pretrain-{stage}"},
    }
    override: dict[str, Any] = {}
    if node.gpus:
        if pool.node_selector:
            override["nodeSelector"] = dict(pool.node_selector)
        if pool.tolerations:
            override["tolerations"] = [
                {("tolerationSeconds" if k == "toleration_seconds" else k): v for k, v in t.items()}
                for t in pool.tolerations]
    if node.shm_size:  # NCCL and DataLoader workers need more than the container's 64Mi /dev/shm
        override["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": node.shm_size}}]
        override["containers"] = [{"name": TRAINER_CONTAINER,
                                   "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}]
    if override:
        spec["podTemplateOverrides"] = [{"targetJobs": [{"name": TRAINER_CONTAINER}], "spec": override}]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": job_name(pipeline_job_id, stage), "namespace": namespace,
                     "labels": {"app.kubernetes.io/part-of": "reelforge", "reelforge.io/stage": f"pretrain-{stage}",
                                "reelforge.io/pipeline-run": re.sub(r"[^A-Za-z0-9_.-]", "-", pipeline_job_id)[:63]
                                .strip("-_.") or "none"}},
        "spec": spec,
    }


def create_or_attach(api: Any, manifest: Mapping[str, Any], log: Callable[[str], None] = print,
                     delete_timeout_s: float = 600.0, poll_s: float = 5.0) -> dict[str, Any]:
    """Create the TrainJob; when it exists already (a retried task), return the existing one instead.

    An existing job that has failed belongs to an earlier attempt of this task: following it would
    only fail the retry again, so it is deleted (its pods with it) and the job is created anew.
    """
    from kubernetes.client.exceptions import ApiException

    namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    for attempt in range(2):
        try:
            created = api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, dict(manifest))
            log(f"TrainJob {namespace}/{name} created: {manifest['spec']['trainer']['numNodes']} nodes")
            return created
        except ApiException as error:
            if error.status != 409:
                raise TrainJobError(f"creating TrainJob {namespace}/{name} failed: HTTP {error.status} "
                                    f"{error.reason}: {(error.body or '')[:300]}") from None
        existing = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        failed = _conditions(existing).get("Failed", {})
        if failed.get("status") != "True" or attempt:
            log(f"TrainJob {namespace}/{name} exists already (a retried task): following it")
            return existing
        log(f"TrainJob {namespace}/{name} failed on an earlier attempt ({failed.get('reason', 'unknown reason')}): "
            "deleting it and starting again")
        _delete_and_wait(api, namespace, name, delete_timeout_s, poll_s)
    raise AssertionError("unreachable")


def _delete_and_wait(api: Any, namespace: str, name: str, timeout_s: float, poll_s: float) -> None:
    """Delete a TrainJob with its pods (foreground) and wait until the API no longer has it."""
    from kubernetes.client.exceptions import ApiException

    try:
        api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                            propagation_policy="Foreground")
    except ApiException as error:
        if error.status != 404:
            raise TrainJobError(f"deleting the failed TrainJob {namespace}/{name} failed: HTTP {error.status} "
                                f"{error.reason}") from None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as error:
            if error.status == 404:
                return
            raise
        time.sleep(poll_s)
    raise TrainJobError(f"the failed TrainJob {namespace}/{name} was not gone {timeout_s:.0f} s after deleting it: "
                        f"kubectl -n {namespace} describe trainjob {name}")


def _conditions(job: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (job.get("status") or {}).get("conditions", []) or []}


def follow(api: Any, namespace: str, name: str, timeout_s: float, poll_s: float = 15.0,
           log: Callable[[str], None] = print, clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
    """Poll the TrainJob until Complete (returns it); TrainJobError on Failed or after `timeout_s`."""
    deadline, seen = clock() + timeout_s, set()
    while True:
        job = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        conditions = _conditions(job)
        for kind, condition in conditions.items():
            key = (kind, condition.get("status"), condition.get("reason"))
            if key not in seen:
                seen.add(key)
                log(f"TrainJob {name}: {kind}={condition.get('status')} {condition.get('reason', '')}: "
                    f"{condition.get('message', '')}".rstrip(": "))
        failed = conditions.get("Failed", {})
        if failed.get("status") == "True":
            raise TrainJobError(f"TrainJob {namespace}/{name} failed ({failed.get('reason', 'unknown reason')}): "
                                f"{failed.get('message', '')}; logs: kubectl -n {namespace} logs -l "
                                f"jobset.sigs.k8s.io/jobset-name={name} --tail=200")
        if conditions.get("Complete", {}).get("status") == "True":
            return job
        if clock() >= deadline:
            raise TrainJobError(f"TrainJob {namespace}/{name} did not finish within {timeout_s:.0f} s; it is left "
                                f"running: kubectl -n {namespace} describe trainjob {name}")
        time.sleep(poll_s)


def in_cluster_namespace() -> str:
    """The namespace this pod runs in (the service-account mount says), else 'default'."""
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    return path.read_text().strip() if path.is_file() else "default"


def own_image(namespace: str, core: Any, log: Callable[[str], None] = print) -> str | None:
    """The image of this task's own container (the pod named $HOSTNAME), so the TrainJob runs exactly the
    image the pipeline was compiled with (`--image` may differ from recipe.image); None when unknown."""
    pod_name = os.environ.get("HOSTNAME", "")
    if not pod_name:
        return None
    try:
        pod = core.read_namespaced_pod(pod_name, namespace)
    except Exception as error:  # noqa: BLE001 - any failure here only means "use recipe.image"
        log(f"could not read this task's pod {namespace}/{pod_name} ({type(error).__name__}); "
            "the TrainJob uses recipe.image")
        return None
    containers = pod.spec.containers or []
    # KFP runs the component in the container named "main"; other containers are its launchers/sidecars.
    main = next((c for c in containers if c.name == "main"), containers[0] if containers else None)
    return main.image if main is not None else None


def launch(recipe: Recipe, stage: str, input_uris: Mapping[str, str], output_uri: str, output_dir: Path,
           pipeline_job_id: str, git_commit: str = "", image: str | None = None, api: Any = None,
           pipeline_name: str = "reelforge-training",
           namespace: str | None = None, poll_s: float = 15.0, log: Callable[[str], None] = print,
           core: Any = None) -> dict[str, Any]:
    """Run stage `stage` as a TrainJob and download its model into `output_dir`; returns the finished job.

    The job runs `image`, else this task's own image (read from its pod through `core`, a CoreV1Api on
    the same API client by default), else recipe.image."""
    from components.storage import download_dir

    config = recipe.pretrain.train_config(stage)
    missing = [name for name, uri in input_uris.items() if not uri]
    if missing or not output_uri:
        raise TrainJobError(f"pretrain stage {stage!r} runs on {config.num_nodes} nodes, which needs its inputs and "
                            f"output as URIs the nodes can reach (s3://...); missing: {missing or ['output']}")
    if api is None:
        from kubernetes import client

        from components.deploy.k8s import load_client_config

        load_client_config()
        api = client.CustomObjectsApi()
    namespace = namespace or in_cluster_namespace()
    if image is None:
        from kubernetes import client

        image = own_image(namespace, core or client.CoreV1Api(api.api_client), log)
    manifest = build(recipe, stage, image or recipe.image, namespace, input_uris, output_uri, pipeline_job_id,
                     git_commit, pipeline_name)
    name = manifest["metadata"]["name"]
    create_or_attach(api, manifest, log, poll_s=poll_s)
    timeout = recipe.resources.for_task("pretrain").timeout_s or 14 * 24 * 3600
    job = follow(api, namespace, name, timeout, poll_s=poll_s, log=log)
    try:
        download_dir(output_uri, Path(output_dir))
    except FileNotFoundError as error:
        raise TrainJobError(f"TrainJob {namespace}/{name} completed but left no model ({error}); global rank 0 "
                            "uploads it when training ends: check the node-0 pod's log") from None
    log(f"TrainJob {name} complete; model downloaded from {output_uri}")
    return job

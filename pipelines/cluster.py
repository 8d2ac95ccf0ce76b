"""Cluster settings of each compiled task, from the recipe's `resources` section.

One function, `configure(task, stage, recipe)`, called on every task of every pipeline, writes
into the IR what a KFP cluster needs and kfp.local ignores:

- CPU and memory requests (memory also as the limit: a task over it is OOM-killed, not the node);
- accelerators: type and count, plus the GPU pool's node selector and tolerations, only on
  tasks that ask for GPUs (a CPU task never lands on, or blocks, a GPU node);
- `/dev/shm` as a memory-backed emptyDir where `shm_size` is set (the container default of 64Mi
  breaks DataLoader workers and NCCL);
- secrets as environment variables, by reference, on exactly the tasks that use them (the table
  `SECRETS_BY_STAGE` below): the values never enter the IR;
- retries with exponential backoff on training and upload tasks, where a retry can succeed
  (preempted GPU node, S3 or registry hiccup) and resumes from checkpoints;
- caching: off where a task has side effects (register, deploy), as `CACHED_ON_CLUSTER` says;
- a timeout (activeDeadlineSeconds) where the recipe sets one.

`component_ops` builds every pipeline's components in the one project image, and `stage_args`
gives the arguments every stage runner takes, so the pipelines differ only in their DAGs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

from components.config import Recipe

# Which secrets a stage reads: `tracking` wherever the stage logs to MLflow (all stage runners
# do, through components.runner), `storage` where the stage itself moves data through S3:
# ingest reads s3:// sources with boto3, and pretrain launches a multi-node TrainJob whose
# workers exchange artifacts through S3. Artifacts between tasks go through KFP's own
# launcher (its pipeline-root credentials), and MLflow artifacts through the tracking server
# (`--serve-artifacts`), so no other task needs S3 keys.
SECRETS_BY_STAGE: dict[str, tuple[str, ...]] = {
    "ingest": ("tracking", "storage"),
    "list_raw_shards": (),
    "curate": ("tracking",),
    "curate_shard": ("tracking",),
    "curate_merge": ("tracking",),
    "autoencoder": ("tracking",),
    "pretrain": ("tracking", "storage"),
    "quality_tune": ("tracking",),
    "distill": ("tracking",),
    "evaluate": ("tracking",),
    "register": ("tracking",),
    "deploy": ("tracking",),
    "champion": ("tracking",),
    "ingest_new": ("tracking", "storage"),
}
# Retries help where failures are transient and the work resumes: training (checkpoints) and
# uploads (registry, S3). Evaluate and the curation helpers fail the same way twice.
RETRIED = {"ingest", "ingest_new", "autoencoder", "pretrain", "quality_tune", "distill", "register", "deploy"}
# KFP's cache only where equal inputs mean equal outputs and nothing else happens: never on
# register or deploy (they change the registry and the cluster).
CACHED_ON_CLUSTER = {"curate", "curate_shard", "curate_merge", "list_raw_shards"}
NEVER_CACHED = {"register", "deploy"}
SHM_VOLUME = "dshm"

_warned: set[str] = set()


def stage_of(task_name: str) -> str:
    """The recipe/stage name of a task: `pretrain_continue` -> `pretrain`."""
    return "pretrain" if task_name.startswith("pretrain") else task_name


def configure(task: Any, stage: str, recipe: Recipe, cache: bool | None = None) -> Any:
    """Apply the recipe's cluster settings for `stage` to a KFP task; returns the task.

    `cache` overrides the caching policy for this task (register and deploy are never cached).
    """
    from kfp import kubernetes

    stage = stage_of(stage)
    settings = recipe.resources.for_task("ingest" if stage == "ingest_new" else stage)
    if settings.cpu:
        task.set_cpu_request(settings.cpu)
    if settings.memory:
        task.set_memory_request(settings.memory).set_memory_limit(settings.memory)
    if settings.gpus:
        pool = recipe.resources.gpu_pool
        task.set_accelerator_type(pool.accelerator).set_accelerator_limit(settings.gpus)
        for label, value in pool.node_selector.items():
            kubernetes.add_node_selector(task, label_key=label, label_value=value)
        for toleration in pool.tolerations:
            kubernetes.add_toleration(task, **toleration)
    if settings.shm_size:
        kubernetes.empty_dir_mount(task, volume_name=SHM_VOLUME, mount_path="/dev/shm", medium="Memory",
                                   size_limit=settings.shm_size)
    for purpose in SECRETS_BY_STAGE.get(stage, ("tracking",)):
        secret = recipe.resources.secrets.get(purpose)
        if secret is not None:
            kubernetes.use_secret_as_env(task, secret_name=secret.name, secret_key_to_env=dict(
                (key, env) for env, key in secret.env.items()))
    if settings.retries and stage in RETRIED:
        task.set_retry(num_retries=settings.retries, backoff_duration=f"{int(settings.backoff_s)}s",
                       backoff_factor=settings.backoff_factor, backoff_max_duration=f"{int(settings.backoff_max_s)}s")
    if settings.timeout_s:
        kubernetes.set_timeout(task, settings.timeout_s)
    cached = stage in CACHED_ON_CLUSTER if cache is None else cache
    task.set_caching_options(cached and stage not in NEVER_CACHED)
    return task


def warn_unpinned(image: str) -> None:
    """Say once (stderr) when the image is a tag, not a digest: a tag can move under a running schedule."""
    if "@sha256:" not in image and image not in _warned:
        _warned.add(image)
        print(f"warning: image {image!r} is not pinned by digest; for clusters compile with "
              "--image <registry>/reelforge@sha256:<digest> so every run uses exactly the image you tested",
              file=sys.stderr)


def component_ops(faces: Mapping[str, Callable], image: str) -> dict[str, Callable]:
    """The stage faces as components that run in `image` and install nothing at run time.

    Air-gapped clusters work, and kfp.local runs them in the current interpreter.
    """
    from kfp import dsl

    warn_unpinned(image)
    return {name: dsl.component(face, base_image=image, install_kfp_package=False) for name, face in faces.items()}


def stage_args(recipe: Any, pipeline_name: str, git_commit: Any) -> dict[str, Any]:
    """The arguments every stage task takes: the recipe JSON, the run's id and name, the commit."""
    from kfp import dsl

    return dict(recipe=recipe, pipeline_job_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, pipeline_name=pipeline_name,
                git_commit=git_commit)

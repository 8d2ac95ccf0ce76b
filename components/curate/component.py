"""KFP faces of curation: signatures and docstrings; the work is in `components.curate.stage`.

`curate` runs both phases in one task (the training pipeline, and every local run).
`list_raw_shards`, `curate_shard` and `curate_merge` are the same work split for a cluster:
a ParallelFor over raw shards, then one global merge (see `pipelines/curation.py`).
"""

from typing import List

from kfp.dsl import Dataset, Input, Output


def curate(recipe: str, pipeline_job_id: str, pipeline_name: str, git_commit: str,
           raw_dataset: Input[Dataset], dataset: Output[Dataset]):
    """Decode, validate, score, dedup, filter, balance and shard raw samples, with a funnel report."""
    from components.runner import run_component

    run_component("curate", recipe, pipeline_job_id, pipeline_name, git_commit,
                  inputs={"raw_dataset": raw_dataset}, outputs={"dataset": dataset})


def list_raw_shards(raw_dataset: Input[Dataset]) -> List[str]:
    """The raw dataset's shard file names: the items of the curation ParallelFor."""
    from components.storage import shard_paths

    return [path.name for path in shard_paths(raw_dataset.path, "raw")]


def curate_shard(recipe: str, pipeline_job_id: str, pipeline_name: str, git_commit: str, shard: str,
                 raw_dataset: Input[Dataset], scored: Output[Dataset]):
    """Phase 1 for one raw shard: decode, clip, crop, caption, hash and score every sample in it."""
    from components.runner import run_component

    run_component("curate_shard", recipe, pipeline_job_id, pipeline_name, git_commit,
                  inputs={"raw_dataset": raw_dataset}, outputs={"scored": scored}, shard=shard)


def curate_merge(recipe: str, pipeline_job_id: str, pipeline_name: str, git_commit: str,
                 raw_dataset: Input[Dataset], scored: Input[List[Dataset]], dataset: Output[Dataset]):
    """Phase 2: global dedup, thresholds, review labels, balancing and the final shards + report."""
    from components.runner import run_component

    run_component("curate_merge", recipe, pipeline_job_id, pipeline_name, git_commit,
                  inputs={"raw_dataset": raw_dataset}, outputs={"dataset": dataset},
                  scored=[item.path for item in scored])

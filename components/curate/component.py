"""KFP face of the curation stage: a signature and a docstring; the work is in `stage.run`."""

from kfp.dsl import Dataset, Input, Output


def curate(recipe: str, pipeline_job_id: str, pipeline_name: str, git_commit: str,
           raw_dataset: Input[Dataset], dataset: Output[Dataset]):
    """Decode, validate, filter, dedup and resize raw samples into WebDataset shards with a funnel report."""
    from components.runner import run_component

    run_component("curate", recipe, pipeline_job_id, pipeline_name, git_commit,
                  inputs={"raw_dataset": raw_dataset}, outputs={"dataset": dataset})

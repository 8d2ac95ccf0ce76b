"""KFP face of the ingest stage: a signature and a docstring; the work is in `stage.run`."""

from kfp.dsl import Dataset, Output


def ingest(recipe: str, source: str, pipeline_job_id: str, pipeline_name: str, git_commit: str,
           raw_dataset: Output[Dataset]):
    """Ingest raw files and captions from `source` (empty = the recipe's) into raw tar shards + manifest."""
    from components.runner import run_component

    run_component("ingest", recipe, pipeline_job_id, pipeline_name, git_commit,
                  inputs={}, outputs={"raw_dataset": raw_dataset}, source=source)

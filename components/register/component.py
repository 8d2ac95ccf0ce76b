"""KFP face of the register stage: a signature and a docstring; the work is in `stage.run`."""

from kfp.dsl import Artifact, Dataset, Input, Model


def register(recipe: str, pipeline_job_id: str, pipeline_name: str, git_commit: str,
             model: Input[Model], dataset: Input[Dataset], evaluation: Input[Artifact]) -> str:
    """Register the tuned model in the MLflow registry with lineage tags and alias; returns a JSON summary."""
    import json

    from components.runner import run_component

    result = run_component("register", recipe, pipeline_job_id, pipeline_name, git_commit,
                           inputs={"model": model, "dataset": dataset, "evaluation": evaluation}, outputs={})
    return json.dumps(result.metadata, sort_keys=True)

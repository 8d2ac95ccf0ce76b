"""KFP face of the evaluation stage: a signature and a docstring; the work is in `stage.run`."""

from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output


def evaluate(recipe: str, pipeline_job_id: str, pipeline_name: str, git_commit: str,
             dataset: Input[Dataset], pretrained: Input[Model], tuned: Input[Model],
             evaluation: Output[Artifact], metrics: Output[Metrics]):
    """Score the pretrained and the quality-tuned model side by side on the committed prompt set."""
    from components.runner import run_component

    run_component("evaluate", recipe, pipeline_job_id, pipeline_name, git_commit,
                  inputs={"dataset": dataset, "pretrained": pretrained, "tuned": tuned},
                  outputs={"evaluation": evaluation}, metrics_output=metrics)

"""KFP face of the evaluation stage: a signature and a docstring; the work is in `stage.run`."""

from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output


def evaluate(recipe: str, pipeline_job_id: str, pipeline_name: str, git_commit: str,
             dataset: Input[Dataset], pretrained: Input[Model], tuned: Input[Model], student: Input[Model],
             evaluation: Output[Artifact], metrics: Output[Metrics]):
    """Score the untrained floor, the pretrained, the quality-tuned (teacher) and the distilled student
    model, and the registry's current champion, on the committed prompt sets; A/B win rates (student vs
    champion, student vs teacher, tuned vs pretrained), metrics.json with the gate's inputs, a model card."""
    from components.runner import run_component

    run_component("evaluate", recipe, pipeline_job_id, pipeline_name, git_commit,
                  inputs={"dataset": dataset, "pretrained": pretrained, "tuned": tuned, "student": student},
                  outputs={"evaluation": evaluation}, metrics_output=metrics)

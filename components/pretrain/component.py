"""KFP face of the pretrain stage: a signature and a docstring; the work is in `stage.run`."""

from kfp.dsl import Dataset, Input, Model, Output


def pretrain(recipe: str, pipeline_job_id: str, pipeline_name: str, git_commit: str,
             dataset: Input[Dataset], model: Output[Model]):
    """Train the flow-matching text-to-image transformer on the curated train split; safetensors out."""
    from components.runner import run_component

    run_component("pretrain", recipe, pipeline_job_id, pipeline_name, git_commit,
                  inputs={"dataset": dataset}, outputs={"model": model})

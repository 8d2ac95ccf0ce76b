"""KFP face of the quality-tune stage: a signature and a docstring; the work is in `stage.run`."""

from kfp.dsl import Dataset, Input, Model, Output


def quality_tune(recipe: str, pipeline_job_id: str, pipeline_name: str, git_commit: str,
                 dataset: Input[Dataset], autoencoder: Input[Model], base_model: Input[Model], model: Output[Model]):
    """Fine-tune the pretrained model on the top-k samples by curation quality, at a small learning rate."""
    from components.runner import run_component

    run_component("quality_tune", recipe, pipeline_job_id, pipeline_name, git_commit,
                  inputs={"dataset": dataset, "autoencoder": autoencoder, "base_model": base_model},
                  outputs={"model": model})

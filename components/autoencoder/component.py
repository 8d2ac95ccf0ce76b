"""KFP face of the autoencoder stage: a signature and a docstring; the work is in `stage.run`."""

from kfp.dsl import Dataset, Input, Model, Output


def autoencoder(recipe: str, pipeline_job_id: str, pipeline_name: str, git_commit: str,
                dataset: Input[Dataset], autoencoder: Output[Model]):
    """Train the image/video autoencoder (TAE) on the curated data, or record pixel space; safetensors out."""
    from components.runner import run_component

    run_component("autoencoder", recipe, pipeline_job_id, pipeline_name, git_commit,
                  inputs={"dataset": dataset}, outputs={"autoencoder": autoencoder})

"""KFP faces of the pretraining stages: signatures and docstrings; the work is in `stage.run`.

Two faces because a KFP input artifact cannot be optional in kfp.local: the first stage
starts from the recipe's preset, every later one continues from `base_model`.
"""

from kfp.dsl import Dataset, Input, Model, Output


def pretrain(recipe: str, pipeline_job_id: str, pipeline_name: str, git_commit: str, stage: str,
             dataset: Input[Dataset], autoencoder: Input[Model], model: Output[Model]):
    """First pretraining stage: flow-matching training from scratch in the autoencoder's latent space."""
    from components.runner import run_component

    run_component("pretrain", recipe, pipeline_job_id, pipeline_name, git_commit,
                  inputs={"dataset": dataset, "autoencoder": autoencoder}, outputs={"model": model}, stage=stage,
                  # for a multi-node stage: where the TrainJob's nodes find the inputs and leave the model
                  input_uris={"dataset": dataset.uri, "autoencoder": autoencoder.uri},
                  output_uri=f"{model.uri}-trainjob")


def pretrain_continue(recipe: str, pipeline_job_id: str, pipeline_name: str, git_commit: str, stage: str,
                      dataset: Input[Dataset], autoencoder: Input[Model], base_model: Input[Model],
                      model: Output[Model]):
    """A later pretraining stage (e.g. joint image+video, higher resolution), continuing from `base_model`."""
    from components.runner import run_component

    run_component("pretrain", recipe, pipeline_job_id, pipeline_name, git_commit,
                  inputs={"dataset": dataset, "autoencoder": autoencoder, "base_model": base_model},
                  outputs={"model": model}, stage=stage,
                  input_uris={"dataset": dataset.uri, "autoencoder": autoencoder.uri, "base_model": base_model.uri},
                  output_uri=f"{model.uri}-trainjob")

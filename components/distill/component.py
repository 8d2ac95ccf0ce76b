"""KFP face of the distill stage: a signature and a docstring; the work is in `stage.run`."""

from kfp.dsl import Dataset, Input, Model, Output


def distill(recipe: str, pipeline_job_id: str, pipeline_name: str, git_commit: str, dataset: Input[Dataset],
            autoencoder: Input[Model], tuned: Input[Model], pretrained: Input[Model], model: Output[Model]):
    """Distil the quality-tuned model (and the recipe's other teachers) into a student that samples in
    `distill.student_steps` steps with guidance folded in: guidance distillation, then progressive rounds."""
    from components.runner import run_component

    run_component("distill", recipe, pipeline_job_id, pipeline_name, git_commit,
                  inputs={"dataset": dataset, "autoencoder": autoencoder, "tuned": tuned, "pretrained": pretrained},
                  outputs={"model": model})

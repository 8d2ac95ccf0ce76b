"""KFP face of the retraining stages; the work is in `components.retrain.stage` and `components.ingest.stage`."""

from kfp.dsl import Dataset, Input, Model, Output


def champion(recipe: str, pipeline_job_id: str, pipeline_name: str, git_commit: str, teacher: Output[Model],
             autoencoder: Output[Model], known: Output[Dataset]):
    """The registry champion's teacher, its latent codec, and the files and samples its lineage already holds."""
    from components.runner import run_component

    run_component("champion", recipe, pipeline_job_id, pipeline_name, git_commit, inputs={},
                  outputs={"teacher": teacher, "autoencoder": autoencoder, "known": known})


def ingest_new(recipe: str, source: str, pipeline_job_id: str, pipeline_name: str, git_commit: str,
               known: Input[Dataset], raw_dataset: Output[Dataset]):
    """Ingest only the files of `source` that the champion's dataset has not seen (fails when none are new)."""
    from components.runner import run_component

    run_component("ingest_new", recipe, pipeline_job_id, pipeline_name, git_commit, inputs={"known": known},
                  outputs={"raw_dataset": raw_dataset}, source=source)

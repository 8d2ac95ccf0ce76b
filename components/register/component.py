"""KFP face of the register stage: a signature and a docstring; the work is in `stage.run`."""

from kfp.dsl import Artifact, Dataset, Input, Model


def register(recipe: str, pipeline_job_id: str, pipeline_name: str, git_commit: str, student: Input[Model],
             teacher: Input[Model], dataset: Input[Dataset], evaluation: Input[Artifact]) -> str:
    """Register the distilled student (deployable) and its quality-tuned teacher in the MLflow registry with
    lineage tags and the `candidate` alias, apply the promotion gate to the student (passing -> `champion`),
    and return the student's model URI, models:/<name>/<version>."""
    import json

    from components.runner import run_component

    result = run_component("register", recipe, pipeline_job_id, pipeline_name, git_commit,
                           inputs={"student": student, "teacher": teacher, "dataset": dataset,
                                   "evaluation": evaluation}, outputs={})
    # The task log carries the whole decision (gate checks, alias moves); the output is the URI deploy needs.
    print(json.dumps(result.metadata, indent=2, sort_keys=True, default=str))
    return str(result.metadata["model_uri"])

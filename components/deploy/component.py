"""KFP face of the deploy stage: a signature and a docstring; the work is in `stage.run`."""

from kfp.dsl import Artifact, Output


def deploy(recipe: str, pipeline_job_id: str, pipeline_name: str, git_commit: str, model_uri: str,
           deployment: Output[Artifact]) -> str:
    """Serve registered version `model_uri` (models:/NAME/VERSION) per recipe.deploy: locally (start the server,
    smoke-test it, stop it) or on Kubernetes (apply Deployment/Service/HPA, wait for the rollout).

    The service follows deploy.alias (champion) when the version is the champion, else that exact version.
    The output artifact's metadata carries the endpoint, version, status, smoke latency and the serve command;
    the returned JSON is the run's summary (registered version, gate, service, metrics) that `reelforge run` prints.
    """
    from components.runner import run_component

    result = run_component("deploy", recipe, pipeline_job_id, pipeline_name, git_commit,
                           inputs={}, outputs={"deployment": deployment}, model_uri=model_uri)
    return str(result.metadata["summary"])

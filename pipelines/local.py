"""Run a pipeline end to end on this machine with KFP's local runner and SQLite MLflow.

`kfp.local.SubprocessRunner(use_venv=False)` runs each task as a subprocess of this
interpreter (nothing is installed at run time). Task outputs land under
`<workdir>/pipeline_root`, MLflow under `<workdir>/mlflow.db` + `<workdir>/mlartifacts`
(unless MLFLOW_TRACKING_URI is set), the runner's content cache under `<workdir>/cache`, and
the training stages' checkpoints under `<workdir>/checkpoints` (a stable place, unlike the
per-run task outputs, so re-running a killed pipeline resumes training).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components import tracking
from components.checkpoints import CHECKPOINT_ENV
from components.config import Recipe
from components.runner import CACHE_ENV, GIT_COMMIT_ENV


@dataclass
class LocalRunResult:
    """What a local pipeline run produced, for the summary and for tests."""

    workdir: Path
    tracking_uri: str
    summary: dict[str, Any]  # the register task's JSON output
    seconds: float
    stage_seconds: dict[str, float]


def git_commit(path: Path | None = None) -> str:
    """The current commit (with '-dirty' when there are uncommitted changes), or ''."""
    try:
        cwd = str(path or Path.cwd())
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return ""


def prepare_environment(workdir: Path, cache: bool = True) -> str:
    """Point this process (and the task subprocesses it starts) at the work dir's MLflow, cache and checkpoints."""
    workdir.mkdir(parents=True, exist_ok=True)
    uri = tracking.configure(workdir)
    os.environ[CHECKPOINT_ENV] = str((workdir / "checkpoints").resolve())
    if cache:
        os.environ[CACHE_ENV] = str((workdir / "cache").resolve())
    else:
        os.environ.pop(CACHE_ENV, None)
    return uri


def _stage_seconds(experiment: str, parent_run_id: str) -> dict[str, float]:
    client = tracking.client()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return {}
    runs = client.search_runs([found.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    seconds = {}
    for run in sorted(runs, key=lambda r: r.info.start_time or 0):
        stage = run.data.tags.get(tracking.STAGE_TAG, run.info.run_name)
        if run.info.end_time and run.info.start_time:
            seconds[stage] = (run.info.end_time - run.info.start_time) / 1000
    return seconds


def _init_local(workdir: Path, cache: bool) -> tuple[str, str]:
    import kfp.local

    uri = prepare_environment(workdir, cache=cache)
    commit = git_commit()
    if commit:
        os.environ.setdefault(GIT_COMMIT_ENV, commit)
    # The base image is ours, not a python:* image; kfp.local warns about that on every task.
    logging.getLogger("root").addFilter(lambda record: "non-Python base image" not in record.getMessage())
    kfp.local.init(
        runner=kfp.local.SubprocessRunner(use_venv=False),
        pipeline_root=str(workdir / "pipeline_root"),
        raise_on_error=True,
    )
    return uri, commit


def _failed_stage(experiment: str, since_ms: int) -> str | None:
    """'<stage>: <error>' of the latest stage run that failed since `since_ms`, from its error tag."""
    client = tracking.client()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], max_results=50, order_by=["attributes.start_time DESC"],
                              filter_string=f"attributes.status = 'FAILED' AND attributes.start_time >= {since_ms}")
    for run in runs:
        if tracking.ERROR_TAG in run.data.tags:
            return f"{run.data.tags.get(tracking.STAGE_TAG, run.info.run_name)}: {run.data.tags[tracking.ERROR_TAG]}"
    return None


def _run_pipeline(build_pipeline: Callable[[Recipe], Any], recipe: Recipe, workdir: Path, source: str,
                  cache: bool) -> LocalRunResult:
    """Run a pipeline whose last task returns the summary JSON; a failure names the stage and its error."""
    workdir = Path(workdir).resolve()
    uri, commit = _init_local(workdir, cache)
    pipeline = build_pipeline(recipe)
    started, started_ms = time.monotonic(), int(time.time() * 1000)
    try:
        task = pipeline(recipe=recipe.to_json(), source=source, git_commit=commit)
    except RuntimeError as error:  # kfp.local names only the task; the stage's MLflow run holds why
        cause = _failed_stage(recipe.tracking.experiment, started_ms)
        if cause is None:
            raise
        raise RuntimeError(f"{cause} ({error})") from error
    seconds = time.monotonic() - started
    summary = json.loads(task.output)
    parent = summary.get("mlflow_parent_run_id", "")
    stage_seconds = _stage_seconds(recipe.tracking.experiment, parent) if parent else {}
    return LocalRunResult(workdir, uri, summary, seconds, stage_seconds)


def run_training(recipe: Recipe, workdir: Path, source: str = "", cache: bool = True) -> LocalRunResult:
    """Execute the training pipeline locally; raises if any task fails (naming the stage and its error)."""
    from pipelines.training import build_pipeline

    return _run_pipeline(build_pipeline, recipe, workdir, source, cache)


def run_retraining(recipe: Recipe, workdir: Path, source: str = "", cache: bool = True) -> LocalRunResult:
    """Execute the retraining pipeline locally against the work dir's registry; raises if any task fails
    (e.g. "ingest_new: NothingNewError: nothing new to train on ..." when the source holds no file the
    champion's lineage has not seen)."""
    from pipelines.retraining import build_pipeline

    return _run_pipeline(build_pipeline, recipe, workdir, source, cache)


def run_curation(recipe: Recipe, workdir: Path, source: str = "", parallelism: int = 2) -> LocalRunResult:
    """Execute the curation pipeline locally: ingest -> ParallelFor over raw shards -> global merge.

    kfp.local (2.16) runs the ingest task and the ParallelFor loop (one scoring task per raw
    shard, `parallelism` at once) but cannot schedule a task that collects a loop's outputs, so
    the merge runs here through the same runner and stage as the compiled pipeline's merge task,
    on the loop's outputs, in the same MLflow parent run. The summary holds the dataset path.
    """
    from pipelines.curation import PIPELINE_NAME, build_pipeline

    workdir = Path(workdir).resolve()
    uri, commit = _init_local(workdir, cache=False)  # KFP's own cache is the shard cache on a cluster
    started, started_ms = time.monotonic(), int(time.time() * 1000)
    before = set((workdir / "pipeline_root").glob(f"{PIPELINE_NAME}-*"))
    build_pipeline(recipe, parallelism=parallelism, fan_in=False)(recipe=recipe.to_json(), source=source,
                                                                 git_commit=commit)
    runs = sorted(set((workdir / "pipeline_root").glob(f"{PIPELINE_NAME}-*")) - before)
    if len(runs) != 1:
        raise RuntimeError(f"expected one new curation run under {workdir / 'pipeline_root'}, found {runs}")
    run_dir = runs[0]
    iterations = sorted(run_dir.glob("for-loop-*-iteration-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    scored = [str(p / "curate-shard" / "scored") for p in iterations]
    job_id = _job_id_of(recipe.tracking.experiment, "curate_shard", since_ms=started_ms)
    from components.runner import RunContext, execute

    dataset = run_dir / "merge" / "dataset"
    execute("curate_merge", recipe, {"raw_dataset": run_dir / "ingest" / "raw_dataset"}, {"dataset": dataset},
            RunContext(pipeline_job_id=job_id, pipeline_name=PIPELINE_NAME, git_commit=commit), scored=scored)
    seconds = time.monotonic() - started
    report = json.loads((dataset / "report.json").read_text(encoding="utf-8"))
    summary = {"dataset": str(dataset), "accepted": report["accepted"], "input": report["input"],
               "funnel": report["funnel"], "content_hash": report["content_hash"], "shards": len(scored)}
    return LocalRunResult(workdir, uri, summary, seconds, {})


def _job_id_of(experiment: str, stage: str, since_ms: int) -> str:
    """The KFP job id on the newest MLflow run of `stage` started since `since_ms` (the merge joins its parent run)."""
    client = tracking.client()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return ""
    runs = client.search_runs([found.experiment_id],
                              filter_string=f"tags.`{tracking.STAGE_TAG}` = '{stage}' and attributes.start_time >= {since_ms}",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].data.tags.get(tracking.PIPELINE_JOB_TAG, "") if runs else ""

"""Kill `reelforge run` during pretraining, run the same command again: it picks up where it stopped.

What a user does after a crash or a preempted machine: the same command, the same work dir.
Finished data stages come from the runner's cache (MLflow tag `reelforge.cache_hit`), training
continues from its newest checkpoint under `<workdir>/checkpoints` (the `resuming from step N`
log line and the `<stage>.resumed_from_step` tag), and the run ends with a registered model.

The assertions are about that behaviour, not about task names: any training stage whose name
starts with `pretrain` counts (pretraining may run as several `pretrain-<stage>` tasks).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from models.checkpoint import CHECKPOINT_STATE_FILE

REPO = Path(__file__).parents[2]
# The tiny recipe on its default source, cut to the first 48 Tux Paint stamps and a small prompt
# set (every task costs seconds of start-up anyway); pretraining with a checkpoint every 2 steps
# and long enough that the kill, at the first checkpoint, lands in the middle of it.
PRETRAIN_STEPS = 12
RECIPE_ARGS = ["--recipe", "tiny", "--set", "ingest.max_samples=48",
               "--set", f"pretrain.steps={PRETRAIN_STEPS}", "--set", "pretrain.checkpoint_every=2",
               "--set", "pretrain.sample_every=0", "--set", "pretrain.val_every=0",
               "--set", "evaluate.max_prompts=4", "--set", "evaluate.grid_prompts=4"]
RESUMED = re.compile(r"\[(pretrain[^\]]*)\] resuming from step (\d+)")


def _command(workdir: Path) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", "run", *RECIPE_ARGS, "--workdir", str(workdir)]


def _environment() -> dict[str, str]:
    """The user's shell: no tracking URI or cache/checkpoint dirs set, so everything lives in the work dir."""
    drop = {"MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "REELFORGE_CACHE_DIR", "REELFORGE_CHECKPOINT_DIR"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def _pretrain_checkpoints(workdir: Path) -> list[int]:
    """Steps of the complete pretraining checkpoints on disk (any pretrain* stage)."""
    found = (workdir / "checkpoints").glob(f"pretrain*/*/step-*/{CHECKPOINT_STATE_FILE}")
    return sorted(int(p.parent.name.removeprefix("step-")) for p in found)


def _kill_during_pretraining(workdir: Path, log: Path) -> list[int]:
    """Start the run in its own process group, SIGKILL the whole group once a pretrain checkpoint exists."""
    with log.open("w") as output:
        process = subprocess.Popen(_command(workdir), cwd=REPO, env=_environment(), stdout=output,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 400
        try:
            while not _pretrain_checkpoints(workdir):
                assert process.poll() is None, f"the run ended before a pretrain checkpoint:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "no pretrain checkpoint appeared"
                time.sleep(0.01)
        finally:
            with contextlib.suppress(ProcessLookupError):  # the whole group may have exited already
                os.killpg(process.pid, signal.SIGKILL)  # the CLI and every task process it started
            process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    return _pretrain_checkpoints(workdir)


def test_killed_run_resumes_with_cached_data_stages_and_pretraining_from_its_checkpoint(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    workdir = tmp_path / "work"
    steps = _kill_during_pretraining(workdir, tmp_path / "killed.log")
    assert steps and steps[-1] < PRETRAIN_STEPS, f"killed mid-pretraining, checkpoints at steps {steps}"

    again = subprocess.run(_command(workdir), cwd=REPO, env=_environment(), capture_output=True, text=True,
                           timeout=600)
    log = again.stdout + again.stderr
    assert again.returncode == 0, log[-4000:]

    # Pretraining continued from the newest checkpoint the killed run left, not from step 0.
    resumed = {int(step) for _, step in RESUMED.findall(log)}
    assert resumed and min(resumed) > 0, f"no 'resuming from step N' line with N > 0 in the log:\n{log[-4000:]}"
    assert steps[-1] in resumed

    # The same story in MLflow: the newest pipeline run (the second command) registered a model ...
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(experiments, "tags.`reelforge.pipeline_job_id` != ''",
                                 order_by=["attributes.start_time DESC"])
    assert len(parents) == 2, "one MLflow parent run per command"
    parent = parents[0]
    job_id = parent.data.tags["reelforge.pipeline_job_id"]
    registered = [v for v in client.search_model_versions() if v.tags.get("pipeline.run_id") == job_id]
    assert registered, "the resumed run registered no model version"
    children = client.search_runs(experiments, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    tags = {run.data.tags["reelforge.stage"]: run.data.tags for run in children}
    assert all(run.info.status == "FINISHED" for run in children)
    # ... without redoing the data stages the killed run had finished: both come from the runner's cache ...
    assert tags["ingest"].get("reelforge.cache_hit") == "true"
    assert tags["curate"].get("reelforge.cache_hit") == "true"
    # ... and with pretraining resumed from the newest checkpoint.
    resumed_from = {key: int(value) for stage_tags in tags.values() for key, value in stage_tags.items()
                    if re.fullmatch(r"pretrain.*\.resumed_from_step", key)}
    assert resumed_from and max(resumed_from.values()) == steps[-1], resumed_from
